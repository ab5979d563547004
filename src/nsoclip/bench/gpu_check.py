"""The GPU check pack (`make gpu-check`, `scripts/gpu_check.sh`): on a machine with one CUDA GPU,
one command that prints the versions (and stops in one line if an import fails), runs the
GPU-marked tests and the GPU benchmarks, writes their full JSON under $OUT and prints a short
table last. Sized for one H100/H200 in at most 8 minutes, warm-up included: every step has a cap,
and a shared deadline shortens or skips the last ones, so a rerun fits a 15-minute lease.

    python -m nsoclip.bench.gpu_check [--out DIR] [--dry-run]       # the pack (the script calls it)
    python -m nsoclip.bench.gpu_check --check-wheels .whl           # after `make gpu-wheels`

Imports nothing beyond the standard library at the top: the version step must be able to say
which import fails. Files under $OUT (8): versions.json, pytest.xml,
bench-train.json, bench-nso.json, bench-hessian.json, bench-compile.json, gpu-check.json (all of
it, with the table) and gpu-check.log (everything printed)."""
import argparse
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from email.parser import Parser as MetadataParser
from pathlib import Path
from typing import List, Optional
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[3]
DEADLINE_S = 465  # the pack's wall-clock bound after the wheel install: 8 minutes less install and table
# What the pack imports; the GPU machine's python3 has the first group, the wheels bring the second.
PREINSTALLED = ("torch", "torchvision", "timm", "numpy", "PIL", "tensorboard", "regex", "tqdm", "huggingface_hub",
                "safetensors", "yaml", "pytest")
# (in import order: a broken dependency is named, not the package that imports it)
FROM_WHEELS = {"wcwidth": "wcwidth", "ftfy": "ftfy", "braceexpand": "braceexpand", "webdataset": "webdataset",
               "open_clip": "open_clip_torch"}
# Distributions of the GPU machine's image (device KINDS.md, read 2026-11) that wheel requirements may
# name, with the versions known there (None: present, version not recorded).
GPU_MACHINE = {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0",
               "safetensors": "0.8.0", "tqdm": None, "regex": None, "timm": None, "pyyaml": None, "pillow": None,
               "tensorboard": None, "matplotlib": None, "pytest": None, "packaging": None}
# Every module the steps run, imported once up front: an API this torch lacks fails here, in a line.
NSOCLIP_MODULES = ("nsoclip.main", "nsoclip.hessian", "nsoclip.zeroshot", "nsoclip.bench.train", "nsoclip.bench.nso",
                   "nsoclip.bench.hessian")
TARGETS = {"train": ">= 1.0", "nso_time": "<= 2.02", "nso_memory": "<= 1.0", "exact_hvp": "<= 2.5",
           "fd_hvp": "<= 2.05", "recompiles": "0"}


@dataclass
class Step:
    name: str
    what: str
    command: List[str]
    expected_s: int  # on one H100/H200, warm-up included
    cap_s: int
    output: Optional[str] = None  # file under OUT that receives the JSON the step prints


def plan(python: str, out: Path) -> List[Step]:
    bench = [python, "-m", "nsoclip.bench"]
    vit = ["--device", "cuda", "--model", "ViT-B-32", "--precision", "amp_bf16"]
    return [
        Step("tests", "GPU-marked tests (pytest -m gpu), CLIs end to end, one inductor compile",
             [python, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "tests",
              f"--junitxml={out / 'pytest.xml'}"], 80, 130),
        Step("train", "our AdamW loop vs OpenCLIP's train_one_epoch, ViT-B-32, batch 256",
             bench + ["train", *vit, "--batch-size", "256", "--workers", "8", "--replay-batches", "4",
                      "--steps", "30", "--rounds", "5"], 35, 60, "bench-train.json"),
        Step("nso", "NSO (k=1, two-point, lam=0) / AdamW step time and peak memory, MFU, batch 256",
             bench + ["nso", *vit, "--batch-size", "256", "--steps", "15", "--warmup", "3", "--ddp-steps", "0"],
             30, 50, "bench-nso.json"),
        Step("hessian", "exact and finite-difference HVP / gradient, ViT-B-32 fp32, batch 64",
             bench + ["hessian", "--device", "cuda", "--model", "ViT-B-32", "--batch-sizes", "64", "--rounds", "6",
                      "--compute-model", "", "--hvp-counts", "", "--skip", "accuracy,memory,slq,fsdp"],
             30, 50, "bench-hessian.json"),
        Step("compile", "--torchcompile (inductor) vs eager, AdamW and NSO, batch 256",
             bench + ["train", "--compile", *vit, "--batch-size", "256", "--workers", "8", "--replay-batches", "4",
                      "--steps", "20", "--rounds", "5"], 120, 170, "bench-compile.json"),
    ]


