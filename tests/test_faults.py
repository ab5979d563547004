"""Faults a long run must survive (docs/faults.md): a rank killed with SIGKILL under
torchrun --max-restarts, SIGTERM preemption, a checkpoint write killed mid-way, non-finite
losses, a rank hung in a collective, and resuming on another world size. Each run is compared
with an uninterrupted one: exactly where the world size is the same, within float tolerance
where it changes."""
import datetime
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from helpers import (CONFIGS, REPO, assert_same_weights, cpu_env, finish, in_process, launch, read,
                     run_cli, run_ranks, trained_a_step, wait_until, weights, workers_of)

from nsoclip.checkpoint import Checkpointer, latest_checkpoint, load_checkpoint, save_checkpoint
from nsoclip.distributed import World
from nsoclip.main import STOPPED_ON_REQUEST, main
from nsoclip.update import apply_update

TINY = str(CONFIGS / "tiny-vit.json")


def flags(config, logs, name, *extra, batch, samples=64, epochs=3):
    """Constant lr after warmup: the schedule depends on the step only, so --epochs may differ
    between the segments of one run. --local-loss --gather-with-grad makes 2 ranks x B/2 the
    same objective as 1 rank x B."""
    return ["--dataset-type", "synthetic", "--train-num-samples", samples, "--model", config,
            "--batch-size", batch, "--epochs", epochs, "--workers", 0, "--device", "cpu", "--precision", "fp32",
            "--logs", logs, "--name", name, "--warmup", 2, "--lr-scheduler", "const", "--log-every-n-steps", 1,
            "--seed", 3, "--local-loss", "--gather-with-grad", *extra]


def train_here(args) -> int:
    return in_process(main, args)


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory):
    """1 rank x global batch 8 for 3 epochs, uninterrupted: the reference of the SIGTERM and
    world-size tests."""
    logs = tmp_path_factory.mktemp("reference")
    assert train_here(flags(TINY, logs, "straight", batch=8)) == 0
    return weights(logs / "straight", "epoch_3.pt")


