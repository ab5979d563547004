"""The comparison report: its table shows exactly what the runs recorded, differences follow the
two-standard-error rule both ways, missing pieces read n/a, and the plots are real PNGs."""
import json
import math
import subprocess
import sys

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from helpers import REPO, cpu_env
from nsoclip.report import Estimate, compare, write_report

ADAMW_HESSIAN = {  # as `nsoclip.hessian --hessian-output` writes it
    "trace": 120.0, "stderr": 3.0, "num_probes": 64,
    "per_block": {"visual.blocks.0": 30.0, "visual.blocks.1": 25.0, "visual.other": 5.0,
                  "text.blocks.0": 40.0, "text.other": 15.0, "other": 5.0},
    "per_block_stderr": {"visual.blocks.0": 1.0, "visual.blocks.1": 1.0, "visual.other": 0.5,
                         "text.blocks.0": 2.0, "text.other": 1.0, "other": 0.5},
    "per_tower": {"visual": 60.0, "text": 55.0, "other": 5.0},
    "per_tower_stderr": {"visual": 2.0, "text": 2.5, "other": 0.5},
    "top_eigenvalues": [33.5, 20.0],
    "bottom_eigenvalues": [-4.0, -1.5],
    "density": {"ritz_values": [[-4.0, 33.5]], "weights": [[0.5, 0.5]], "grid": [-5.0, 0.0, 15.0, 35.0],
                "density": [0.01, 0.2, 0.0, 0.05]},
    "landscape": {"dims": 1, "directions": "random", "coordinates": [-1.0, 0.0, 1.0], "loss": [3.0, 2.0, 3.5]},
    "noise_stability": [{"sigma": 0.01, "mean": 0.5, "stderr": 0.1, "num_draws": 8},
                        {"sigma": 0.02, "mean": 2.0, "stderr": 0.2, "num_draws": 8}],
    "settings": {"model": "tiny", "global_batch_size": 16},
}
NSO_HESSIAN = {  # the brief's layout: noise stability keyed by sigma, towers to be summed from blocks
    "trace": 100.0, "stderr": 4.0,
    "per_block": {"visual.blocks.0": 20.0, "visual.blocks.1": 25.0, "visual.other": 5.0,
                  "text.blocks.0": 35.0, "text.other": 10.0, "other": 5.0},
    "top_eigenvalues": [30.25],
    "density": {"grid": [-5.0, 0.0, 15.0, 35.0], "density": [0.02, 0.1, 0.01, 0.03]},
    "landscape": {"dims": 2, "directions": "eigen", "coordinates": [-1.0, 0.0, 1.0],
                  "loss": [[4.0, 3.0, 4.5], [3.0, 2.0, 3.5], [5.0, 4.0, 5.5]]},
    "noise_stability": {"0.01": {"mean": 0.45, "stderr": 0.1}, "0.02": {"mean": 1.2, "stderr": 0.2}},
}


def write_run(run_dir, *, results=(), scalars=None, hessian=None, params=None):
    run_dir.mkdir(parents=True)
    if results:
        (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    for events in scalars or []:  # one SummaryWriter per (re)start of the run
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        for tag, points in events.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()
    if hessian is not None:
        (run_dir / "hessian-epoch_2.json").write_text(json.dumps(hessian))
    if params:
        (run_dir / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in params.items()))
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    adamw = write_run(
        root / "adamw",
        results=[{"epoch": 1, "step": 10, "imagenet-zeroshot-val-top1": 0.25, "clip_val_loss": 3.5},
                 {"epoch": 2, "step": 20, "imagenet-zeroshot-val-top1": 0.375, "clip_val_loss": 3.25,
                  "hessian/trace": 999.0}],
        scalars=[{"train/loss": [(5, 4.0), (10, 3.5), (15, 3.0)], "train/step_time": [(5, 9.0), (10, 1.5)]},
                 # requeued after step 10: steps 15 and 20 logged by the restarted job win
                 {"train/loss": [(15, 2.75), (20, 2.5)], "train/step_time": [(15, 1.5), (20, 1.5)]}],
        hessian=ADAMW_HESSIAN,
        params={"model": "tiny-vit", "opt": "adamw", "lr": "0.001", "batch_size": "8", "name": "adamw"})
    nso = write_run(
        root / "nso",
        results=[{"epoch": 1, "step": 10, "imagenet-zeroshot-val-top1": 0.3125},
                 {"epoch": 2, "step": 20, "imagenet-zeroshot-val-top1": 0.4375}],
        scalars=[{"train/loss": [(10, 3.75), (20, 2.625)], "train/step_time": [(10, 9.0), (15, 3.0), (20, 3.5)]}],
        hessian=NSO_HESSIAN,
        params={"model": "tiny-vit", "opt": "nso", "nso_sigma": "0.01", "lr": "0.001", "batch_size": "8"})
    bare = write_run(root / "bare", params={"model": "tiny-vit", "opt": "sam"})
    output = root / "report"
    path = write_report([adamw, nso, bare], output, commands={"adamw": ["torchrun", "-m", "nsoclip.main", "--opt", "adamw"]},
                        settings={"steps": 20, "ranks": 2})
    return path, path.read_text()