def print_plan(steps: List[Step], out: Path) -> None:
    print(f"GPU check pack: output in {out}/, deadline {DEADLINE_S} s after the wheel install")
    print(f"  versions  {'~10 s':>7}  versions of python, torch, CUDA, the GPU and every import -> {out}/versions.json")
    for step in steps:
        target = f" -> {out}/{step.output}" if step.output else ""
        print(f"  {step.name:<9} {f'~{step.expected_s} s':>7}  (cap {step.cap_s} s) {step.what}{target}")
        print(f"            {shlex.join(step.command)}")
    total = 10 + sum(step.expected_s for step in steps)
    print(f"  table     {'~1 s':>7}  the summary below, all figures in {out}/gpu-check.json")
    print(f"expected about {total} s ({total / 60:.1f} min); at most {DEADLINE_S} s")


class Log:
    """Everything the pack prints, also into OUT/gpu-check.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, text: str, stream=None) -> None:
        stream = stream or sys.stdout
        with self.lock:
            stream.write(text)
            stream.flush()
            self.file.write(text)
            self.file.flush()


def versions(out: Path, log: Log) -> Optional[dict]:
    """Versions of everything the pack needs, printed first; None after one line naming what is
    missing (an import, a requirement, the GPU), so no GPU minute goes to a run that would fail."""
    found = {"python": sys.version.split()[0]}
    problem = find_versions(found)
    log.write("versions: " + ", ".join(f"{name} {version}" for name, version in found.items()) + "\n")
    if problem is not None:
        log.write(f"error: {problem}\n", sys.stderr)
        return None
    (out / "versions.json").write_text(json.dumps({**found, "executable": sys.executable}, indent=2) + "\n")
    return found


def find_versions(found: dict) -> Optional[str]:
    """Fill `found` in; the first problem met, or None."""
    for name in PREINSTALLED + tuple(FROM_WHEELS):
        try:
            module = importlib.import_module(name)
        except Exception as error:  # whatever breaks the import would break the steps after it
            hint = " (run `make gpu-wheels` where PyPI is reachable and carry .whl/)" if name in FROM_WHEELS else ""
            return f"cannot import {name}: {type(error).__name__}: {error}{hint}"
        found[name] = getattr(module, "__version__", "?")
    unmet = unmet_requirements()
    if unmet:
        return unmet[0]
    import torch
    found["cuda"] = torch.version.cuda
    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False)"
    found["gpu"] = torch.cuda.get_device_name(0)
    found["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    for module in NSOCLIP_MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:
            return f"cannot import {module} with torch {torch.__version__}: {type(error).__name__}: {error}"
    return None


LINUX_CPYTHON_312 = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                     "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                     "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def requirements(lines, environment=None):
    """The requirements of Requires-Dist lines that apply (no extras; markers evaluated)."""
    from packaging.requirements import Requirement

    for line in lines or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment or {"extra": ""}):
            yield requirement


def unmet_requirements() -> List[str]:
    """What the wheel-installed distributions need and this interpreter lacks (a timm too old for
    open_clip, say), checked here because --no-deps installs never check it."""
    from importlib import metadata

    problems = []
    for dist in FROM_WHEELS.values():
        for requirement in requirements(metadata.requires(dist)):
            try:
                version = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{dist} needs {requirement}, which is not installed")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{dist} needs {requirement}, this python3 has {requirement.name} {version}")
    return problems


def run_step(step: Step, seconds: float, out: Path, log: Log) -> dict:
    """Run one step with a time limit, its output streamed to the console and the log; the JSON it
    prints goes to OUT/step.output."""
    log.write(f"\n=== {step.name} (expected ~{step.expected_s} s, limit {seconds:.0f} s): {step.what}\n"
              f"$ {shlex.join(step.command)}\n")
    start = time.monotonic()
    process = subprocess.Popen(step.command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    printed = []

    def pump(pipe, stream, keep):
        for line in pipe:
            log.write(line, stream)
            if keep is not None:
                keep.append(line)

    threads = [threading.Thread(target=pump, args=(process.stdout, None, printed)),
               threading.Thread(target=pump, args=(process.stderr, sys.stderr, None))]
    for thread in threads:
        thread.start()
    try:
        returncode = process.wait(timeout=seconds)
        status = "ok" if returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        returncode, status = process.wait(), "timeout"
    for thread in threads:
        thread.join()
    result = {"status": status, "returncode": returncode, "seconds": round(time.monotonic() - start, 1)}
    if step.output and status == "ok":
        text = "".join(printed)
        start_of_json = text.find("\n{")
        try:
            data = json.loads(text if text.startswith("{") else text[start_of_json + 1:])
        except (ValueError, IndexError) as error:
            result.update(status="failed", error=f"no JSON in its output ({error})")
        else:
            (out / step.output).write_text(json.dumps(data, indent=2) + "\n")
    log.write(f"=== {step.name}: {result['status']} in {result['seconds']} s\n")
    return result


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def test_counts(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            failed.append(case.get("name"))
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed}


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdict(value, target: str) -> str:
    if value is None:
        return "not measured"
    bound = float(target.split()[-1]) if " " in target else float(target)
    ok = value >= bound if target.startswith(">=") else value <= bound
    return "met" if ok else "MISSED"


def table(out: Path, results: dict) -> List[List[str]]:
    """Rows of (figure, measured, target, verdict) from the step files."""
    rows = []
    tests = test_counts(out / "pytest.xml")
    if tests is not None:
        ok = tests["failed"] == 0 and tests["passed"] > 0 and results.get("tests", {}).get("status") == "ok"
        rows.append(["GPU tests (pytest -m gpu)", f"{tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped", "all pass", "met" if ok else "MISSED"])
    else:
        rows.append(["GPU tests (pytest -m gpu)", results.get("tests", {}).get("status", "not run"), "all pass",
                     "not measured"])
    train = read_json(out / "bench-train.json")
    if train:
        ratio = train["throughput_ratio_nsoclip_over_open_clip"]
        rows.append(["our AdamW loop / OpenCLIP train_one_epoch, samples/s",
                     f"{fmt(ratio)} ({train['nsoclip_samples_per_s']:.0f} vs {train['open_clip_samples_per_s']:.0f})",
                     TARGETS["train"], verdict(ratio, TARGETS["train"])])
    nso = read_json(out / "bench-nso.json")
    if nso:
        ratio = nso["step_time_ratio_nso_over_adamw"]
        rows.append(["NSO / AdamW step time", f"{fmt(ratio)} (quartiles {fmt(nso['step_time_ratio_nso_over_adamw_quartiles'][0])}"
                     f"-{fmt(nso['step_time_ratio_nso_over_adamw_quartiles'][1])})", TARGETS["nso_time"],
                     verdict(ratio, TARGETS["nso_time"])])
        memory = nso.get("extra_peak_param_copies_nso")
        rows.append(["NSO extra peak memory, parameter copies", fmt(memory), TARGETS["nso_memory"],
                     verdict(memory, TARGETS["nso_memory"])])
        mfu = nso["mfu_adamw"]
        rows.append(["MFU of the AdamW step", f"{fmt(mfu['mfu'] * 100, 1)}% ({mfu['achieved_flops_per_s'] / 1e12:.0f} of "
                     f"{mfu['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s measured)", "report", "-"])
    hessian = read_json(out / "bench-hessian.json")
    if hessian:
        cost = hessian["hvp_cost"][0]["hvp_over_gradient_median_of_rounds"]
        rows.append(["exact HVP / gradient, block of 8 (kept graph)",
                     f"{fmt(cost['exact_hvp_block'])} ({fmt(cost['exact_hvp_kept_graph'])})", TARGETS["exact_hvp"],
                     verdict(cost["exact_hvp_block"], TARGETS["exact_hvp"])])
        rows.append(["finite-difference HVP / gradient", fmt(cost["finite_difference_hvp"]), TARGETS["fd_hvp"],
                     verdict(cost["finite_difference_hvp"], TARGETS["fd_hvp"])])
    compiled = read_json(out / "bench-compile.json")
    if compiled:
        speedup, warmup = compiled["speedup_compiled_over_eager"], compiled["warmup_epoch_s"]
        for opt in ("adamw", "nso"):
            rows.append([f"compiled / eager samples/s, {opt.upper() if opt == 'nso' else 'AdamW'}",
                         f"{fmt(speedup[opt])} (first epoch {warmup[f'{opt}_compiled']:.0f} s)", "report", "-"])
        recompiles = compiled["recompiles_after_warmup"]
        rows.append(["recompiles after warm-up", str(recompiles), TARGETS["recompiles"],
                     "met" if recompiles == 0 else "MISSED"])
    for name, result in results.items():
        if result["status"] != "ok":
            rows.append([f"step {name}", f"{result['status']} after {result.get('seconds', 0)} s", "ok", "MISSED"])
    return rows


def print_table(rows: List[List[str]], header: str, log: Log) -> None:
    widths = [max(len(row[i]) for row in rows + [["figure", "measured", "target", "verdict"]]) for i in range(4)]
    lines = [header, " | ".join(h.ljust(w) for h, w in zip(("figure", "measured", "target", "verdict"), widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    log.write("\n" + "\n".join(line.rstrip() for line in lines) + "\n")


def run_pack(out: Path, python: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu-check.log")
    deadline = time.monotonic() + DEADLINE_S
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    found = versions(out, log)
    if found is None:
        return 2
    results = {}
    for step in plan(python, out):
        left = deadline - time.monotonic() - 5
        if left < 15:
            results[step.name] = {"status": "skipped (deadline)", "seconds": 0}
            log.write(f"\n=== {step.name}: skipped, {left + 5:.0f} s left before the deadline\n")
            continue
        results[step.name] = run_step(step, min(step.cap_s, left), out, log)
    rows = table(out, results)
    header = (f"GPU check {started}: {found['gpu']}, torch {found['torch']} (CUDA {found['cuda']}), "
              f"open_clip {found['open_clip']}, python {found['python']}")
    summary = {"started": started, "versions": found, "steps": results, "tests": test_counts(out / "pytest.xml"),
               "table": [dict(zip(("figure", "measured", "target", "verdict"), row)) for row in rows]}
    for step in plan(python, out):
        if step.output:
            summary[step.name] = read_json(out / step.output)
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(rows, header, log)
    return 0 if all(result["status"] == "ok" for result in results.values()) else 1


def requirement_problems(wheel_dir: Path) -> List[str]:
    """Each wheel's Requires-Dist (extras and markers that exclude Linux / CPython 3.12 left out)
    checked against the other wheels and the GPU machine's packages; one version per package."""
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]
    supported = set(cpython_tags((3, 12), platforms=platforms)) | set(compatible_tags((3, 12), "cp312", platforms))
    wheels = sorted(wheel_dir.glob("*.whl"))
    available = {}
    problems = []
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in available:
            problems.append(f"two versions of {name}: {available[name]} and {version}")
        available[name] = str(version)
        if not tags & supported:
            problems.append(f"{wheel.name}: not installable on CPython 3.12 x86-64 Linux")
    missing = [dist for dist in FROM_WHEELS.values() if canonicalize_name(dist) not in available]
    problems += [f"no wheel of {dist}" for dist in missing]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = MetadataParser().parsestr(archive.read(metadata_name).decode())
        for requirement in requirements(metadata.get_all("Requires-Dist"), LINUX_CPYTHON_312):
            name = canonicalize_name(requirement.name)
            version = available.get(name, GPU_MACHINE.get(name, "absent"))
            if name not in available and name not in GPU_MACHINE:
                problems.append(f"{wheel.name} needs {requirement}, which neither a wheel nor the GPU machine has")
            elif version is not None and not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{wheel.name} needs {requirement}, the pack has {name} {version}")
    return problems


