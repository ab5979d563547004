"""SAM / ASAM baseline: the step against a direct computation, exact restore, AMP skip, and the
all-reduce count and world-size behaviour of the local and global ascent."""
import io
import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import (count_all_reduces, flat, gradient_at, init_gloo, mlp, mlp_batch, mlp_loss, recording_closure,
                     run_ranks)
from nsoclip.sam import SAM


@pytest.mark.parametrize("adaptive", [False, True])
def test_step_matches_a_direct_computation(adaptive):
    model, batch = mlp(), mlp_batch()
    start = flat(model.parameters())
    points = []
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, adaptive=adaptive, lr=1.0)
    loss = opt.step(recording_closure(model, batch, points))

    gradient = gradient_at(model, batch, start)
    scale = start.abs() if adaptive else torch.ones_like(start)
    ascent = 0.2 * scale**2 * gradient / (scale * gradient).norm()
    expected = gradient_at(model, batch, start + ascent)
    assert len(points) == 2 and torch.equal(points[0], start)
    torch.testing.assert_close(points[1], start + ascent, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat(model.parameters()), start - expected, rtol=1e-5, atol=1e-6)
    assert (expected - gradient).abs().max() > 1e-3  # the perturbation mattered
    assert set(opt.last_stats) == {"rho", "clean_loss", "perturbed_loss", "grad_norm"}
    assert float(loss) == opt.last_stats["perturbed_loss"] > opt.last_stats["clean_loss"]


def test_update_is_the_base_optimizer_step_from_exactly_restored_weights_and_resumes():
    batch = mlp_batch()
    model, reference = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, weight_decay=0.1)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.step(recording_closure(model, batch))
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            theirs.grad = ours.grad.clone()
        reference_opt.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = mlp(seed=5)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = SAM(resumed_model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(checkpoint["optimizer"])
    for _ in range(2):
        opt.step(recording_closure(model, batch))
        resumed.step(recording_closure(resumed_model, batch))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_both_passes_see_the_same_rng_state():
    states = []
    model, batch = mlp(dropout=0.5), mlp_batch()

    def closure():
        states.append(torch.get_rng_state())
        loss = mlp_loss(model, batch)
        loss.backward()
        return loss

    SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1).step(closure)
    assert len(states) == 2 and torch.equal(states[0], states[1])


def test_fp16_overflow_in_the_ascent_pass_skips_the_step():
    model, batch = mlp(), mlp_batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mlp_loss(model, batch)
        scaler.scale(loss * float("inf") if len(calls) == 1 else loss).backward()
        return loss

    start = flat(model.parameters())
    opt.step(closure, grad_scaler=scaler)
    assert len(calls) == 2  # the descent pass still runs, so DDP ranks never disagree on collectives
    assert not opt.last_update.applied
    assert torch.equal(flat(model.parameters()), start)
    assert scaler.get_scale() == 2.0**11


@pytest.mark.parametrize("kwargs,message", [
    ({"rho": -0.1}, "rho"),
    ({"rho": float("inf")}, "rho"),
    ({"ascent": "mean"}, "ascent"),
])
def test_invalid_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


# ---- two gloo ranks ---------------------------------------------------------------------------

STEPS = 2


def sam_steps(model, batch, ascent, ddp_model=None):
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, ascent=ascent, ddp_model=ddp_model, lr=0.5)
    for _ in range(STEPS):
        opt.step(recording_closure(ddp_model or model, batch))
    return flat(model.parameters())


def sam_world_worker(rank, world_size, port, out_dir):
    init_gloo(rank, world_size, port)
    inputs, targets = mlp_batch()
    half = inputs.shape[0] // world_size
    batch = inputs[rank * half:(rank + 1) * half], targets[rank * half:(rank + 1) * half]
    result = {}
    for ascent in ("local", "global"):
        model = mlp()
        ddp_model = DDP(model)
        all_reduces = count_all_reduces(ddp_model)
        result[ascent] = sam_steps(model, batch, ascent, ddp_model)
        result[f"{ascent}_all_reduces_per_step"] = all_reduces[0] / STEPS
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_all_reduces_per_step_and_world_size_behaviour(tmp_path):
    """Mean-squared error averaged per rank, then DDP's average over equal halves, is the
    full-batch mean: global ascent must reproduce the single-process run; local ascent perturbs
    each rank along its own half-batch gradient and must not."""
    run_ranks(sam_world_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    model = mlp()
    single = sam_steps(model, mlp_batch(), "global")
    for rank in ranks:
        assert rank["local_all_reduces_per_step"] == 1
        assert rank["global_all_reduces_per_step"] == 2
        torch.testing.assert_close(rank["global"], single, rtol=1e-5, atol=1e-6)
        assert (rank["local"] - single).abs().max() > 1e-3
    assert torch.equal(ranks[0]["local"], ranks[1]["local"])  # still one model: the update is all-reduced
