"""OpenCLIP drop-in parity (issue 18): flags that mean what they mean in OpenCLIP 3.3 (or differ
deliberately, as the README's flag table says), models our loss cannot take refused before
anything runs, and what a user sees (weights-loaded messages, averaged losses, settings that
apply, one line per problem). Each test compares against OpenCLIP's rule or another run."""
import json
import math
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import open_clip
import pytest
import safetensors.torch
import timm
import torch
from open_clip.loss import SigLipLoss
from PIL import Image

from helpers import (CONFIGS, REPO, TINY, assert_same_weights, cpu_env, in_process, logged_losses, model_args,
                     read_jsonl, run_cli, weights, write_eval_data)

from nsoclip import hessian, main, report, shards, zeroshot
from nsoclip.checkpoint import Checkpointer
from nsoclip.checks import command_line
from nsoclip.classification import IMAGENET_V2_FOLDER, zero_shot_sets
from nsoclip.compute import ComputeMeter
from nsoclip.data import get_data
from nsoclip.distributed import World
from nsoclip.loader import first_batches
from nsoclip.model import create_model_and_transforms, resolve_model_name
from nsoclip.parallel import Layout, LayoutError, check_layout
from nsoclip.params import Parser, add_eval_args, parse_args
from nsoclip.precision import default_precision
from nsoclip.rng import seed_everything

RN = str(CONFIGS / "tiny-rn.json")
COCA = str(CONFIGS / "tiny-coca.json")
TIMM = str(CONFIGS / "tiny-timm.json")


def flags(logs, name, *extra, model=TINY, samples=8, batch=4, epochs=1, workers=0, every=1, device="cpu"):
    return ["--dataset-type", "synthetic", "--train-num-samples", samples, "--model", model, "--batch-size", batch,
            "--epochs", epochs, "--workers", workers, "--device", device, "--precision", "fp32", "--logs", logs,
            "--name", name, "--warmup", 2, "--log-every-n-steps", every, "--seed", 3, *extra]


def train(*argv):
    assert in_process(main.main, argv) == 0


def error_line(capsys, code) -> str:
    """The one `error:` line a failed CLI printed (its last stderr line), with exit status 2."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in err) == 1 and not any("Traceback" in line for line in err), err
    return err[-1]


def metrics(run_dir):
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_eval_data(tmp_path_factory.mktemp("data"))


# ---- same flag, same meaning

def test_force_image_size_one_value_is_square_two_are_height_width():
    """OpenCLIP turns a one-value --force-image-size into an int; open_clip cannot unpack [224]."""
    square, preprocess = create_model_and_transforms(model_args(TINY, force_image_size=[48]), torch.device("cpu"))[:2]
    reference = open_clip.create_model(resolve_model_name(TINY), force_image_size=48)
    assert square.visual.image_size == (48, 48)
    assert {k: v.shape for k, v in square.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert tuple(preprocess(Image.new("RGB", (90, 60))).shape) == (3, 48, 48)
    wide = create_model_and_transforms(model_args(TINY, force_image_size=[48, 32]), torch.device("cpu"))[0]
    assert wide.visual.image_size == (48, 32)


def first_batch_loss(argv, loss_fn):
    """The loss of the model and first batch a run with these flags starts from, built the way
    main builds them (seeded as main seeds them)."""
    args = parse_args([str(a) for a in argv])
    seed_everything(args.seed, 0)
    model, preprocess_train, preprocess_val, tokenizer = create_model_and_transforms(args, torch.device("cpu"))
    info = get_data(args, (preprocess_train, preprocess_val), tokenizer, World())["train"]
    images, texts = first_batches(info, 1, torch.device("cpu"), "fp32")[0]
    with torch.no_grad():
        return model, float(loss_fn(**model(images, texts)))


def test_siglip_starts_from_openclips_siglip_init_and_steps_on_siglip_loss(tmp_path):
    """--siglip on a CLIP config: OpenCLIP's init_logit_scale = log 10, init_logit_bias = -10, and
    the first logged loss is open_clip's SigLipLoss of that model on the first batch."""
    argv = flags(tmp_path, "siglip", "--siglip", samples=4)
    model, expected = first_batch_loss(argv, SigLipLoss())
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10
    plain = create_model_and_transforms(model_args(TINY), torch.device("cpu"))[0]
    assert plain.logit_bias is None and plain.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    train(*argv)
    assert logged_losses(tmp_path / "siglip") == pytest.approx([expected], rel=1e-6)
    assert "logit_bias" in weights(tmp_path / "siglip")


