"""Every error path ends the process with its one `error:` line and a non-zero exit within
seconds, whatever --workers, on one process and under torchrun (docs/faults.md): corrupt shards,
an exception inside a dataloader worker, an unreadable --resume file, a zero-shot folder that
disappears mid-run, a checkpoint write that fails. Then: what SIGTERM does in and out of the
training loop, and that a failed first start never blocks the corrected command."""
import io
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import REPO, TINY, cpu_env, in_process, python_command, read_jsonl, run_cli
from nsoclip import hessian, main, zeroshot
from nsoclip.checkpoint import load_checkpoint
from nsoclip.train import Run, track_nonfinite
from nsoclip.update import UpdateResult

DEADLINE = 60  # seconds: the point is that nothing hangs, not how fast it fails


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    for shard in range(4):
        write_tar(root / f"corrupt-{shard}.tar",
                  [(f"{shard}{i:03d}", {"jpg": b"not an image", "txt": b"a caption"}) for i in range(4)])
    rows = ["filepath\ttitle"]
    for i in range(16):
        path = root / f"img{i}.png"
        path.write_bytes(b"garbage" if i == 5 else png((i * 15, 100, 200)))
        rows.append(f"{path.name}\ta picture number {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "corrupt.pt").write_bytes(bytes(range(256)) * 64)
    (root / "classes.txt").write_text("red\nblue\n")
    (root / "templates.txt").write_text("a photo of {}.\n")
    return root


def base_flags(logs, *extra):
    return ["--model", TINY, "--batch-size", 2, "--epochs", 1, "--device", "cpu", "--precision", "fp32",
            "--logs", logs, "--name", "run", "--log-every-n-steps", 1, "--seed", 0, *extra]


def zeroshot_folder(root: Path) -> Path:
    folder = root / "zeroshot"
    for label, colour in enumerate(((200, 0, 0), (0, 0, 200))):
        (folder / str(label)).mkdir(parents=True)
        for i in range(2):
            (folder / str(label) / f"{i}.png").write_bytes(png(colour))
    return folder


def case_flags(case: str, inputs: Path, logs: Path):
    """(flags, the message the error line must hold, a folder to delete once training runs)."""
    synthetic = ["--dataset-type", "synthetic", "--train-num-samples", 32]
    if case == "corrupt-shards":
        return ["--train-data", str(inputs / "corrupt-{0..3}.tar"), "--train-num-samples", 16], \
            "found no valid sample in its shards", None
    if case == "worker-exception":
        return ["--train-data", inputs / "train.csv"], "cannot read image", None
    if case == "unreadable-resume":
        return [*synthetic, "--resume", inputs / "corrupt.pt"], "corrupt.pt: corrupt or truncated", None
    if case == "zero-shot-folder-disappears":
        folder = zeroshot_folder(logs)
        return [*synthetic, "--zeroshot-data", folder, "--zeroshot-classnames", inputs / "classes.txt",
                "--zeroshot-templates", inputs / "templates.txt"], "none of the 4 images could be read", folder
    if case == "checkpoint-write-fails":
        blocker = logs / "run" / "checkpoints" / "step_2.pt"
        blocker.mkdir(parents=True)
        (blocker / "in-the-way").write_text("a directory where the checkpoint goes\n")
        return [*synthetic, "--save-every-n-steps", 2], "cannot write checkpoint", None
    raise ValueError(case)


CASES = ("corrupt-shards", "worker-exception", "unreadable-resume", "zero-shot-folder-disappears",
         "checkpoint-write-fails")


def delete_when_training(run_dir: Path, folder: Path):
    """Remove `folder` as soon as the run has logged its first step (it was listed at start-up)."""
    def watch():
        deadline = time.time() + DEADLINE
        while not read_jsonl(run_dir / "metrics.jsonl") and time.time() < deadline:
            time.sleep(0.01)
        shutil.rmtree(folder)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def error_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("case", CASES)
def test_one_process_fails_with_one_line_and_no_leftover_worker(case, workers, inputs, tmp_path, capsys):
    flags, message, folder = case_flags(case, inputs, tmp_path)
    watcher = folder and delete_when_training(tmp_path / "run", folder)
    start = time.monotonic()
    code = in_process(main.main, base_flags(tmp_path, "--workers", workers, *flags))
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert elapsed < DEADLINE
    assert len(error_lines(err)) == 1 and message in error_lines(err)[0], err
    assert "Traceback" not in err
    assert multiprocessing.active_children() == [], "a dataloader worker outlived the run"
    if watcher:
        watcher.join()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2])  # 0 and 1 worker: the one-process matrix above
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_fail_with_one_line_each_cause(case, workers, inputs, tmp_path):
    """Under torchrun: the process tree ends within the deadline, exit non-zero, and each distinct
    error is printed once (ranks failing the same way share one line); torchrun's own report
    repeats it as the root cause instead of pointing at its documentation."""
    flags, message, folder = case_flags(case, inputs, tmp_path)
    watcher = folder and delete_when_training(tmp_path / "run", folder)
    start = time.monotonic()
    result = run_cli(base_flags(tmp_path, "--workers", workers, "--local-loss", "--gather-with-grad", *flags),
                     nproc=2, check=False, timeout=DEADLINE)
    assert time.monotonic() - start < DEADLINE
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert errors and any(message in line for line in errors), result.stderr[-3000:]
    assert len(errors) == len(set(errors)), errors
    # The only traceback is torchrun's own ChildFailedError report, whose root cause is our line.
    assert result.stderr.count("Traceback") <= 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr or "torch/distributed/run.py" in result.stderr.split("Traceback", 1)[1]
    assert re.search(r"traceback\s*:\s*error: ", result.stderr), result.stderr[-3000:]
    if watcher:
        watcher.join()


