"""The training CLI end to end: synthetic and csv data, 1 and 2 processes, multi-node and SLURM
launches, equivalence of world sizes, exact resume, and OpenCLIP-loadable checkpoints."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from helpers import REPO, assert_same_weights, cpu_env, free_port, logged_losses, run_cli, weights

from nsoclip.checkpoint import load_checkpoint
from nsoclip.main import main
from nsoclip.model import resolve_model_name


def train_flags(config, logs, name, *extra, samples=32, batch=8, epochs=1):
    return ["--dataset-type", "synthetic", "--train-num-samples", samples, "--model", config,
            "--batch-size", batch, "--epochs", epochs, "--workers", 0, "--device", "cpu",
            "--precision", "fp32", "--logs", logs, "--name", name, "--warmup", 2,
            "--log-every-n-steps", 1, "--seed", 3, *extra]


def train_here(flags):
    """A single-process run in this process: the same code path as the CLI without paying for a
    fresh interpreter; launches are tested by the multi-process tests."""
    assert main([str(a) for a in flags]) == 0


def test_single_process_synthetic_writes_run_folder(tiny_config, tmp_path):
    train_here(train_flags(tiny_config, tmp_path, "run", "--report-to", "tensorboard", "--save-most-recent"))
    run_dir = tmp_path / "run"
    assert {"out.log", "params.txt", "checkpoints", "tensorboard"} <= {p.name for p in run_dir.iterdir()}
    assert "batch_size: 8" in (run_dir / "params.txt").read_text()
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "epoch_1.pt")
    assert {"epoch", "name", "state_dict", "optimizer", "scaler", "step"} <= checkpoint.keys()
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 4 and checkpoint["name"] == "run"
    assert (run_dir / "checkpoints" / "epoch_latest.pt").is_file()
    assert len(logged_losses(run_dir)) == 4
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_loads_in_plain_open_clip(tiny_config, tmp_path):
    train_here(train_flags(tiny_config, tmp_path, "run"))
    path = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    model, _, _ = open_clip.create_model_and_transforms(resolve_model_name(tiny_config), pretrained=str(path))
    ours = weights(tmp_path / "run")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ours[key])


@pytest.fixture(scope="module")
def global_batch_reference(tmp_path_factory):
    """1 process x batch 8 with the exact distributed loss flags: what every launch of 2 x 4 must equal."""
    logs = tmp_path_factory.mktemp("reference")
    train_here(train_flags(str(REPO / "tests" / "configs" / "tiny-vit.json"), logs, "one",
                           "--local-loss", "--gather-with-grad", batch=8))
    return logs / "one"


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tiny_config, tmp_path, global_batch_reference):
    """With --local-loss --gather-with-grad each rank's loss covers its own rows against all
    gathered columns, and DDP averages the two ranks' gradients: the objective is exactly the
    single-process loss on the concatenated batch, and our sampler gives rank r the r-th half of
    every global batch."""
    run_cli(train_flags(tiny_config, tmp_path, "two", "--local-loss", "--gather-with-grad", batch=4), nproc=2)
    assert logged_losses(global_batch_reference) == pytest.approx(logged_losses(tmp_path / "two"), rel=1e-5)
    assert_same_weights(weights(global_batch_reference), weights(tmp_path / "two"))


def test_accumulation_equals_the_larger_batch(tiny_config, tmp_path):
    """accum_freq 2 x batch 4 takes the gradient of the loss over the same 8 samples as batch 8."""
    train_here(train_flags(tiny_config, tmp_path, "big", batch=8))
    train_here(train_flags(tiny_config, tmp_path, "accum", "--accum-freq", 2, batch=4))
    assert logged_losses(tmp_path / "big") == pytest.approx(logged_losses(tmp_path / "accum"), rel=1e-5)
    assert_same_weights(weights(tmp_path / "big"), weights(tmp_path / "accum"))


def test_nso_with_accumulation_equals_the_larger_batch(tiny_config, tmp_path):
    """Every perturbed point sees the whole accumulated batch: NSO with accum_freq 2 x batch 4
    equals NSO with batch 8 (same noise stream, same samples)."""
    nso = ["--opt", "nso", "--nso-sigma", "0.01"]
    train_here(train_flags(tiny_config, tmp_path, "big", *nso, batch=8))
    train_here(train_flags(tiny_config, tmp_path, "accum", *nso, "--accum-freq", 2, batch=4))
    assert logged_losses(tmp_path / "big") == pytest.approx(logged_losses(tmp_path / "accum"), rel=1e-5)
    assert_same_weights(weights(tmp_path / "big"), weights(tmp_path / "accum"))
    assert "sigma: 0.01" in (tmp_path / "big" / "out.log").read_text()


def test_resume_from_step_checkpoint_continues_exactly(tiny_config, tmp_path):
    """Kill the run after a step checkpoint exists, resume with the same command: the final
    weights equal the uninterrupted run's."""
    flags = train_flags(tiny_config, tmp_path, "interrupted", "--save-every-n-steps", 2, "--resume", "latest",
                        samples=64, epochs=2)
    train_here(train_flags(tiny_config, tmp_path, "straight", samples=64, epochs=2))
    command = [sys.executable, "-m", "nsoclip.main", *map(str, flags)]
    process = subprocess.Popen(command, env=cpu_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint_dir = tmp_path / "interrupted" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoint_dir.glob("step_*.pt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (checkpoint_dir / "epoch_2.pt").exists(), "the run finished before it could be interrupted"
    train_here(flags)
    assert "Resumed from" in (tmp_path / "interrupted" / "out.log").read_text()
    assert_same_weights(weights(tmp_path / "straight", "epoch_2.pt"), weights(tmp_path / "interrupted", "epoch_2.pt"),
                        atol=0, rtol=0)


def test_resume_latest_without_checkpoint_starts_fresh(tiny_config, tmp_path):
    train_here(train_flags(tiny_config, tmp_path, "fresh", "--resume", "latest"))
    assert "no checkpoint yet" in (tmp_path / "fresh" / "out.log").read_text()
    assert (tmp_path / "fresh" / "checkpoints" / "epoch_1.pt").is_file()


def write_csv_dataset(root: Path, count=16, caption_key="title"):
    rows = ["filepath\t" + caption_key]
    for i in range(count):
        path = root / f"img{i}.png"
        Image.new("RGB", (40, 40), (i * 15 % 256, 100, 200 - i)).save(path)
        rows.append(f"{path.name}\ta picture number {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


def csv_flags(config, logs, name, csv_path, batch=4):
    return ["--train-data", csv_path, "--model", config, "--batch-size", batch, "--epochs", 1,
            "--workers", 1, "--device", "cpu", "--precision", "fp32", "--logs", logs, "--name", name,
            "--warmup", 1, "--log-every-n-steps", 1, "--local-loss", "--gather-with-grad"]


@pytest.mark.slow
def test_csv_single_and_two_processes_agree(tiny_config, tmp_path):
    csv_path = write_csv_dataset(tmp_path)
    train_here(csv_flags(tiny_config, tmp_path, "one", csv_path, batch=4))
    run_cli(csv_flags(tiny_config, tmp_path, "two", csv_path, batch=2), nproc=2)
    assert len(logged_losses(tmp_path / "one")) == 4
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))


@pytest.mark.slow
def test_two_node_torchrun_rendezvous(tiny_config, tmp_path, global_batch_reference):
    """Two torchrun agents on one machine (--nnodes 2, c10d rendezvous on 127.0.0.1): node rank,
    local rank != global rank and the per-node data split are exercised for real."""
    port = free_port()
    flags = train_flags(tiny_config, tmp_path, "nodes", "--local-loss", "--gather-with-grad", batch=4)
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes-test",
         "-m", "nsoclip.main", "--", *map(str, flags)],
        env=cpu_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    assert_same_weights(weights(global_batch_reference), weights(tmp_path / "nodes"))


