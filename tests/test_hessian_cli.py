"""`python -m nsoclip.hessian`: the JSON report from a checkpoint, TensorBoard scalars, torchrun
with 2 ranks equal to 1 process on the same global batches, one-line errors for bad input, and
evaluations interrupted by SIGTERM / SIGKILL that resume bit-identical."""
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import open_clip
import pytest
import torch

from helpers import CONFIGS, cpu_env, in_process, python_command, run_cli
from nsoclip.checkpoint import save_checkpoint
from nsoclip.hessian import main
from nsoclip.model import resolve_model_name

TINY = str(CONFIGS / "tiny-vit.json")


def common_flags(tmp, batch_size: int):
    return ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", "16", "--workers", "0",
            "--device", "cpu", "--batch-size", str(batch_size), "--hessian-num-batches", "2",
            "--hessian-probes", "4", "--hessian-top-k", "1", "--hessian-max-iter", "4", "--seed", "3",
            "--resume", str(tmp / "model.pt"), "--reference-checkpoint", str(tmp / "initial.pt"),
            "--noise-stability-sigmas", "0.001,0.01", "--noise-stability-draws", "2", "--hessian-bottom-k", "1",
            "--hessian-density", "--hessian-density-probes", "1", "--hessian-density-steps", "3"]


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
    assert len(report["top_eigenvalues"]) == 1 and len(report["bottom_eigenvalues"]) == 1
    assert report["bottom_eigenvalues"][0] < report["top_eigenvalues"][0]
    density = report["density"]
    assert len(density["ritz_values"]) == len(density["weights"]) == 1 and len(density["ritz_values"][0]) == 3
    assert sum(density["weights"][0]) == pytest.approx(1) and len(density["grid"]) == len(density["density"])
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
    assert math.isclose(two["bottom_eigenvalues"][0], one["bottom_eigenvalues"][0], rel_tol=1e-4)
    assert two["density"]["ritz_values"][0] == pytest.approx(one["density"]["ritz_values"][0], rel=1e-4, abs=1e-2)
    assert math.isclose(two["reference"]["curvature"], one["reference"]["curvature"], rel_tol=1e-4)
    for a, b in zip(two["noise_stability"], one["noise_stability"]):
        assert math.isclose(a["mean"], b["mean"], rel_tol=1e-3, abs_tol=1e-6)
    assert result.stdout.count('"trace"') == 1  # only rank 0 reports
    assert not (tmp / "report2.json.partial").exists()


def finite_difference_flags(tmp, batch_size: int, output: str, *extra):
    return common_flags(tmp, batch_size) + ["--hessian-hvp", "finite_difference", "--landscape", "1d",
                                            "--landscape-points", "3", "--hessian-save-eigenvectors",
                                            str(tmp / f"{output}.pt"), "--hessian-output", str(tmp / f"{output}.json"),
                                            *extra]


@pytest.fixture(scope="module")
def finite_difference_run(single_run):
    """The same evaluation with finite-difference products, in this process."""
    tmp = single_run["tmp"]
    assert main(finite_difference_flags(tmp, 4, "fd")) == 0
    return json.loads((tmp / "fd.json").read_text())


def assert_same_evaluation(report, reference, rel=1e-4):
    """Every number of two finite-difference reports, to float32 rounding."""
    assert math.isclose(report["trace"], reference["trace"], rel_tol=rel)
    for key in ("top_eigenvalues", "bottom_eigenvalues"):
        assert report[key] == pytest.approx(reference[key], rel=rel)
    assert math.isclose(report["reference"]["curvature"], reference["reference"]["curvature"], rel_tol=rel)
    assert report["density"]["ritz_values"][0] == pytest.approx(reference["density"]["ritz_values"][0], rel=rel,
                                                                abs=1e-2)
    for a, b in zip(report["noise_stability"], reference["noise_stability"]):
        assert math.isclose(a["mean"], b["mean"], rel_tol=1e-3, abs_tol=1e-6)
    assert report["landscape"]["loss"] == pytest.approx(reference["landscape"]["loss"], rel=1e-5)


