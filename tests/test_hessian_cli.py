"""`python -m nsoclip.hessian`: the JSON report from a checkpoint, TensorBoard scalars, torchrun
with 2 ranks equal to 1 process on the same global batches, and one-line errors for bad input."""
import json
import math

import open_clip
import pytest
import torch

from helpers import CONFIGS, run_cli
from nsoclip.checkpoint import save_checkpoint
from nsoclip.hessian import main
from nsoclip.model import resolve_model_name

TINY = str(CONFIGS / "tiny-vit.json")


def common_flags(tmp, batch_size: int):
    return ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", "16", "--workers", "0",
            "--device", "cpu", "--batch-size", str(batch_size), "--hessian-num-batches", "2",
            "--hessian-probes", "4", "--hessian-top-k", "1", "--hessian-max-iter", "4", "--seed", "3",
            "--resume", str(tmp / "model.pt"), "--reference-checkpoint", str(tmp / "initial.pt"),
            "--noise-stability-sigmas", "0.001,0.01", "--noise-stability-draws", "2"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One in-process run with every output switched on; the tests below read its report."""
    tmp = tmp_path_factory.mktemp("hessian_cli")
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(TINY), output_dict=True)
    save_checkpoint({"state_dict": model.state_dict(), "step": 7}, tmp / "initial.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 7},
                    tmp / "model.pt")
    flags = common_flags(tmp, 4) + ["--hessian-output", str(tmp / "report.json"), "--report-to", "tensorboard",
                                    "--logs", str(tmp / "run")]
    assert main(flags) == 0
    return {"tmp": tmp, "report": json.loads((tmp / "report.json").read_text()), "model": model}


def test_report_contents(single_run):
    report, model, tmp = single_run["report"], single_run["model"], single_run["tmp"]
    settings = report["settings"]
    assert settings["world_size"] == 1 and settings["global_batch_size"] == 4 and settings["num_batches"] == 2
    assert settings["checkpoint"] == str(tmp / "model.pt") and settings["seed"] == 3
    assert math.isclose(settings["logit_scale"], model.logit_scale.exp().item(), rel_tol=1e-6)
    assert report["num_hvps"] == 4 and math.isfinite(report["trace"]) and report["stderr"] > 0
    assert set(report["per_tower"]) == {"visual", "text", "other"}
    assert {"visual.blocks.0", "visual.blocks.1", "text.blocks.0", "text.blocks.1"} <= set(report["per_block"])
    for key in ("per_param", "per_block", "per_tower"):
        assert math.isclose(sum(report[key].values()), report["trace"], rel_tol=1e-6, abs_tol=1e-6)
    assert len(report["top_eigenvalues"]) == 1
    assert [entry["sigma"] for entry in report["noise_stability"]] == [0.001, 0.01]
    initial = torch.load(tmp / "initial.pt", weights_only=True)["state_dict"]
    distance = math.sqrt(sum((p.detach() - initial[n]).pow(2).sum().item() for n, p in model.named_parameters()))
    assert math.isclose(report["reference"]["norm"], distance, rel_tol=1e-5)
    assert math.isclose(report["reference"]["rayleigh_quotient"] * distance ** 2, report["reference"]["curvature"],
                        rel_tol=1e-6)
    assert list((tmp / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(single_run):
    """Same global batches (the data hands rank r the r-th slice of each global batch): the
    2-rank report equals the 1-process one up to float summation order."""
    tmp = single_run["tmp"]
    result = run_cli(common_flags(tmp, 2) + ["--hessian-output", str(tmp / "report2.json")], nproc=2,
                     module="nsoclip.hessian")
    two = json.loads((tmp / "report2.json").read_text())
    one = single_run["report"]
    assert two["settings"]["world_size"] == 2 and two["settings"]["global_batch_size"] == 4
    assert math.isclose(two["trace"], one["trace"], rel_tol=1e-4)
    assert math.isclose(two["top_eigenvalues"][0], one["top_eigenvalues"][0], rel_tol=1e-4)
    assert math.isclose(two["reference"]["curvature"], one["reference"]["curvature"], rel_tol=1e-4)
    for a, b in zip(two["noise_stability"], one["noise_stability"]):
        assert math.isclose(a["mean"], b["mean"], rel_tol=1e-3, abs_tol=1e-6)
    assert result.stdout.count('"trace"') == 1  # only rank 0 reports


def test_bad_input_exits_2_with_one_line(single_run, tmp_path, capsys):
    torch.manual_seed(0)
    micro = open_clip.create_model(resolve_model_name(str(CONFIGS / "micro-vit.json")), output_dict=True)
    save_checkpoint({"state_dict": micro.state_dict()}, tmp_path / "micro.pt")
    base = common_flags(single_run["tmp"], 4)
    cases = [
        (base + ["--resume", str(tmp_path / "micro.pt")], "does not match the model"),
        (base + ["--hessian-probes", "0"], "--hessian-probes 0"),
        (base + ["--batch-size", "32"], "global batch"),  # 16 samples: zero batches
        (base + ["--hessian-num-batches", "9"], "has only 4 batches"),
        (base + ["--noise-stability-sigmas", "0.01,-1"], "every sigma must be > 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error: ")]  # after the log lines, if any
        assert len(errors) == 1 and err[-1] == errors[0] and message in errors[0], err
        assert not any("Traceback" in line for line in err), err


def test_progress_bars_count_products(single_run, capsys):
    """Rank 0's bars count Hessian-vector products (graphs are shared, so loss evaluations
    would undercount the work) and reach their totals."""
    assert main(common_flags(single_run["tmp"], 4)) == 0
    err = capsys.readouterr().err
    assert "trace (products)" in err and "4/4" in err
    assert "noise stability (losses)" in err and "9/9" in err