def test_sigterm_checkpoint_resumes_exactly_past_a_truncated_newer_file(single_reference, tmp_path):
    """SIGTERM mid-epoch to every process of the job, dataloader workers included, as SLURM
    preempts: a step checkpoint, exit 143. Before the restart we plant what a non-atomic writer
    killed mid-save would leave (a truncated `step_N.pt` with a higher step) and a leftover
    temporary file of our own writer: `--resume latest` takes the complete checkpoint and ends
    bit-identical to the uninterrupted run (which had no workers: the data do not depend on them)."""
    args = flags(TINY, tmp_path, "run", "--resume", "latest", "--workers", 1, batch=8)
    process = launch(args, tmp_path / "first.txt")
    wait_until(trained_a_step(tmp_path / "run"), process, "the first step")
    os.killpg(process.pid, signal.SIGTERM)
    assert finish(process) == STOPPED_ON_REQUEST == 143
    checkpoint_dir = tmp_path / "run" / "checkpoints"
    stopped_at = list(checkpoint_dir.iterdir())
    assert len(stopped_at) == 1 and stopped_at[0].name.startswith("step_"), stopped_at
    assert "Stopped at step" in read(tmp_path / "run" / "out.log")

    data = stopped_at[0].read_bytes()
    (checkpoint_dir / "step_1000.pt").write_bytes(data[:len(data) // 2])
    leftover = checkpoint_dir / ".step_2000.pt.tmp-4242"
    leftover.write_bytes(data[:1000])
    assert latest_checkpoint(checkpoint_dir) == stopped_at[0]
    assert train_here(args) == 0
    log = read(tmp_path / "run" / "out.log")
    assert f"Resumed from {stopped_at[0]}" in log and "step_1000.pt: corrupt or truncated" in log
    assert not leftover.exists(), "the next start removes leftovers of interrupted writes"
    assert_same_weights(weights(tmp_path / "run", "epoch_3.pt"), single_reference, atol=0, rtol=0)


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL a process while save_checkpoint writes a big state over an existing checkpoint."""
    checkpoint_dir = tmp_path / "checkpoints"
    target = checkpoint_dir / "step_2.pt"
    save_checkpoint({"step": 2, "state_dict": {"w": torch.arange(4.0)}}, target)
    before = target.read_bytes()
    writer = textwrap.dedent(f"""
        import torch
        from nsoclip.checkpoint import save_checkpoint
        save_checkpoint({{"step": 3, "state_dict": {{"w": torch.ones(32 * 2 ** 20)}}}}, {str(target)!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], env=cpu_env(), cwd=REPO)
    partial = lambda: [p for p in checkpoint_dir.glob(".step_2.pt.tmp-*") if p.stat().st_size > 0]  # noqa: E731
    wait_until(partial, process, "the temporary file to be written", timeout=60, poll=0.001)
    process.kill()
    process.wait(timeout=30)
    assert partial(), "the write finished before the kill"
    assert target.read_bytes() == before
    assert load_checkpoint(target)["step"] == 2
    assert latest_checkpoint(checkpoint_dir) == target
    Checkpointer(checkpoint_dir, args=None, world=World()).remove_partial_writes()
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["step_2.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [[], ["--opt", "nso", "--nso-sigma", "0.01"]], ids=["adamw", "nso"])
def test_kill9_of_one_rank_restarts_and_matches_uninterrupted_run(tmp_path, optimizer):
    """torchrun --max-restarts 1 restarts the group after rank 1 is SIGKILLed; the same command
    resumes from the newest step checkpoint and ends with bit-identical weights."""
    common = dict(batch=4, samples=64, epochs=2)
    run_cli(flags(TINY, tmp_path, "straight", *optimizer, **common), nproc=2)
    args = flags(TINY, tmp_path, "killed", *optimizer, "--resume", "latest", "--save-every-n-steps", 3,
                 **common)
    agent = launch(args, tmp_path / "killed.txt", nproc=2, torchrun_flags=["--max-restarts", "1"])
    checkpoints = tmp_path / "killed" / "checkpoints"
    wait_until(lambda: list(checkpoints.glob("step_*.pt")), agent, "a step checkpoint")
    assert not (checkpoints / "epoch_2.pt").exists(), "the run ended before the kill"
    os.kill(workers_of(agent.pid)[1], signal.SIGKILL)
    assert finish(agent) == 0, read(tmp_path / "killed.txt")[-3000:]
    log = read(tmp_path / "killed" / "out.log")
    assert log.count("Run ") == 2 and "Resumed from" in log and "checkpoints/step_" in log.split("Resumed from")[1]
    assert_same_weights(weights(tmp_path / "straight", "epoch_2.pt"), weights(tmp_path / "killed", "epoch_2.pt"),
                        atol=0, rtol=0)


@pytest.mark.slow
def test_world_size_two_to_one_and_back(single_reference, tmp_path):
    """2 ranks x 4 until SIGTERM reaches the torchrun agent mid-epoch (it forwards the signal,
    the ranks agree on a step and write a step checkpoint), then 1 rank x 8 to the end of epoch
    2, then 2 ranks x 4 to the end: equal to 1 rank x 8 throughout."""
    agent = launch(flags(TINY, tmp_path, "elastic", "--resume", "latest", batch=4),
                   tmp_path / "first.txt", nproc=2)
    run_dir = tmp_path / "elastic"
    wait_until(trained_a_step(run_dir), agent, "the first step")
    agent.send_signal(signal.SIGTERM)
    assert finish(agent) != 0
    stopped_at = [p.name for p in (run_dir / "checkpoints").glob("*.pt")]
    assert len(stopped_at) == 1 and stopped_at[0].startswith("step_"), stopped_at
    assert train_here(flags(TINY, tmp_path, "elastic", "--resume", "latest", batch=8, epochs=2)) == 0
    run_cli(flags(TINY, tmp_path, "elastic", "--resume", "latest", batch=4), nproc=2)
    log = read(run_dir / "out.log")
    assert log.count("Resumed from") == 2 and "on 1 process(es)" in log
    assert_same_weights_but_key_bias(weights(run_dir, "epoch_3.pt"), single_reference, steps=24)


def assert_same_weights_but_key_bias(a, b, steps, lr=5e-4):
    """Within float tolerance, except the attention key bias: its gradient is zero but for
    rounding, which depends on the world size, and AdamW turns that noise into steps of up to
    lr each. It is held to what AdamW could move it, every other tensor to the tight bound."""
    a, b = dict(a), dict(b)
    for key in [k for k in a if k.endswith("attn.in_proj_bias")]:
        width = a[key].numel() // 3
        torch.testing.assert_close(a[key][width:2 * width], b[key][width:2 * width], atol=2 * lr * steps, rtol=0)
        a[key], b[key] = a[key].clone(), b[key].clone()
        a[key][width:2 * width] = b[key][width:2 * width] = 0
    assert_same_weights(a, b)


@pytest.mark.slow
def test_hung_rank_ends_the_job_naming_the_collective(tmp_path):
    """SIGSTOP rank 1: rank 0 fails after --dist-timeout with one line naming the collective.
    (A stopped process ignores torchrun's SIGTERM until continued; the test continues it once
    rank 0 has failed, so teardown takes seconds rather than torchrun's 30 s SIGKILL grace.)"""
    agent = launch(flags(TINY, tmp_path, "hang", "--dist-timeout", 0.1, batch=4), tmp_path / "out.txt",
                   nproc=2)
    wait_until(trained_a_step(tmp_path / "hang"), agent, "the first step")
    workers = workers_of(agent.pid)
    os.kill(workers[1], signal.SIGSTOP)
    stopped_at = time.time()
    try:
        wait_until(lambda: not Path(f"/proc/{workers[0]}").exists() or "error:" in read(tmp_path / "out.txt"),
                   agent, "rank 0 to fail", timeout=60)
        waited = time.time() - stopped_at
    finally:
        os.kill(workers[1], signal.SIGCONT)
    assert finish(agent, timeout=60) != 0
    errors = [line for line in read(tmp_path / "out.txt").splitlines() if line.startswith("error:")]
    assert errors and "timed out after 0.1 min (--dist-timeout 0.1)" in errors[0], errors
    assert re.match(r"error: (collective \w+|DDP gradient all-reduce in backward) \(in \w+\.\w+\) timed out", errors[0])
    assert 5.5 <= waited < 40, waited


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, capsys):
    """A divergent learning rate: step 1 is finite and applied, its update makes every later
    loss non-finite. Those steps are skipped (the weights and AdamW's step count stay), logged,
    counted, and after --max-nonfinite-steps in a row the run stops with one line, exit 2,
    keeping a checkpoint with the last good (finite) weights."""
    args = flags(TINY, tmp_path, "diverge", "--lr", "1e20", "--warmup", 0, "--wd", 0,
                 "--save-every-n-steps", 1, "--max-nonfinite-steps", 3, batch=8, samples=64, epochs=1)
    assert train_here(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: 3 consecutive steps with a non-finite loss or gradient (--max-nonfinite-steps 3) at step 4; "
        "the last good checkpoint is kept"]
    log = read(tmp_path / "diverge" / "out.log")
    for streak, step in ((1, 2), (2, 3), (3, 4)):
        assert f"step {step}: non-finite loss or gradient, update skipped ({streak} in a row)" in log
    assert "nonfinite_steps: 2" in log  # the third skip stops the run before it is logged
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "diverge" / "checkpoints"))
    assert checkpoint["step"] == 3 and checkpoint["nonfinite_total"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {1}


def skip_decision_worker(rank, world_size, port, out_dir):
    """Rank 1 alone sees a NaN input; DDP all-reduces gradients before apply_update decides."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    start = {k: v.clone() for k, v in model.module.state_dict().items()}
    decisions = []
    for poisoned in (True, False):
        inputs = torch.ones(4, 3)
        if poisoned and rank == 1:
            inputs[0, 0] = float("nan")
        optimizer.zero_grad()
        model(inputs).square().sum().backward()
        decisions.append(apply_update(optimizer).applied)
        if poisoned:
            unchanged = all(torch.equal(v, start[k]) for k, v in model.module.state_dict().items())
    torch.save({"decisions": decisions, "unchanged_after_skip": unchanged, "state": model.module.state_dict()},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_nonfinite_gradient_on_one_rank_is_skipped_on_every_rank(tmp_path):
    run_ranks(skip_decision_worker, 2, str(tmp_path), timeout=120)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in results:
        assert result["decisions"] == [False, True]
        assert result["unchanged_after_skip"]
    for key in results[0]["state"]:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key])