def table_rows(markdown, heading):
    """{first cell: {column: cell}} of the first table after `## heading`."""
    lines = markdown.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    header, _, *rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[start:end]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_summary_table_shows_what_was_recorded(report):
    _, markdown = report
    rows = table_rows(markdown, "Summary")
    assert rows["adamw"]["imagenet zero-shot top-1 (last)"] == "37.50%"
    assert rows["nso"]["imagenet zero-shot top-1 (last)"] == "43.75%"
    assert rows["adamw"]["final training loss"] == "2.5"  # the restarted job's value for step 20
    assert rows["nso"]["final training loss"] == "2.625"
    assert rows["adamw"]["clip val loss (last)"] == "3.25" and rows["nso"]["clip val loss (last)"] == "n/a"
    # Step time: the first (warm-up) window left out, then mean ± standard error.
    assert rows["adamw"]["wall time per step (s)"] == "1.5 ± 0"
    assert rows["nso"]["wall time per step (s)"] == "3.25 ± 0.25"
    assert all(rows["bare"][column] == "n/a" for column in rows["bare"] if column != "Run")


def test_flatness_table_shows_what_was_measured(report):
    _, markdown = report
    rows = table_rows(markdown, "Flatness")
    adamw, nso, bare = rows["adamw"], rows["nso"], rows["bare"]
    assert (adamw["Hessian trace"], adamw["visual trace"], adamw["text trace"], adamw["other trace"]) == (
        "120 ± 3", "60 ± 2", "55 ± 2.5", "5 ± 0.5")
    assert (adamw["top eigenvalue"], adamw["noise stability σ=0.01"], adamw["noise stability σ=0.02"]) == (
        "33.5", "0.5 ± 0.1", "2 ± 0.2")
    assert adamw["smallest eigenvalue"] == "-4" and nso["smallest eigenvalue"] == "n/a"
    assert adamw["source"] == "hessian-epoch_2.json"  # the JSON, not the training-time trace in results.jsonl
    # Towers summed from the blocks by name prefix, without an error bar.
    assert (nso["Hessian trace"], nso["visual trace"], nso["text trace"], nso["other trace"]) == (
        "100 ± 4", "50 ± n/a", "45 ± n/a", "5 ± n/a")
    assert (nso["top eigenvalue"], nso["noise stability σ=0.01"], nso["noise stability σ=0.02"]) == (
        "30.25", "0.45 ± 0.1", "1.2 ± 0.2")
    assert all(bare[column] == "n/a" for column in bare if column != "Run")