def test_fsdp_layout_in_one_process_equals_the_plain_one(single_run, finite_difference_run):
    """--fsdp on one process (a group of one): the shards are whole, every number is the one of
    the plain layout, and the eigenvector file has the same vectors."""
    tmp = single_run["tmp"]
    assert main(finite_difference_flags(tmp, 4, "fd-fsdp", "--fsdp")) == 0
    report = json.loads((tmp / "fd-fsdp.json").read_text())
    assert report["settings"]["fsdp"] and not finite_difference_run["settings"]["fsdp"]
    assert_same_evaluation(report, finite_difference_run, rel=1e-6)
    fsdp, plain = (torch.load(tmp / f"{name}.pt", weights_only=True) for name in ("fd-fsdp", "fd"))
    torch.testing.assert_close(fsdp["top"], plain["top"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torchrun_fsdp_two_ranks_equal_one_process(single_run, finite_difference_run):
    """torchrun, 2 ranks, --fsdp: finite-difference products on local shards give the numbers of
    one process on the same global batches."""
    tmp = single_run["tmp"]
    run_cli(finite_difference_flags(tmp, 2, "fd-fsdp2", "--fsdp"), nproc=2, module="nsoclip.hessian")
    report = json.loads((tmp / "fd-fsdp2.json").read_text())
    assert report["settings"]["world_size"] == 2 and report["settings"]["fsdp"]
    assert_same_evaluation(report, finite_difference_run, rel=1e-3)
    vectors, plain = (torch.load(tmp / f"{name}.pt", weights_only=True) for name in ("fd-fsdp2", "fd"))
    torch.testing.assert_close(vectors["top"], plain["top"], atol=1e-3, rtol=0)


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
        (base + ["--fsdp"], "--fsdp needs --hessian-hvp finite_difference"),
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


# ---- preemption -------------------------------------------------------------------------------

RESUME_FLAGS = ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", "16", "--workers", "0",
                "--device", "cpu", "--batch-size", "4", "--hessian-num-batches", "1", "--hessian-probes", "16",
                "--hessian-block-size", "2", "--hessian-top-k", "2", "--hessian-bottom-k", "1",
                "--hessian-max-iter", "40", "--hessian-density", "--hessian-density-probes", "2",
                "--hessian-density-steps", "8", "--noise-stability-sigmas", "0.01", "--noise-stability-draws", "2",
                "--landscape", "1d", "--landscape-points", "5", "--hessian-save-eigenvectors", "eig.pt",
                "--hessian-params", "visual", "--hessian-output", "hessian.json"]


def newest_checkpoint(folder: Path):
    """Rank 0's newest saved state in the partial folder, or None."""
    states = []
    for path in folder.glob("rank0.slot*.pt"):
        try:
            states.append(torch.load(path, weights_only=True))
        except (OSError, RuntimeError, EOFError):  # replaced while we read it: look again
            pass
    return max(states, key=lambda state: state["seq"], default=None)


def interrupt(cwd: Path, sig: int, when) -> dict:
    """Run the evaluation in `cwd` as a job and send it `sig` once its newest checkpoint
    satisfies `when`; returns that checkpoint. The job must die of the signal, at once."""
    process = subprocess.Popen(python_command("nsoclip.hessian", RESUME_FLAGS), cwd=cwd, env=cpu_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while True:
            state = newest_checkpoint(cwd / "hessian.json.partial")
            if state is not None and when(state):
                break
            assert process.poll() is None, f"finished before the interruption:\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint came"
            time.sleep(0.005)
        sent = time.monotonic()
        process.send_signal(sig)
        assert process.wait(timeout=30) == -sig
        assert time.monotonic() - sent < 10  # prompt: the default action, no clean-up to wait for
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    return state


def running(stage: str, progressed):
    return lambda state: (state["ongoing"] or {}).get("stage") == stage and progressed(state["ongoing"]["state"])


@pytest.mark.slow
def test_killed_evaluation_resumes_bit_identical(tmp_path, monkeypatch):
    """SIGTERM in the middle of Lanczos (its basis appended row by row), then SIGKILL in the
    second probe of the density: the same command run again each time continues from the
    partial state, and the last run ends with the report and the eigenvectors of an
    uninterrupted run, bit for bit; the partial folder is gone."""
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    whole.mkdir()
    pieces.mkdir()
    monkeypatch.chdir(whole)
    assert in_process(main, RESUME_FLAGS) == 0
    monkeypatch.undo()

    at = interrupt(pieces, signal.SIGTERM, running("top", lambda state: len(state["alphas"]) >= 4))
    assert at["done"] == ["trace"] and at["ongoing"]["state"]["basis"]["rows"] >= 5
    at = interrupt(pieces, signal.SIGKILL, running("density", lambda state: len(state["nodes"]) == 1
                                                     and state["lanczos"] is not None
                                                     and len(state["lanczos"]["alphas"]) >= 2))
    assert at["done"] == ["trace", "top", "bottom"]
    subprocess.run(python_command("nsoclip.hessian", RESUME_FLAGS), cwd=pieces, env=cpu_env(), check=True,
                   capture_output=True)

    assert (pieces / "hessian.json").read_text() == (whole / "hessian.json").read_text()
    resumed, uninterrupted = (torch.load(folder / "eig.pt", weights_only=True) for folder in (pieces, whole))
    assert resumed.keys() == uninterrupted.keys() and {"top", "bottom"} <= set(resumed)
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value) if isinstance(value, torch.Tensor) else resumed[key] == value, key
    assert not (pieces / "hessian.json.partial").exists() and not (whole / "hessian.json.partial").exists()


def test_partial_state_of_another_evaluation_is_refused(tmp_path, monkeypatch, capsys):
    """A partial folder left by other settings is not mixed into this run: one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "hessian.json.partial"
    folder.mkdir()
    torch.save({"settings": {"hessian_probes": 99}, "seq": 3, "done": ["trace"], "ongoing": None},
               folder / "rank0.slot1.pt")
    assert in_process(main, RESUME_FLAGS) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "partial state of another evaluation" in err[0] and "delete the folder" in err[0], err
