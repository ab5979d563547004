"""Compute accounting (nsoclip.compute) and the kinds of steps, through the training CLI: FLOPs
against an analytic count, NSO's passes against AdamW's, the BatchNorm statistics pass counted
as a forward, cumulative counters in metrics.jsonl, out.log, TensorBoard and results.jsonl, and
--nso-every / --nso-start-step resumed mid-run equal to the uninterrupted run."""
import json

import open_clip
import pytest
import torch
from PIL import Image

from helpers import CONFIGS, TINY, in_process, loop_closure, read_jsonl, weights
from nsoclip.compute import ComputeMeter
from nsoclip.main import main
from nsoclip.model import resolve_model_name
from nsoclip.report import read_scalars

TINY_RN = str(CONFIGS / "tiny-rn.json")
COUNTERS = ("forward_passes", "backward_passes", "samples_seen", "train_flops")


def analytic_training_flops(config: dict, batch: int) -> int:
    """6 FLOPs per multiply-accumulate of every matrix product (2 forward, 4 backward) of a ViT
    CLIP: patch embedding, per block QKV, attention scores and values, output projection and the
    4x MLP, both projections, and the two B x B logit matrices of the loss."""
    vision, text, dim = config["vision_cfg"], config["text_cfg"], config["embed_dim"]

    def transformer(tokens, width, layers):
        return layers * (tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width
                         + 2 * tokens * width * 4 * width)

    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    image = (patches * 3 * vision["patch_size"] ** 2 * vision["width"]
             + transformer(patches + 1, vision["width"], vision["layers"]) + vision["width"] * dim)
    caption = transformer(text["context_length"], text["width"], text["layers"]) + text["width"] * dim
    return 6 * batch * (image + caption + 2 * batch * dim)


def test_measured_flops_are_within_ten_percent_of_the_analytic_count():
    config = json.loads((CONFIGS / "tiny-vit.json").read_text())
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(TINY), output_dict=True)
    batch = [(torch.randn(8, 3, 32, 32), torch.randint(0, 49408, (8, 16)))]
    meter = ComputeMeter()
    closure = meter.counting(loop_closure(model, batch), shapes="b8", ranks=1)
    closure()
    analytic = analytic_training_flops(config, 8)
    measured = meter.totals()["train_flops"]
    assert abs(measured / analytic - 1) < 0.10, (measured, analytic)
    closure(backward=False)
    forward = meter.totals()["train_flops"] - measured
    assert abs(forward / (analytic / 3) - 1) < 0.10, (forward, analytic / 3)
    closure()  # measured once per kind: later calls add the same count
    assert meter.totals() == {"forward_passes": 3, "backward_passes": 2, "samples_seen": 0,
                              "train_flops": 2 * measured + forward}
    two_ranks = ComputeMeter()
    two_ranks.counting(loop_closure(model, batch), shapes="b8", ranks=2)()
    assert two_ranks.totals()["train_flops"] == 2 * measured


def train_flags(logs, name, *extra, model=TINY, samples=16, epochs=1):
    return ["--dataset-type", "synthetic", "--train-num-samples", samples, "--model", model, "--batch-size", 4,
            "--epochs", epochs, "--workers", 0, "--device", "cpu", "--precision", "fp32", "--logs", logs,
            "--name", name, "--warmup", 2, "--log-every-n-steps", 1, "--seed", 3, "--report-to", "tensorboard",
            *extra]


@pytest.fixture(scope="module")
def zeroshot_flags(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    for label in range(2):
        (root / "set" / str(label)).mkdir(parents=True)
        Image.new("RGB", (32, 32), (100 * label, 60, 90)).save(root / "set" / str(label) / "a.png")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "templates.txt").write_text("a photo of a {}.\n")
    return ["--zeroshot-data", root / "set", "--zeroshot-classnames", root / "classes.txt",
            "--zeroshot-templates", root / "templates.txt", "--zeroshot-frequency", 1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, zeroshot_flags):
    logs = tmp_path_factory.mktemp("runs")
    nso = ["--opt", "nso", "--nso-sigma", "0.01"]
    for name, extra in {"adamw": [], "nso": nso, "nso-rn": [*nso, "--model", TINY_RN]}.items():
        assert in_process(main, train_flags(logs, name, *zeroshot_flags, *extra)) == 0
    return logs