def test_comparisons_follow_the_two_standard_error_rule(report):
    _, markdown = report
    # trace: -20 ± 5 -> significant; noise stability at 0.01: -0.05 ± 0.14 -> not; at 0.02: -0.8 ± 0.28 -> significant
    assert "- nso vs adamw Hessian trace difference: -20 ± 5 (significant: nso is lower)" in markdown
    assert "- nso vs adamw noise stability (σ=0.01) difference: -0.05 ± 0.14 (not significant)" in markdown
    assert "- nso vs adamw noise stability (σ=0.02) difference: -0.8 ± 0.28 (significant: nso is lower)" in markdown
    assert "- nso vs adamw visual trace difference: -10 ± n/a (no error bar: not tested)" in markdown
    assert "wall time per step difference" not in markdown  # not interleaved: no verdict
    assert "- bare vs adamw Hessian trace difference: n/a (missing in bare)" in markdown


@pytest.mark.parametrize("base,other,verdict", [
    (Estimate(100.0, 3.0), Estimate(110.0, 4.0), "not significant"),  # exactly 2 combined se: not more
    (Estimate(100.0, 3.0), Estimate(110.5, 4.0), "significant: b is higher"),
    (Estimate(100.0, 3.0), Estimate(89.5, 4.0), "significant: b is lower"),
    (Estimate(100.0, 0.0), Estimate(100.0, 0.0), "not significant"),
])
def test_compare_rule(base, other, verdict):
    line = compare("trace", "a", base, "b", other)
    assert line.endswith(f"({verdict})")
    assert f"± {math.hypot(base.stderr, other.stderr):.2g} (" in line


