"""The GPU check pack on a machine without a GPU: its dry run lists every step within the 8-minute
budget with commands the benchmarks accept, it stops in one line when the GPU or an import is
missing, its runner keeps to its limits and turns the steps' JSON into the table, and the wheel
check finds a missing, doubled or incompatible wheel."""
import json
import shlex
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import REPO
from nsoclip.bench import gpu_check, hessian as bench_hessian, nso as bench_nso, train as bench_train

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def test_dry_run_lists_every_step_within_the_budget(tmp_path):
    result = subprocess.run(["make", "-s", "gpu-check", "DRY=1", f"OUT={tmp_path / 'out'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("wheels", "versions", "tests", "train", "nso", "hessian", "compile", "table"):
        assert any(line.split()[:1] == [name] for line in lines), name
    assert f"output in {tmp_path / 'out'}/" in result.stdout and not (tmp_path / "out").exists()
    steps = gpu_check.plan("python3", tmp_path / "out")
    expected = 10 + sum(step.expected_s for step in steps)
    assert lines[-1] == f"expected about {expected} s ({expected / 60:.1f} min); at most {gpu_check.DEADLINE_S} s"
    assert expected + 15 <= gpu_check.DEADLINE_S <= 8 * 60 - 15  # room for the wheel install and the table
    for step in steps:
        assert shlex.join(step.command) in result.stdout


def test_every_benchmark_command_parses():
    parsers = {"train": bench_train.parse_args, "nso": bench_nso.parse_args, "hessian": bench_hessian.parse_args}
    for step in gpu_check.plan("python3", REPO):
        if step.command[1:3] == ["-m", "nsoclip.bench"]:
            args = parsers[step.command[3]](step.command[4:])
            assert args.device == "cuda"
        else:
            assert step.command[1:5] == ["-m", "pytest", "-m", "gpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_prints_the_versions_and_stops_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    printed = capsys.readouterr()
    assert printed.out.startswith("versions: python ") and " open_clip 3.3.0" in printed.out
    assert printed.err.splitlines() == [
        f"error: no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False)"]
    assert not (tmp_path / "versions.json").exists()


def test_a_failing_import_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # what importing a missing or broken package raises
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot import ftfy: ModuleNotFoundError: import of ftfy halted; None in sys.modules (run `make "
        "gpu-wheels` where PyPI is reachable and carry .whl/)"]


CANNED = {
    "bench-train.json": {"throughput_ratio_nsoclip_over_open_clip": 1.03, "nsoclip_samples_per_s": 3100.0,
                         "open_clip_samples_per_s": 3010.0},
    "bench-nso.json": {"step_time_ratio_nso_over_adamw": 2.1, "step_time_ratio_nso_over_adamw_quartiles": [2.0, 2.2],
                       "extra_peak_param_copies_nso": 0.98,
                       "mfu_adamw": {"mfu": 0.41, "achieved_flops_per_s": 3.2e14, "matmul_flops_per_s": 7.8e14}},
    "bench-hessian.json": {"hvp_cost": [{"hvp_over_gradient_median_of_rounds": {
        "exact_hvp_block": 2.4, "exact_hvp_kept_graph": 2.1, "finite_difference_hvp": 2.01}}]},
    "bench-compile.json": {"speedup_compiled_over_eager": {"adamw": 1.3, "nso": 1.25}, "recompiles_after_warmup": 0,
                           "warmup_epoch_s": {"adamw_compiled": 61.0, "nso_compiled": 2.0}},
}


def fake_plan(python, out):
    """Steps that print canned figures, one that fails and one that outlives its limit."""
    steps = [gpu_check.Step(file.removeprefix("bench-").removesuffix(".json"), "canned",
                            [python, "-c", f"print('a log line'); print({json.dumps(json.dumps(data, indent=2))})"],
                            1, 30, file) for file, data in CANNED.items()]
    junit = ('<testsuites><testsuite><testcase name="a"/><testcase name="b"><skipped/></testcase>'
             '<testcase name="c"><failure/></testcase></testsuite></testsuites>')
    steps.insert(0, gpu_check.Step("tests", "junit", [python, "-c", f"open({str(out / 'pytest.xml')!r}, 'w')"
                                                                     f".write({junit!r}); raise SystemExit(1)"], 1, 30))
    steps.append(gpu_check.Step("slow", "sleeps", [python, "-c", "import time; time.sleep(60)"], 1, 2))
    return steps


def test_runner_writes_the_figures_and_the_table_last(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "plan", fake_plan)
    monkeypatch.setattr(gpu_check, "find_versions", lambda found: found.update(
        torch="2.11.0", cuda="13.0", open_clip="3.3.0", gpu="NVIDIA H200") or None)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out)]) == 1  # a test failed, a step timed out
    printed = capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["versions.json", "pytest.xml", "gpu-check.json", "gpu-check.log", *CANNED])
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    for file, data in CANNED.items():
        assert json.loads((out / file).read_text()) == data
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["steps"]["slow"]["status"] == "timeout" and summary["steps"]["slow"]["seconds"] < 10
    assert summary["tests"] == {"passed": 1, "failed": 1, "skipped": 1, "failed_tests": ["c"]}
    verdicts = {row["figure"]: (row["measured"], row["verdict"]) for row in summary["table"]}
    assert verdicts["GPU tests (pytest -m gpu)"] == ("1 passed, 1 failed, 1 skipped", "MISSED")
    assert verdicts["our AdamW loop / OpenCLIP train_one_epoch, samples/s"] == ("1.03 (3100 vs 3010)", "met")
    assert verdicts["NSO / AdamW step time"] == ("2.10 (quartiles 2.00-2.20)", "MISSED")
    assert verdicts["NSO extra peak memory, parameter copies"] == ("0.98", "met")
    assert verdicts["exact HVP / gradient, block of 8 (kept graph)"] == ("2.40 (2.10)", "met")
    assert verdicts["finite-difference HVP / gradient"] == ("2.01", "met")
    assert verdicts["compiled / eager samples/s, NSO"] == ("1.25 (first epoch 2 s)", "-")
    assert verdicts["recompiles after warm-up"] == ("0", "met")
    assert verdicts["MFU of the AdamW step"] == ("41.0% (320 of 780 TFLOP/s measured)", "-")
    assert verdicts["step slow"][1] == "MISSED"
    table = printed[printed.rindex("GPU check "):].splitlines()
    assert table[0].endswith("NVIDIA H200, torch 2.11.0 (CUDA 13.0), open_clip 3.3.0, python " + sys.version.split()[0])
    assert printed.rstrip().endswith(table[-1]) and "step slow" in table[-1]
    assert (out / "gpu-check.log").read_text().splitlines().count("a log line") == len(CANNED)