def test_nso_logs_exactly_twice_the_passes_and_flops_of_adamw(runs):
    adamw, nso = read_jsonl(runs / "adamw" / "metrics.jsonl"), read_jsonl(runs / "nso" / "metrics.jsonl")
    assert [r["step"] for r in adamw] == [r["step"] for r in nso] == [1, 2, 3, 4]
    flops = adamw[0]["train_flops"]
    assert flops > 0
    for a, n in zip(adamw, nso):
        step = a["step"]
        assert (a["forward_passes"], a["backward_passes"], a["train_flops"]) == (step, step, step * flops)
        assert (n["forward_passes"], n["backward_passes"], n["train_flops"]) == (2 * step, 2 * step, 2 * step * flops)
        assert a["samples_seen"] == n["samples_seen"] == 4 * step
        assert (a["perturbed_steps"], n["perturbed_steps"], a["window_steps"]) == (0, 1, 1)


def test_batchnorm_statistics_pass_counts_as_a_forward(runs):
    """NSO with lam = 0 on a BatchNorm model: two perturbed forward/backward passes plus one
    forward at w for the running statistics."""
    records = read_jsonl(runs / "nso-rn" / "metrics.jsonl")
    assert [(r["forward_passes"], r["backward_passes"]) for r in records] == [(3 * s, 2 * s) for s in range(1, 5)]
    per_step = records[0]["train_flops"]
    assert [r["train_flops"] for r in records] == [s * per_step for s in range(1, 5)]
    assert "clean_loss" in records[0]  # the statistics pass gives the loss at w


def test_counters_reach_results_jsonl_out_log_and_tensorboard(runs):
    for name in ("adamw", "nso"):
        last = read_jsonl(runs / name / "metrics.jsonl")[-1]
        [result] = read_jsonl(runs / name / "results.jsonl")
        assert "set-zeroshot-val-top1" in result
        assert {key: result[key] for key in COUNTERS} == {key: last[key] for key in COUNTERS}
        log = (runs / name / "out.log").read_text()
        assert f"train_flops: {last['train_flops']}" in log and "perturbed_steps:" in log
        scalars = read_scalars(runs / name / "tensorboard")
        assert [value for _, value in scalars["train/forward_passes"]] == [r["forward_passes"] for r in
                                                                           read_jsonl(runs / name / "metrics.jsonl")]


RESUMED_KEYS = ("loss", "perturbed_steps", "sigma", "clean_loss", "perturbed_loss", *COUNTERS)


def test_every_and_start_step_resume_mid_run_exactly(tmp_path):
    """Steps t = 1, 3, 5, 7 perturbed (S = 1, N = 2); a run stopped after epoch 1 of 2 and resumed
    continues the step kinds, the noise, the weights and the counters exactly."""
    schedule = ["--opt", "nso", "--nso-sigma", "0.02", "--nso-every", 2, "--nso-start-step", 1,
                "--nso-noise-scale", "filter", "--lr-scheduler", "const"]
    assert in_process(main, train_flags(tmp_path, "straight", *schedule, epochs=2)) == 0
    assert in_process(main, train_flags(tmp_path, "resumed", *schedule, epochs=1)) == 0
    first_epoch = tmp_path / "resumed" / "checkpoints" / "epoch_1.pt"
    assert in_process(main, train_flags(tmp_path, "resumed", *schedule, "--resume", first_epoch, epochs=2)) == 0
    straight, resumed = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("straight", "resumed"))
    assert [r["perturbed_steps"] for r in straight] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [r["forward_passes"] for r in straight] == [1, 3, 4, 6, 7, 9, 10, 12]
    assert len(resumed) == 8
    for a, b in zip(straight, resumed):
        assert {k: a.get(k) for k in RESUMED_KEYS} == {k: b.get(k) for k in RESUMED_KEYS}, a["step"]
    final_a, final_b = weights(tmp_path / "straight", "epoch_2.pt"), weights(tmp_path / "resumed", "epoch_2.pt")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