# ---- signals

def start_job(module: str, flags, log: Path, nproc: int = 1):
    with open(log, "w") as out:
        return subprocess.Popen(python_command(module, flags, nproc), env=cpu_env(), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, process, what: str, timeout: float = DEADLINE):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the job ended (exit {process.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def ended_within(process, seconds: float) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not end within {seconds} s of the signal")


def signal_steps(log_text: str):
    return [int(step) for step in re.findall(r"Received signal 15 after step (\d+)", log_text)]


@pytest.mark.slow
def test_sigterm_stops_every_rank_within_one_step_whatever_the_log_interval(tmp_path):
    """--log-every-n-steps 10000: no log step comes, yet the ranks agree on the stop after the
    step in which the first of them got the signal and write that step's checkpoint; the resumed
    run ends exactly as an uninterrupted one. (The SIGTERM reaches torchrun's agent too, which
    forwards it and exits 1 itself; the ranks exit 143.)"""
    flags = ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", 96, "--batch-size", 2,
             "--epochs", 1, "--workers", 1, "--device", "cpu", "--precision", "fp32", "--logs", tmp_path,
             "--warmup", 1, "--lr-scheduler", "const", "--seed", 1, "--local-loss", "--gather-with-grad",
             "--log-every-n-steps", 10000]
    run_cli([*flags, "--name", "straight"], nproc=2)
    log = tmp_path / "job.txt"
    process = start_job("nsoclip.main", [*flags, "--name", "run", "--resume", "latest", "--save-every-n-steps", 3],
                        log, nproc=2)
    checkpoints = tmp_path / "run" / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("step_3.pt")), process, "the first step checkpoint")
    os.killpg(process.pid, signal.SIGTERM)
    code = ended_within(process, 30)
    text = log.read_text()
    assert code != 0 and "Stopped at step" in (tmp_path / "run" / "out.log").read_text(), text[-3000:]
    received = signal_steps(text)
    assert len(received) == 2, text[-3000:]  # one line per rank
    stopped = [int(p.stem.split("_")[1]) for p in checkpoints.glob("step_*.pt")]
    assert len(stopped) == 1 and min(received) <= stopped[0] <= min(received) + 1, (stopped, received)
    run_cli([*flags, "--name", "run", "--resume", "latest"], nproc=2)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch_1.pt")["state_dict"]
    resumed = load_checkpoint(checkpoints / "epoch_1.pt")["state_dict"]
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.slow
def test_second_sigterm_ends_training_at_once(tmp_path):
    """The first SIGTERM asks for a stop after the current step; a second one ends the process
    with the signal's default action, without waiting for that step."""
    flags = ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", 4096, "--batch-size", 64,
             "--epochs", 1, "--workers", 0, "--device", "cpu", "--precision", "fp32", "--logs", tmp_path,
             "--name", "run", "--log-every-n-steps", 1]
    log = tmp_path / "job.txt"
    process = start_job("nsoclip.main", flags, log)
    wait_for(lambda: read_jsonl(tmp_path / "run" / "metrics.jsonl"), process, "the first step")
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: "Received signal 15" in log.read_text(), process, "the first signal's log line")
    process.send_signal(signal.SIGTERM)
    assert ended_within(process, 5) == -signal.SIGTERM
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["hessian", "zeroshot"])
def test_sigterm_ends_an_evaluation_within_seconds(module, inputs, tmp_path):
    """Outside the training loop SIGTERM has its default action: a long Hessian or zero-shot
    evaluation ends at once."""
    if module == "hessian":
        flags = ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", 64, "--batch-size", 8,
                 "--workers", 1, "--device", "cpu", "--hessian-num-batches", 4, "--hessian-probes", 100000,
                 "--hessian-top-k", 0]
        started = lambda: "trace (products)" in log.read_text()  # noqa: E731
    else:
        folder = zeroshot_folder(tmp_path)
        for label in range(2):
            for i in range(2, 400):
                shutil.copy(folder / str(label) / "0.png", folder / str(label) / f"{i}.png")
        flags = ["--model", TINY, "--precision", "fp32", "--device", "cpu", "--workers", 1, "--batch-size", 1,
                 "--zeroshot-data", folder, "--zeroshot-classnames", inputs / "classes.txt",
                 "--zeroshot-templates", inputs / "templates.txt"]
        started = lambda: "zero-shot" in log.read_text()  # noqa: E731
    log = tmp_path / "job.txt"
    process = start_job(f"nsoclip.{module}", flags, log)
    wait_for(started, process, "the evaluation to start")
    process.send_signal(signal.SIGTERM)
    assert ended_within(process, 5) == -signal.SIGTERM