def fake_wheel(directory, name, version, requires=(), tag="py3-none-any"):
    path = directory / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("change,problems", [
    ("none", []),
    ("drop-wcwidth", ["no wheel of wcwidth",
                      "ftfy-6.3.1-py3-none-any.whl needs wcwidth, which neither a wheel nor the GPU machine has"]),
    ("newer-torch", ["open_clip_torch-3.3.0-py3-none-any.whl needs torch>=2.12, the pack has torch 2.11.0"]),
    ("unknown-need", ["webdataset-1.0.2-py3-none-any.whl needs lmdb, which neither a wheel nor the GPU machine has"]),
    ("two-versions", ["two versions of ftfy: 6.3.1 and 6.3.2"]),
    ("mac-only", ["wcwidth-0.9.4-cp312-cp312-macosx_11_0_arm64.whl: not installable on CPython 3.12 x86-64 Linux"]),
])
def test_wheel_check_finds_incomplete_or_inconsistent_sets(tmp_path, change, problems):
    torch_need = "torch>=2.12" if change == "newer-torch" else "torch>=2.0"
    fake_wheel(tmp_path, "open_clip_torch", "3.3.0", [torch_need, "ftfy", "timm>=1.0.17", 'pandas; extra == "training"'])
    fake_wheel(tmp_path, "webdataset", "1.0.2", ["braceexpand", "numpy", "pyyaml",
                                                 *(["lmdb"] if change == "unknown-need" else []),
                                                 'lmdb; sys_platform == "win32"'])
    fake_wheel(tmp_path, "braceexpand", "0.1.7", tag="py2.py3-none-any")
    fake_wheel(tmp_path, "ftfy", "6.3.1", ["wcwidth"])
    if change == "two-versions":
        fake_wheel(tmp_path, "ftfy", "6.3.2", ["wcwidth"])
    if change != "drop-wcwidth":
        fake_wheel(tmp_path, "wcwidth", "0.9.4", tag="cp312-cp312-macosx_11_0_arm64" if change == "mac-only"
                   else "cp310-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64")
    assert gpu_check.requirement_problems(tmp_path) == problems