def check_wheels(wheel_dir: Path) -> int:
    """The wheel set is complete and consistent, installs with --no-index --no-deps into a fresh
    target, and its packages import from there."""
    problems = requirement_problems(wheel_dir)
    with tempfile.TemporaryDirectory() as target:
        install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                   "--target", target, *map(str, sorted(wheel_dir.glob("*.whl")))]
        if subprocess.run(install).returncode != 0:
            problems.append(f"pip install --no-index --no-deps --target failed: {shlex.join(install)}")
        else:
            probe = ("import importlib, sys; bad = [m for m in sys.argv[1:] if not "
                     "importlib.import_module(m).__file__.startswith(sys.path[0])]; print(','.join(bad))")
            imported = subprocess.run([sys.executable, "-c", probe, *FROM_WHEELS], capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": target})
            if imported.returncode != 0 or imported.stdout.strip():
                problems.append(f"importing from the target failed: {imported.stderr.strip()[-300:] or imported.stdout}")
    for problem in problems:
        print(f"error: {wheel_dir}: {problem}", file=sys.stderr)
    if not problems:
        names = ", ".join(wheel.name for wheel in sorted(wheel_dir.glob("*.whl")))
        print(f"{wheel_dir}: complete and consistent for CPython 3.12 with torch {GPU_MACHINE['torch']}: {names}")
    return 2 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="Output folder ($OUT).")
    parser.add_argument("--python", default=sys.executable, help="The interpreter the steps run with.")
    parser.add_argument("--dry-run", action="store_true", help="List the steps and their commands, run nothing.")
    parser.add_argument("--check-wheels", metavar="DIR", help="Check the wheel folder of `make gpu-wheels` instead.")
    args = parser.parse_args(argv)
    if args.check_wheels:
        return check_wheels(Path(args.check_wheels))
    out = Path(args.out).resolve()
    if args.dry_run:
        print_plan(plan(args.python, out), out)
        return 0
    return run_pack(out, args.python)


if __name__ == "__main__":
    sys.exit(main())