@pytest.mark.slow
def test_slurm_launch(tiny_config, tmp_path, global_batch_reference):
    """srun starts one plain process per task with SLURM_* set; MASTER_ADDR/PORT come from the script."""
    port = free_port()
    flags = train_flags(tiny_config, tmp_path, "slurm", "--local-loss", "--gather-with-grad", batch=4)
    tasks = [subprocess.Popen(
        [sys.executable, "-u", "-m", "nsoclip.main", *map(str, flags)],
        env=cpu_env(SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=2, SLURM_JOB_ID=1,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [task.communicate(timeout=240)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "on 2 process(es)" in (tmp_path / "slurm" / "out.log").read_text()
    assert_same_weights(weights(global_batch_reference), weights(tmp_path / "slurm"))


def run_main(argv, capsys):
    """The CLI in this process (the flag and input checks need no subprocess): (exit code, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_slurm_without_master_addr_is_one_clear_error(tiny_config, tmp_path, capsys, monkeypatch):
    for key, value in dict(SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=2).items():
        monkeypatch.setenv(key, str(value))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code, err = run_main(train_flags(tiny_config, tmp_path, "s"), capsys)
    assert code == 2
    assert "MASTER_ADDR" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--local-loss"], "--local-loss without --gather-with-grad"),
    (["--horovod"], "--horovod"),
    (["--report-to", "mlflow"], "--report-to mlflow: unknown target"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--nso-lam", "2"], "--nso-lam 2"),
    (["--lr-scheduler", "const-cooldown"], "--epochs-cooldown"),
    (["--name", "../escape"], "--name"),
    (["--nso-sigma-schedule", "linear"], "--nso-sigma-ramp-steps"),
])
def test_bad_flags_give_one_line(tiny_config, tmp_path, extra, message, capsys):
    flags = train_flags(tiny_config, tmp_path, "bad")
    if "--name" in extra:
        index = flags.index("--name")
        flags = flags[:index] + flags[index + 2:]
    code, err = run_main([*flags, *extra], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_csv_file(tiny_config, tmp_path, capsys):
    code, err = run_main(csv_flags(tiny_config, tmp_path, "x", tmp_path / "absent.csv"), capsys)
    assert code == 2
    assert "absent.csv: file not found" in err and len(err.strip().splitlines()) == 1


def test_csv_without_caption_column(tiny_config, tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path, caption_key="text")
    code, err = run_main(csv_flags(tiny_config, tmp_path, "x", csv_path), capsys)
    assert code == 2
    assert "no column 'title'" in err and "--csv-caption-key" in err
    assert len(err.strip().splitlines()) == 1


def test_existing_run_folder_is_not_overwritten(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "out.log").write_text("an earlier run\n")
    (run_dir / "checkpoints" / "epoch_1.pt").write_bytes(b"precious")
    code, err = run_main(train_flags(tiny_config, tmp_path, "run"), capsys)
    assert code == 2 and "already exists" in err
    assert (run_dir / "checkpoints" / "epoch_1.pt").read_bytes() == b"precious"
    assert (run_dir / "out.log").read_text() == "an earlier run\n"