def test_plots_are_valid_pngs(report):
    path, markdown = report
    for name in ("train_loss.png", "zeroshot_accuracy.png", "hessian_blocks.png", "hessian_density.png",
                 "landscape_1d.png", "landscape_2d.png"):
        assert f"]({name})" in markdown
        with Image.open(path.parent / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            image.verify()


def test_commands_and_settings_are_recorded(report):
    _, markdown = report
    assert "```bash\ntorchrun -m nsoclip.main --opt adamw\n```" in markdown
    assert table_rows(markdown, "Settings") == {"steps": {"setting": "steps", "value": "20"},
                                                "ranks": {"setting": "ranks", "value": "2"}}
    settings = table_rows(markdown, "Run settings (params.txt)")
    assert settings["opt"] == {"setting": "opt", "adamw": "adamw", "nso": "nso", "bare": "sam"}
    assert settings["nso_sigma"]["adamw"] == "n/a" and settings["nso_sigma"]["nso"] == "0.01"
    assert "name" not in settings


def test_cli_prints_the_report_path_last_and_handles_missing_plots(tmp_path):
    only_hessian = write_run(tmp_path / "run", hessian={"trace": 7.0})
    result = subprocess.run([sys.executable, "-m", "nsoclip.report", str(only_hessian), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=cpu_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "out" / "report.md"
    assert result.stdout.splitlines()[-1] == str(report)
    markdown = report.read_text()
    assert table_rows(markdown, "Flatness")["run"]["Hessian trace"] == "7 ± n/a"
    assert "Training loss vs step: n/a (no train/loss scalars or metrics.jsonl losses in any run)" in markdown
    assert "Hessian eigenvalue density: n/a (no density in any run)" in markdown
    assert "Loss landscape, 2d: n/a (no 2d landscape in any run)" in markdown
    assert "Comparisons" in markdown and "n/a (one run)" in markdown
    assert not (tmp_path / "out" / "train_loss.png").exists()


def test_training_time_hessian_is_used_without_a_json(tmp_path):
    run = write_run(tmp_path / "run", results=[
        {"epoch": 1, "step": 5, "hessian/trace": 12.0, "hessian/trace_stderr": 0.5, "hessian/trace_visual": 8.0,
         "hessian/top_eigenvalue": 3.0}])
    rows = table_rows(write_report([run], tmp_path / "out").read_text(), "Flatness")
    assert (rows["run"]["Hessian trace"], rows["run"]["visual trace"], rows["run"]["top eigenvalue"],
            rows["run"]["source"]) == ("12 ± 0.5", "8 ± n/a", "3", "results.jsonl (epoch 1)")


def test_standalone_zeroshot_json_counts_as_the_last_evaluation(tmp_path):
    run = write_run(tmp_path / "run", results=[{"epoch": 1, "step": 5, "imagenet-zeroshot-val-top1": 0.25}])
    (run / "zeroshot-imagenet-epoch_1.json").write_text(json.dumps({"imagenet-zeroshot-val-top1": 0.5,
                                                                     "imagenet-zeroshot-val-top5": 0.75}))
    report = write_report([run], tmp_path / "out")
    assert table_rows(report.read_text(), "Summary")["run"]["imagenet zero-shot top-1 (last)"] == "50.00%"
    assert (tmp_path / "out" / "zeroshot_accuracy.png").exists()  # the per-epoch record is still plotted


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "no such run folder"),
    (lambda d: d.mkdir(), "no results.jsonl, metrics.jsonl, tensorboard/ events, hessian*.json, zeroshot*.json or "
                          "params.txt"),
    (lambda d: (d.mkdir(), (d / "results.jsonl").write_text('{"epoch": 1}\n{oops\n')), "results.jsonl:2: not a JSON object"),
    (lambda d: (d.mkdir(), (d / "hessian.json").write_text("[1,")), "hessian.json: not valid JSON"),
])
def test_unreadable_run_is_one_clear_error(tmp_path, make, message):
    run = tmp_path / "run"
    make(run)
    result = subprocess.run([sys.executable, "-m", "nsoclip.report", str(run), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=cpu_env(), cwd=REPO)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- runs repeated over seeds, compute-matched runs ---------------------------------------

SEED_RUNS = {  # name: (params that differ, zero-shot top-1, final loss, Hessian trace, training FLOPs)
    "adamw-seed0": ({"opt": "adamw", "seed": "0"}, 0.50, 3.0, 100.0, 1.0e12),
    "adamw-seed1": ({"opt": "adamw", "seed": "1"}, 0.54, 3.1, 120.0, 1.0e12),
    "nso-seed0": ({"opt": "nso", "seed": "0"}, 0.70, 3.3, 80.0, 2.0e12),
    "nso-seed1": ({"opt": "nso", "seed": "1"}, 0.74, 3.4, 84.0, 2.0e12),
    "nso-wide": ({"opt": "nso", "nso_sigma": "0.02", "seed": "0"}, 0.60, 3.2, 70.0, 2.0e12),
    "adamw-2x-steps": ({"opt": "adamw", "epochs": "4", "seed": "0"}, 0.65, 2.9, 130.0, 2.06e12),
}


def write_seed_run(root, name, params, top1, loss, trace, flops):
    run = write_run(root / name, results=[{"epoch": 2, "step": 20, "digits-zeroshot-val-top1": top1,
                                           "train_flops": flops}],
                    hessian={"trace": trace, "stderr": 1.0},
                    params={"model": "tiny", "opt": "adamw", "nso_sigma": "0.01", "epochs": "2", "lr": "0.001",
                            "name": name, "logs": f"/logs/{name}", **params})
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": step, "loss": loss + (20 - step) / 10, "train_flops": flops * step / 20}) + "\n" for step in (10, 20)))
    return run


@pytest.fixture(scope="module")
def seed_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    runs = [write_seed_run(root, name, *values) for name, values in SEED_RUNS.items()]
    path = write_report(runs, root / "report")
    return path, path.read_text()


def test_runs_differing_only_in_seed_are_grouped_with_mean_and_standard_error(seed_report):
    _, markdown = seed_report
    rows = table_rows(markdown, "Seeds")
    assert list(rows) == ["adamw", "nso", "nso-wide", "adamw-2x-steps"]
    assert rows["adamw"]["runs"] == "adamw-seed0, adamw-seed1"
    # mean ± s / sqrt(n): top-1 (50, 54) -> 52 ± 2; loss (3.0, 3.1) -> 3.05 ± 0.05; trace (100, 120) -> 110 ± 10
    assert rows["adamw"]["digits zero-shot top-1"] == "52% ± 2% (n=2)"
    assert rows["adamw"]["final training loss"] == "3.05 ± 0.05 (n=2)"
    assert rows["adamw"]["Hessian trace"] == "110 ± 10 (n=2)"
    assert rows["nso"]["Hessian trace"] == "82 ± 2 (n=2)"
    assert rows["nso-wide"]["digits zero-shot top-1"] == "60% (n=1)"
    assert rows["nso"]["training FLOPs (mean)"] == "2e+12"


def test_seed_level_significance_follows_welch(seed_report):
    """With 2 seeds each: top-1 +20 ± 2.8 points on ~2 df needs 4.30 x 2.8 = 12.2: significant.
    Loss +0.3 ± 0.071 exceeds two errors (0.14) but not 4.30 x 0.071 = 0.304: not significant.
    Trace -28 ± 10.2 on 1.08 df (one seed pair is far noisier) needs 12.71 x 10.2: not significant."""
    _, markdown = seed_report
    assert ("- nso vs adamw digits zero-shot top-1 difference: +20 ± 2.8 points "
            "(threshold 12.2, 2 df; significant: nso is higher)") in markdown
    assert ("- nso vs adamw final training loss difference: +0.3 ± 0.071 "
            "(threshold 0.304, 2 df; not significant)") in markdown
    assert ("- nso vs adamw Hessian trace difference: -28 ± 10 "
            "(threshold 130, 1.1 df; not significant)") in markdown
    assert "- nso-wide vs adamw Hessian trace difference: n/a (needs two seeds in both; 2 and 1)" in markdown


def test_compute_matched_runs_are_marked(seed_report):
    path, markdown = seed_report
    rows = table_rows(markdown, "Summary")
    # 2.06e12 is within 5% of 2e12; seeds of one setting are not listed as each other's match.
    assert rows["nso-seed0"]["compute-matched with"] == "nso-wide, adamw-2x-steps"
    assert rows["adamw-2x-steps"]["compute-matched with"] == "nso-seed0, nso-seed1, nso-wide"
    assert rows["adamw-seed0"]["compute-matched with"] == "none"
    assert rows["adamw-seed0"]["training FLOPs"] == "1e+12"
    assert rows["adamw-seed0"]["final training loss"] == "3"  # metrics.jsonl's last loss (no TensorBoard)
    for name in ("train_loss_flops.png", "zeroshot_accuracy_flops.png"):
        assert f"]({name})" in markdown
        with Image.open(path.parent / name) as image:
            assert image.format == "PNG"


def test_no_seed_groups_reads_na(report):
    _, markdown = report
    assert "## Seeds" in markdown and "n/a (no two runs differ only in seed)" in markdown


def test_loss_at_the_final_weights_sits_beside_the_training_loss_and_a_difference_names_the_confound(tmp_path):
    """nsoclip.hessian records L(w) with its noise stability: the report shows it (for NSO the
    training loss is the mean at w ± e, not L(w)), and when two runs end at different L(w) the
    comparison says the higher one is also less trained."""
    def hessian(loss):
        return {"trace": 100.0, "stderr": 4.0, "top_eigenvalues": [30.0],
                "noise_stability": [{"sigma": 0.01, "mean": 0.4, "stderr": 0.1, "num_draws": 8, "loss": loss}]}

    adamw = write_run(tmp_path / "adamw", scalars=[{"train/loss": [(10, 2.9)]}], hessian=hessian(2.890))
    nso = write_run(tmp_path / "nso", scalars=[{"train/loss": [(10, 3.05)]}], hessian=hessian(3.014))
    same = write_run(tmp_path / "same", scalars=[{"train/loss": [(10, 2.95)]}], hessian=hessian(2.890))
    markdown = write_report([adamw, nso, same], tmp_path / "report").read_text()
    rows = table_rows(markdown, "Summary")
    assert rows["nso"]["final training loss"] == "3.05" and rows["nso"]["loss at the final weights"] == "3.014"
    assert rows["adamw"]["loss at the final weights"] == "2.89"
    comparisons = markdown.split("## Comparisons", 1)[1].split("## Plots", 1)[0]
    assert ("- loss at the final weights: nso 3.014 vs adamw 2.89: nso is also less trained than adamw. A "
            "less-fitted model can be flatter") in comparisons
    assert "same 2.89 vs adamw" not in comparisons  # equal losses: nothing to caution about