# ---- the corrected command after a failed start

def test_failed_starts_leave_nothing_that_blocks_the_corrected_command(inputs, tmp_path, capsys):
    good = ["--dataset-type", "synthetic", "--train-num-samples", 8, "--workers", 0]
    bad = {
        "model": (["--model", "NoSuchNet", *good], "--model NoSuchNet"),
        "train-data path": (["--dataset-type", "webdataset", "--train-data", str(tmp_path / "absent-{0..3}.tar"),
                             "--train-num-samples", 8], "none exists"),
        "epoch size": (["--train-data", str(inputs / "corrupt-{0..3}.tar")], "--train-num-samples is required"),
        "resume file": ([*good, "--resume", inputs / "corrupt.pt"], "corrupt or truncated"),
        "shards for workers": (["--train-data", str(inputs / "corrupt-{0..1}.tar"), "--train-num-samples", 8,
                                "--workers", 4], "every worker needs a shard"),
        "data error after start": (["--train-data", str(inputs / "corrupt-{0..3}.tar"), "--train-num-samples", 8],
                                   "found no valid sample"),
    }
    for what, (flags, message) in bad.items():
        code = in_process(main.main, [*base_flags(tmp_path), *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (what, err)
        assert in_process(main.main, [*base_flags(tmp_path), *good]) == 0, (what, capsys.readouterr().err)
        shutil.rmtree(tmp_path / "run")


def test_gradscaler_overflow_is_not_a_nonfinite_step(caplog):
    """An fp16 overflow skip at a healthy loss scale is logged as such and not counted; once the
    scale has collapsed, skips count towards --max-nonfinite-steps."""
    run = Run(args=type("Args", (), {"max_nonfinite_steps": 3})(), world=None, model=None, layout=None,
              loss=None, optimizer=None, scaler=None, schedule=None, checkpoints=None, metrics=None)
    finite, overflow = torch.tensor(2.5), UpdateResult(torch.tensor(float("inf")), applied=False, loss_scale=65536.0)
    with caplog.at_level("INFO"):
        for _ in range(5):
            track_nonfinite(run, finite, overflow)
    assert (run.overflow_total, run.nonfinite_total, run.nonfinite_streak) == (5, 0, 0)
    assert "fp16 gradient overflow at loss scale 65536" in caplog.text and "non-finite" not in caplog.text
    collapsed = UpdateResult(torch.tensor(float("inf")), applied=False, loss_scale=0.5)
    track_nonfinite(run, finite, collapsed)
    assert run.nonfinite_streak == 1
    track_nonfinite(run, torch.tensor(float("nan")), overflow)  # a NaN loss is never an overflow
    assert run.nonfinite_streak == 2 and run.nonfinite_total == 2


@pytest.mark.parametrize("module", ["hessian", "zeroshot"])
def test_evaluation_clis_fail_with_one_line_and_no_leftover_worker(module, inputs, tmp_path, capsys):
    """The same for the evaluation CLIs: bad data read by 2 dataloader workers."""
    if module == "hessian":
        cli = hessian.main
        flags = ["--model", TINY, "--train-data", str(inputs / "corrupt-{0..3}.tar"), "--train-num-samples", 16,
                 "--batch-size", 2, "--workers", 2, "--device", "cpu", "--hessian-num-batches", 1,
                 "--hessian-probes", 1, "--hessian-top-k", 0]
        message = "found no valid sample"
    else:
        cli = zeroshot.main
        folder = zeroshot_folder(tmp_path)
        for image in folder.rglob("*.png"):
            image.write_bytes(b"no longer an image")
        flags = ["--model", TINY, "--precision", "fp32", "--device", "cpu", "--workers", 2,
                 "--zeroshot-data", folder, "--zeroshot-classnames", inputs / "classes.txt",
                 "--zeroshot-templates", inputs / "templates.txt"]
        message = "none of the 4 images could be read"
    assert in_process(cli, flags) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0], errors
    assert multiprocessing.active_children() == []