@pytest.mark.parametrize("perturbed", [["--opt", "nso", "--nso-sigma", "0"], ["--opt", "sam", "--sam-rho", "0"]],
                         ids=["nso", "sam"])
def test_siglip_under_nso_and_sam_at_zero_radius_equals_adamw(tmp_path, perturbed):
    """NSO and SAM drive the SigLIP closure (logit_bias included, accumulation's path): at sigma
    = 0 / rho = 0 every pass is at w, so the update is AdamW's."""
    common = ["--siglip", "--accum-freq", "2"]
    train(*flags(tmp_path, "adamw", *common, samples=16, batch=2))
    train(*flags(tmp_path, "perturbed", *common, *perturbed, samples=16, batch=2))
    assert logged_losses(tmp_path / "adamw") == pytest.approx(logged_losses(tmp_path / "perturbed"), rel=1e-6)
    assert_same_weights(weights(tmp_path / "adamw"), weights(tmp_path / "perturbed"), atol=1e-7, rtol=1e-6)


@pytest.mark.slow
def test_siglip_with_nso_on_two_ranks_equals_one_process(tmp_path):
    """SigLIP's neighbour exchange carries gradients back to the rank that owns the features and
    DDP averages: 2 ranks x 4 equal 1 process x 8, NSO's noise included. NSO's perturbed_loss
    is averaged over ranks like the loss, so it equals the single process's too. --log-local:
    every rank writes its own log file."""
    common = ["--siglip", "--opt", "nso", "--nso-sigma", "0.01", "--log-local"]
    train(*flags(tmp_path, "one", *common, samples=24, batch=8))
    run_cli(flags(tmp_path, "two", *common, samples=24, batch=4), nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "perturbed_loss"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    for rank in (0, 1):
        log = (tmp_path / "two" / f"out-{rank}.log").read_text()
        assert "Run " in log and "on 2 process(es)" in log
    assert "Train epoch 0" in (tmp_path / "two" / "out-0.log").read_text()
    assert "Train epoch" not in (tmp_path / "two" / "out-1.log").read_text()  # rank 0 logs the metrics


@pytest.mark.slow
def test_sam_global_on_two_ranks_equals_one_process_and_stderr_is_quiet(tmp_path):
    """SAM's clean_loss and perturbed_loss are averaged over ranks like the loss (they equal one
    process's); the CLIP loss's all_gather deprecation warning (open_clip's code) is gone, and the
    workers-vs-cores warning comes once, as our own line, not once per dataloader and rank."""
    common = ["--opt", "sam", "--sam-rho", "0.05", "--sam-ascent", "global", "--local-loss", "--gather-with-grad"]
    train(*flags(tmp_path, "one", *common, samples=16, batch=8))
    workers = len(os.sched_getaffinity(0)) + 1  # more than the cores: torch would warn per loader and rank
    result = run_cli(flags(tmp_path, "two", *common, samples=16, batch=4, workers=workers), nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "clean_loss", "perturbed_loss"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert "all_gather is deprecated" not in result.stderr
    assert "This DataLoader will create" not in result.stderr + result.stdout
    assert (result.stdout + result.stderr).count("dataloader processes for") == 1


def test_save_frequency_zero_still_saves_the_final_checkpoint_and_delete_previous_keeps_the_newest(tmp_path):
    """OpenCLIP saves epoch_N.pt after the final epoch whatever --save-frequency. With
    --delete-previous-checkpoint ours removes older epoch files only once a newer one is on disk:
    OpenCLIP removes epoch_{N-1}.pt after every epoch, so with --save-frequency 2 it leaves no
    epoch checkpoint after odd epochs (README flag table: ours deliberately differs)."""
    model = torch.nn.Linear(2, 2)
    run = SimpleNamespace(step=0, model=model, layout=Layout(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          scaler=None, nonfinite_total=0, compute=ComputeMeter())

    def kept(frequency, delete, epochs):
        folder = tmp_path / f"{frequency}-{delete}"
        args = Namespace(epochs=epochs, save_frequency=frequency, delete_previous_checkpoint=delete,
                         save_most_recent=False, name="run", batch_size=1)
        checkpoints, after = Checkpointer(folder, args, World()), []
        for epoch in range(1, epochs + 1):
            run.step = epoch
            checkpoints.save_epoch(run, epoch)
            after.append(sorted(p.name for p in folder.glob("*.pt")))
        return after

    assert kept(0, False, 3) == [[], [], ["epoch_3.pt"]]
    assert kept(1, True, 3) == [["epoch_1.pt"], ["epoch_2.pt"], ["epoch_3.pt"]]
    assert kept(2, True, 4) == [[], ["epoch_2.pt"], ["epoch_2.pt"], ["epoch_4.pt"]]


def test_zero_frequencies_disable_evaluation_others_still_evaluate_after_the_final_epoch(tmp_path, data):
    """OpenCLIP: --zeroshot-frequency 0 / --val-frequency 0 never evaluate; N > 0 evaluates every
    N epochs and after the final one."""
    evals = ["--zeroshot-data", data["zeroshot"], "--zeroshot-classnames", data["classnames"],
             "--zeroshot-templates", data["templates"], "--val-data", data["csv"]]
    train(*flags(tmp_path, "off", *evals, "--zeroshot-frequency", 0, "--val-frequency", 0, epochs=2))
    train(*flags(tmp_path, "final", *evals, "--zeroshot-frequency", 3, "--val-frequency", 3, epochs=2))
    assert not (tmp_path / "off" / "results.jsonl").exists()
    records = read_jsonl(tmp_path / "final" / "results.jsonl")
    assert [r["epoch"] for r in records] == [2]
    assert {"kinds-zeroshot-val-top1", "image_to_text_R@1", "clip_val_loss"} <= records[0].keys()


def test_logs_none_keeps_no_run_folder_and_refuses_what_would_need_one(tmp_path, monkeypatch, capsys):
    """OpenCLIP's --logs none keeps no checkpoints but still writes ./none/NAME/out.log; ours
    writes nothing at all (README: deliberately differs) and logs to the console."""
    monkeypatch.chdir(tmp_path)
    argv = flags("none", "quiet")
    train(*argv)
    assert list(tmp_path.iterdir()) == []
    assert "Train epoch 0 [2/2]" in capsys.readouterr().out
    for extra, flag in ((["--report-to", "tensorboard"], "--report-to tensorboard"),
                        (["--resume", "latest"], "--resume latest"), (["--save-most-recent"], "--save-most-recent")):
        line = error_line(capsys, in_process(main.main, argv + extra))
        assert f"--logs 'none' keeps no run folder, so {flag} has nowhere to write" in line
    assert list(tmp_path.iterdir()) == []


def test_imagenet_v2_takes_openclips_parent_folder(tmp_path, capsys):
    """OpenCLIP passes --imagenet-v2 to imagenetv2_pytorch as the folder that holds
    ImageNetV2-matched-frequency/; the class folders themselves still work, anything else is one line."""
    inner = tmp_path / "v2" / IMAGENET_V2_FOLDER
    for label in (0, 1, 999):
        (inner / str(label)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(inner / str(label) / "a.jpeg")
    parser = Parser()
    add_eval_args(parser)
    parent, = zero_shot_sets(parser.parse_args(["--imagenet-v2", str(tmp_path / "v2")]), World())
    direct, = zero_shot_sets(parser.parse_args(["--imagenet-v2", str(inner)]), World())
    assert parent.root == str(inner) and parent.samples == direct.samples
    assert [label for _, label in parent.samples] == [0, 1, 999]
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=f"expected {re.escape(str(tmp_path / 'empty' / IMAGENET_V2_FOLDER))}"):
        zero_shot_sets(parser.parse_args(["--imagenet-v2", str(tmp_path / "empty")]), World())


def test_skip_scheduler_keeps_lr_from_the_first_step(tmp_path):
    """OpenCLIP's --skip-scheduler never calls the scheduler: --lr from step 1, no warmup."""
    train(*flags(tmp_path, "skip", "--skip-scheduler", "--warmup", 10, samples=12))
    train(*flags(tmp_path, "warm", "--warmup", 10, samples=12))
    assert [r["lr"] for r in metrics(tmp_path / "skip")] == [5e-4] * 3
    assert [r["lr"] for r in metrics(tmp_path / "warm")] == pytest.approx([5e-5, 1e-4, 1.5e-4])


def text_tower(state):
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k != "logit_scale"}


def test_lock_text_names_the_missing_flag_and_with_it_freezes_the_text_tower(tmp_path, capsys):
    """open_clip's built-in text tower locks its LayerNorms with their layers and asserts without
    --lock-text-freeze-layer-norm (OpenCLIP 3.3 dies with that AssertionError): one line naming it."""
    line = error_line(capsys, in_process(main.main, flags(tmp_path, "bad", "--lock-text")))
    assert "--lock-text" in line and "add --lock-text-freeze-layer-norm" in line
    train(*flags(tmp_path, "locked", "--lock-text", "--lock-text-freeze-layer-norm", "--lr", "0.01"))
    train(*flags(tmp_path, "start", "--lr", "0"))
    locked, start = weights(tmp_path / "locked"), weights(tmp_path / "start")
    for key, value in text_tower(start).items():
        assert torch.equal(locked[key], value), key
    assert not torch.equal(locked["visual.conv1.weight"], start["visual.conv1.weight"])


def test_coca_trains_on_openclips_weighted_caption_and_contrastive_loss(tmp_path):
    """CoCa (OpenCLIP's own CPU test trains coca_ViT-B-32): the loss is
    --coca-contrastive-loss-weight x contrastive + --coca-caption-loss-weight x captioning, with
    OpenCLIP's defaults 1 and 2; each run's first loss is taken at the same initial weights."""
    def first_loss(name, *extra):
        train(*flags(tmp_path, name, *extra, model=COCA, samples=4))
        return logged_losses(tmp_path / name)[0]

    contrastive = first_loss("contrastive", "--coca-caption-loss-weight", 0, "--coca-contrastive-loss-weight", 1)
    caption = first_loss("caption", "--coca-caption-loss-weight", 1, "--coca-contrastive-loss-weight", 0)
    assert first_loss("default") == pytest.approx(contrastive + 2 * caption, rel=1e-6)
    assert caption > 0 and contrastive > 0


def test_coca_accumulation_equals_the_larger_batch(tmp_path):
    """Accumulation concatenates every per-sample output, CoCa's caption logits and labels too."""
    train(*flags(tmp_path, "big", model=COCA, samples=8, batch=8))
    train(*flags(tmp_path, "accum", "--accum-freq", 2, model=COCA, samples=8, batch=4))
    assert logged_losses(tmp_path / "big") == pytest.approx(logged_losses(tmp_path / "accum"), rel=1e-5)
    # CoCa's attentional pooler and cross-attention key biases: an lr-sized (5e-4) step of rounding
    assert_same_weights(weights(tmp_path / "big"), weights(tmp_path / "accum"), key_bias_atol=1e-3)


def test_models_our_loss_cannot_take_are_refused_before_anything_runs(tmp_path, capsys):
    config = json.loads(Path(TINY).read_text())
    config["init_logit_bias"] = -10
    (tmp_path / "biased.json").write_text(json.dumps(config))
    line = error_line(capsys, in_process(main.main, flags(tmp_path, "b", model=str(tmp_path / "biased.json"))))
    assert "has a logit_bias (a SigLIP model)" in line and "add --siglip" in line
    line = error_line(capsys, in_process(main.main, flags(tmp_path, "c", "--siglip", model=COCA)))
    assert "is a CoCa model" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["biased.json"]


# ---- weights: --pretrained-image and --pretrained go through the same caches

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding timm's test_resnet weights (random ones, made here)."""
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in timm.create_model("test_resnet").state_dict().items()}
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return state


def test_pretrained_image_loads_the_timm_weights_from_the_cache(hub_cache):
    model = create_model_and_transforms(model_args(TIMM, pretrained_image=True), torch.device("cpu"))[0]
    trunk = model.visual.trunk.state_dict()
    for key, value in hub_cache.items():
        if key in trunk and not key.startswith("fc."):
            assert torch.equal(trunk[key], value), key


def test_pretrained_and_pretrained_image_fail_alike_when_weights_are_neither_cached_nor_downloadable(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tag = error_line(capsys, in_process(main.main, flags(tmp_path, "t", model="ViT-B-32") + [
        "--pretrained", "laion2b_s34b_b79k"]))
    image = error_line(capsys, in_process(main.main, flags(tmp_path, "i", "--pretrained-image", model=TIMM)))
    suffix = "weights neither in the cache nor downloadable"
    assert tag.startswith(f"error: --pretrained laion2b_s34b_b79k: {suffix}")
    assert image.startswith(f"error: --pretrained-image: {suffix}")
    assert "pass a local checkpoint file" in tag and "pass a local checkpoint file" in image
    line = error_line(capsys, in_process(main.main, flags(tmp_path, "v", "--pretrained-image")))
    assert "has no timm image tower" in line  # OpenCLIP 3.3 ignores the flag silently here
    line = error_line(capsys, in_process(main.main, flags(tmp_path, "u", "--pretrained", "no_such_tag")))
    assert "neither a file nor a pretrained tag of tiny-vit" in line


def test_default_precision_is_amp_on_gpus_and_fp32_on_cpus(tmp_path):
    """OpenCLIP's default amp is fp16 autocast + GradScaler: a GPU setting (on this CPU an fp16
    matmul is some 30x slower than fp32; docs/flags in README). Left out, a CPU run is fp32."""
    base = [a for a in map(str, flags(tmp_path, "p")) if a not in ("--precision", "fp32")]
    assert parse_args(base).precision == "fp32"
    assert parse_args(base + ["--precision", "amp"]).precision == "amp"
    assert default_precision("cuda:1") == default_precision("cuda") == "amp"
    assert default_precision("cpu") == "fp32"


def test_use_bn_sync_on_cpu_ranks_is_one_line_before_anything_runs():
    """torch's SyncBatchNorm refuses CPU tensors in its forward; we refuse at start-up instead."""
    with pytest.raises(LayoutError, match="--use-bn-sync: torch's SyncBatchNorm runs on GPUs only"):
        check_layout(World(rank=0, world_size=2, device=torch.device("cpu")), sync_batchnorm=True)
    check_layout(World(device=torch.device("cpu")), sync_batchnorm=True)  # one process: plain BatchNorm


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 GPUs (torch runs it on GPUs only)")
def test_use_bn_sync_on_two_gpus_equals_one_process_on_the_global_batch(tmp_path):
    """With SyncBatchNorm the BatchNorm statistics are those of the global batch, so 2 ranks x 4
    equal 1 GPU x 8 (tiny-rn: OpenCLIP's ModifiedResNet)."""
    gpu = ["--local-loss", "--gather-with-grad", "--use-bn-sync"]
    env = {**cpu_env(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1")}
    run_cli(flags(tmp_path, "one", *gpu, model=RN, samples=16, batch=8, device="cuda"), env=env)
    run_cli(flags(tmp_path, "two", *gpu, model=RN, samples=16, batch=4, device="cuda"), nproc=2, env=env)
    assert logged_losses(tmp_path / "one") == pytest.approx(logged_losses(tmp_path / "two"), rel=1e-4)


# ---- what a user sees

def test_loaded_weights_are_announced_instead_of_random_init(tmp_path, data, capsys):
    """zeroshot --pretrained, hessian --resume and a resumed training run each say which weights
    they loaded (rank 0), never open_clip's "initialized randomly". Each CLI also takes the
    torchrun form's leading `--`."""
    train(*flags(tmp_path, "run"))
    capsys.readouterr()
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    assert in_process(zeroshot.main, ["--", "--model", TINY, "--pretrained", checkpoint, "--zeroshot-data",
                                      data["zeroshot"], "--zeroshot-classnames", data["classnames"],
                                      "--zeroshot-templates", data["templates"], "--workers", 0]) == 0
    assert in_process(hessian.main, ["--", "--model", TINY, "--resume", checkpoint, "--dataset-type", "synthetic",
                                     "--train-num-samples", 8, "--batch-size", 4, "--workers", 0,
                                     "--hessian-num-batches", 1, "--hessian-probes", 1, "--hessian-top-k", 0]) == 0
    out = capsys.readouterr()
    assert out.err.count(f"Loaded weights from {checkpoint}") == 2
    assert "initialized randomly" not in out.err + out.out
    train(*["--", *flags(tmp_path, "run", "--resume", "latest", epochs=2)])
    out = capsys.readouterr()
    assert "initialized randomly" not in out.err + out.out and f"Resumed from {checkpoint}" in out.out


def test_optimizer_losses_are_averaged_over_the_log_window_like_the_loss(tmp_path):
    """SAM's clean_loss / perturbed_loss (and NSO's perturbed_loss) are means over the window's
    steps, as the loss; rho and sigma are the window's last step's."""
    sam = ["--opt", "sam", "--sam-rho", "0.05"]
    train(*flags(tmp_path, "every", *sam, samples=16))
    train(*flags(tmp_path, "pairs", *sam, samples=16, every=2))
    every, pairs = metrics(tmp_path / "every"), metrics(tmp_path / "pairs")
    assert [r["step"] for r in pairs] == [2, 4]
    for key in ("loss", "clean_loss", "perturbed_loss"):
        means = [(every[i][key] + every[i + 1][key]) / 2 for i in (0, 2)]
        assert [r[key] for r in pairs] == pytest.approx(means, rel=1e-6), key
    assert [r["rho"] for r in pairs] == [0.05, 0.05]


def test_params_and_run_settings_show_only_the_settings_a_run_uses(tmp_path):
    train(*flags(tmp_path, "adamw"))
    train(*flags(tmp_path, "nso", "--opt", "nso", "--nso-sigma", "0.02"))
    adamw = (tmp_path / "adamw" / "params.txt").read_text()
    nso = (tmp_path / "nso" / "params.txt").read_text()
    for prefix in ("nso_", "sam_", "coca_", "wandb_", "remote_sync_", "hessian_probes", "lock_text_unlocked"):
        assert f"\n{prefix}" not in adamw, prefix
    assert "\nnso_sigma: 0.02\n" in nso and "\nsam_rho" not in nso and "\nhessian_frequency: 0\n" in adamw
    markdown = report.write_report([tmp_path / "adamw", tmp_path / "nso"], tmp_path / "report").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| nso_sigma |"))
    assert row == "| nso_sigma | n/a | 0.02 |"


def test_progress_bars_and_log_lines_do_not_interleave(tmp_path, data, capsys):
    """A warning logged while a zero-shot bar is drawn lands on its own line above the bar."""
    shutil.copytree(data["zeroshot"], tmp_path / "kinds")
    (tmp_path / "kinds" / "0" / "broken.png").write_bytes(b"not an image")
    assert in_process(zeroshot.main, ["--model", TINY, "--zeroshot-data", tmp_path / "kinds", "--zeroshot-classnames",
                                      data["classnames"], "--zeroshot-templates", data["templates"], "--workers", 0,
                                      "--batch-size", 1]) == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "skipped unreadable image" in line)
    assert re.match(r"^\d{4}-\d\d-\d\d,[\d:]+ \| WARNING \| --zeroshot-data: skipped unreadable image", warning), warning
    assert "zero-shot" in err  # the bar was drawn


def test_hessian_reads_shards_without_epoch_size_or_a_shard_per_worker(tmp_path, data, capsys):
    """One shard, no sizes.json, --workers 4, no --train-num-samples: the Hessian CLI reads its
    batch anyway, the same batch as with an explicit epoch size and one worker."""
    shard = Path(data["shards"].split("{")[0] + "000000.tar")
    (tmp_path / "one").mkdir()
    shutil.copy(shard, tmp_path / "one" / "0.tar")
    common = ["--model", TINY, "--train-data", tmp_path / "one" / "0.tar", "--dataset-type", "webdataset",
              "--batch-size", 4, "--hessian-num-batches", 1, "--hessian-probes", 2, "--hessian-top-k", 0]
    assert in_process(hessian.main, common + ["--workers", 4]) == 0
    implicit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert in_process(hessian.main, common + ["--workers", 1, "--train-num-samples", 4]) == 0
    explicit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert implicit["trace"] == explicit["trace"] and implicit["settings"]["batch_size"] == 4


def test_comma_csv_without_csv_separator_suggests_the_flag(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "comma.csv").write_text(f"filepath,title\n{image},a square\n")
    code = shards.main(["--", "--csv", str(tmp_path / "comma.csv"), "--output", str(tmp_path / "out")])
    assert "the header looks comma-separated: pass --csv-separator ','" in error_line(capsys, code)
    code = in_process(main.main, flags(tmp_path, "c")[2:] + ["--train-data", tmp_path / "comma.csv",
                                                             "--dataset-type", "csv"])
    assert "the header looks comma-separated: pass --csv-separator ','" in error_line(capsys, code)
    assert shards.main(["--csv", str(tmp_path / "comma.csv"), "--csv-separator", ",",
                        "--output", str(tmp_path / "out")]) == 0


def test_every_cli_takes_the_torchrun_forms_leading_separator(tmp_path, capsys):
    assert command_line(["--", "--logs", "x"]) == ["--logs", "x"] and command_line(["--logs", "--"]) == ["--logs", "--"]
    train(*["--", *flags(tmp_path, "run")])
    assert report.main(["--", str(tmp_path / "run"), "--output", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")


def test_docs_and_scripts_use_the_torchrun_form_that_works():
    """torch 2.14's torchrun takes `--logs` for its own --logs-specs unless the module's flags
    follow `-m nsoclip.X --`; every command in the README, docs and scripts uses that form."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "scripts").glob("*.sh"))]
    bad = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torchrun" not in line and "torch.distributed.run" not in line:
                continue
            for match in re.finditer(r"(?:torchrun|torch\.distributed\.run)\s[^`|]*?-m\s+(\S+)(.*)", line):
                module, rest = match.groups()
                if module.startswith("nsoclip") and not re.match(r"\s+--(\s|$)", rest):
                    bad.append(f"{path.name}:{number}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_wandb_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("nsoclip.logger.wandb_available", lambda: False)
    line = error_line(capsys, in_process(main.main, flags(tmp_path, "w", "--report-to", "wandb")))
    assert "wandb is not installed (pip install 'nsoclip[wandb]')" in line
    assert not (tmp_path / "w").exists()
