"""NSO: the estimator against exact gradients, the cost contract (passes, snapshot, exact restore,
one all-reduce), the noise stream (seeded, rank-identical, resumable) and AMP handling."""
import io
import math
import os

import open_clip
import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import (count_all_reduces, flat, gradient_at, init_gloo, mlp, mlp_batch, mlp_loss, recording_closure,
                     run_ranks)
from nsoclip.distributed import World
from nsoclip.model import resolve_model_name
from nsoclip.nso import NSO
from nsoclip.parallel import distribute, unwrap
from nsoclip.rng import derive_seed


def quadratic(dim: int, seed: int = 0):
    """L(w) = 1/2 w^T A w + b^T w with A symmetric: grad L(w + e) = A w + b + A e, linear in e."""
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return root + root.T, torch.randn(dim, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("distribution", ["normal", "laplace", "uniform"])
@pytest.mark.parametrize("num_perturbs", [1, 3])
def test_two_point_gradient_is_exact_on_a_quadratic(distribution, num_perturbs):
    a, b = quadratic(6)
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    start = w.detach().clone()
    gradients = []

    def closure():
        loss = 0.5 * w @ a @ w + b @ w
        loss.backward()
        gradients.append(a @ w.detach() + b)
        return loss

    opt = NSO([w], torch.optim.SGD, sigma=3.0, num_perturbs=num_perturbs, distribution=distribution, lr=1.0)
    opt.step(closure)
    exact = a @ start + b
    assert len(gradients) == 2 * num_perturbs
    assert (gradients[0] - exact).abs().max() > 1.0  # a single point is far off with sigma = 3
    torch.testing.assert_close(w.grad, exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.detach(), start - exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distribution", ["normal", "laplace", "uniform"])
def test_one_point_gradient_is_unbiased_and_noise_has_variance_sigma_squared(distribution):
    dim, draws, sigma = 8, 2000, 0.5
    a, b = quadratic(dim, seed=1)
    w = torch.nn.Parameter(torch.randn(dim, dtype=torch.float64))
    start = w.detach().clone()
    noise = []

    def closure():
        noise.append(w.detach() - start)
        loss = 0.5 * w @ a @ w + b @ w
        loss.backward()
        return loss

    opt = NSO([w], torch.optim.SGD, sigma=sigma, num_perturbs=draws, two_point=False,
              distribution=distribution, seed=7, lr=1.0)
    opt.step(closure)
    noise = torch.stack(noise)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(noise.numel())
    assert abs(noise.var() / sigma**2 - 1) < 0.1
    # E[grad L(w + e)] = A w + b; the error of the mean of `draws` samples is A mean(e).
    standard_error = sigma * a.norm(dim=1) / math.sqrt(draws)
    error = (w.grad - (a @ start + b)).abs()
    assert torch.all(error < 5 * standard_error), (error / standard_error).max()
    single_draw_error = (a @ noise[0]).abs().max()
    assert single_draw_error > 10 * standard_error.max()


@pytest.mark.parametrize("lam,num_perturbs,two_point,passes", [
    (0.0, 1, True, 2), (0.0, 2, True, 4), (0.25, 2, True, 5), (0.5, 3, False, 4), (1.0, 2, True, 1),
    (0.3, 0, True, 1),
])
def test_gradient_is_the_weighted_mean_of_the_formula(lam, num_perturbs, two_point, passes):
    """g = lam grad L(w) + (1 - lam) / (k (1 + two_point)) sum grad L(perturbed); the clean pass
    runs only when lam > 0, perturbed passes only when lam < 1; pairs are w + e, w - e."""
    model, batch = mlp(), mlp_batch()
    start = flat(model.parameters())
    points = []
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.3, num_perturbs=num_perturbs, two_point=two_point,
              lam=lam, lr=1.0)
    opt.step(recording_closure(model, batch, points))
    assert len(points) == passes
    if lam > 0:
        assert torch.equal(points[0], start)
    perturbed = points[1:] if lam > 0 else points
    if two_point:
        for plus, minus in zip(perturbed[::2], perturbed[1::2]):
            torch.testing.assert_close(plus + minus, 2 * start, rtol=0, atol=1e-6)
            assert (plus - start).abs().max() > 0.1
    gradients = [gradient_at(model, batch, point) for point in points]
    if lam == 1.0 or num_perturbs == 0:
        expected = gradients[0]
    else:
        perturbed_gradients = gradients[1:] if lam > 0 else gradients
        expected = (1 - lam) * torch.stack(perturbed_gradients).mean(0) + (lam * gradients[0] if lam > 0 else 0)
    torch.testing.assert_close(flat(p.grad for p in model.parameters()), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(model.parameters()), start - expected, rtol=1e-5, atol=1e-6)


def test_update_is_the_base_optimizer_step_from_exactly_restored_weights():
    model, batch = mlp(), mlp_batch()
    reference = mlp()
    opt = NSO(model.parameters(), torch.optim.AdamW, sigma=0.5, num_perturbs=2, lam=0.2, lr=1e-2, weight_decay=0.1)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.step(recording_closure(model, batch))
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            theirs.grad = ours.grad.clone()
        reference_opt.step()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            assert torch.equal(ours, theirs)  # bitwise: w was restored exactly before the update
    assert opt.last_update.applied


def test_resume_continues_the_same_noise_stream():
    batch = mlp_batch()

    def run(steps, model, opt, points):
        for _ in range(steps):
            opt.step(recording_closure(model, batch, points))

    def make(seed):
        model = mlp()
        return model, NSO(model.parameters(), torch.optim.AdamW, sigma=0.2, seed=seed, lr=1e-2)

    model, opt = make(seed=3)
    uninterrupted = []
    run(5, model, opt, uninterrupted)

    model, opt = make(seed=3)
    run(3, model, opt, [])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert set(checkpoint["optimizer"]) == {"state", "param_groups", "nso"}

    resumed_model, resumed = make(seed=999)  # the checkpoint's seed wins
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    resumed_points = []
    run(2, resumed_model, resumed, resumed_points)
    assert len(resumed_points) == 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[6:], resumed_points))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    run(2, model, opt, [])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_noise_comes_from_its_own_seeded_generators_not_the_global_rng():
    batch = mlp_batch()
    runs = []
    for global_seed in (1, 2):
        model = mlp()
        points = []
        opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.1, seed=5, lr=0.1)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        opt.step(recording_closure(model, batch, points))
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(points)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    other = []
    model = mlp()
    NSO(model.parameters(), torch.optim.SGD, sigma=0.1, seed=6, lr=0.1).step(recording_closure(model, batch, other))
    assert not torch.equal(other[0], runs[0][0])
    assert derive_seed(5, 0, 0, 1) != derive_seed(5, 0, 1, 0) != derive_seed(5, 1, 0, 0)


def test_perturb_weights_leaves_biases_norms_and_scalars_alone():
    """Excluding tensors keeps every other tensor's noise: the stream is indexed by position."""
    def model():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"linear": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)}), \
            torch.nn.Parameter(torch.tensor(2.0))

    perturbed = {}
    for perturb in ("all", "weights"):
        modules, logit_scale = model()
        params = [*modules.parameters(), logit_scale]
        start = [p.detach().clone() for p in params]
        seen = []

        def closure():
            seen.append([p.detach().clone() for p in params])
            loss = modules["norm"](modules["linear"](torch.ones(2, 4))).sum() * logit_scale
            loss.backward()
            return loss

        NSO(params, torch.optim.SGD, sigma=0.1, perturb=perturb, lr=0.0).step(closure)
        moved = [not torch.equal(now, then) for now, then in zip(seen[0], start)]
        perturbed[perturb] = seen[0]
        assert moved == ([True] * 5 if perturb == "all" else [True, False, False, False, False])
    assert torch.equal(perturbed["all"][0], perturbed["weights"][0])


def test_antithetic_pair_sees_the_same_rng_state():
    states = []
    model, batch = mlp(dropout=0.5), mlp_batch()

    def closure():
        states.append(torch.get_rng_state())
        loss = mlp_loss(model, batch)  # dropout draws from the global RNG
        loss.backward()
        return loss

    NSO(model.parameters(), torch.optim.SGD, sigma=0.1, num_perturbs=2, lr=0.1).step(closure)
    assert torch.equal(states[0], states[1]) and torch.equal(states[2], states[3])
    assert not torch.equal(states[0], states[2])


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.4, 0.4, 0.4, 0.4, 0.4]),
    ("linear", [0.1, 0.2, 0.3, 0.4, 0.4]),
    ("exp", [0.4 * 0.01 ** 0.75, 0.4 * 0.01 ** 0.5, 0.4 * 0.01 ** 0.25, 0.4, 0.4]),
])
def test_sigma_schedule(schedule, expected):
    w = torch.nn.Parameter(torch.zeros(4000))
    realised = []

    def closure():
        realised.append(float(w.detach().std()))
        loss = w.sum()
        loss.backward()
        return loss

    opt = NSO([w], torch.optim.SGD, sigma=0.4, two_point=False, lr=0.0, sigma_schedule=schedule,
              sigma_ramp_steps=0 if schedule == "constant" else 4)
    for step, sigma in enumerate(expected):
        opt.step(closure)
        assert opt.last_stats["sigma"] == pytest.approx(sigma)
        assert realised[step] == pytest.approx(sigma, rel=0.05)


def test_param_groups_state_and_zero_grad_behave_like_the_base_optimizer():
    model, batch = mlp(), mlp_batch()
    opt = NSO([{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 0.5}],
              torch.optim.SGD, sigma=0.1, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    opt.step(recording_closure(model, batch))
    scheduler.step()
    assert [g["lr"] for g in opt.base_optimizer.param_groups] == [0.05, 0.25]
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_fp16_grad_scaler_skips_the_step_on_inf_and_unscales_once_otherwise():
    model, batch = mlp(), mlp_batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.1, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mlp_loss(model, batch)
        if len(calls) == 2:
            loss = loss * float("inf")  # overflow in the w - e pass only
        scaler.scale(loss).backward()
        return loss

    start = flat(model.parameters())
    opt.step(closure, grad_scaler=scaler)
    assert not opt.last_update.applied
    assert torch.equal(flat(model.parameters()), start)
    assert scaler.get_scale() == 2.0**11

    reference, reference_batch = mlp(), mlp_batch()
    reference_opt = NSO(reference.parameters(), torch.optim.SGD, sigma=0.1, seed=0, lr=0.1)
    reference_opt.step_count = 1  # same noise as the scaled run's second step
    opt.step(recording_closure(model, batch, grad_scaler=scaler), grad_scaler=scaler)
    reference_opt.step(recording_closure(reference, reference_batch))
    assert opt.last_update.applied
    torch.testing.assert_close(flat(model.parameters()), flat(reference.parameters()), rtol=1e-6, atol=1e-7)


def test_gradient_clipping_applies_to_the_estimated_gradient():
    model, batch = mlp(), mlp_batch()
    start = flat(model.parameters())
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.1, lr=1.0)
    opt.step(recording_closure(model, batch), max_grad_norm=1e-3)
    assert opt.last_update.grad_norm > 1e-2
    assert (flat(model.parameters()) - start).norm() == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    ({"sigma": -0.1}, "sigma"),
    ({"sigma": float("nan")}, "sigma"),
    ({"sigma": 0.1, "num_perturbs": -1}, "num_perturbs"),
    ({"sigma": 0.1, "lam": 1.5}, "lam"),
    ({"sigma": 0.1, "lam": -0.1}, "lam"),
    ({"sigma": 0.1, "distribution": "cauchy"}, "distribution"),
    ({"sigma": 0.1, "num_perturbs": 0, "lam": 0.0}, "no gradient"),
    ({"sigma": 0.1, "num_perturbs": 0, "two_point": False}, "no gradient"),
    ({"sigma": 0.1, "sigma_schedule": "cosine"}, "sigma_schedule"),
    ({"sigma": 0.1, "sigma_schedule": "linear"}, "sigma_ramp_steps"),
    ({"sigma": 0.1, "sigma_ramp_steps": -2}, "sigma_ramp_steps"),
    ({"sigma": 0.1, "perturb": "biases"}, "perturb"),
])
def test_invalid_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NSO(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_base_optimizer_must_be_a_class_not_an_instance():
    model = mlp()
    with pytest.raises(ValueError, match="base_optimizer"):
        NSO(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), sigma=0.1)


# ---- two gloo ranks ---------------------------------------------------------------------------

CLIP_STEPS = 3


def clip_nso(model_params, ddp_model=None):
    # SGD with momentum: linear in the gradient, so float-order noise is not amplified the way
    # Adam amplifies it for near-zero gradient entries; the comparison stays tight.
    return NSO(model_params, torch.optim.SGD, sigma=0.01, seed=11, ddp_model=ddp_model, lr=0.5, momentum=0.9)


def clip_world_worker(rank, world_size, port, config, initial, data, out_dir):
    init_gloo(rank, world_size, port)
    model = open_clip.create_model(resolve_model_name(config), output_dict=True)
    model.load_state_dict(torch.load(initial, weights_only=True))
    ddp_model = DDP(model)
    all_reduces = count_all_reduces(ddp_model)
    images, texts = torch.load(data, weights_only=True)
    half = images.shape[0] // world_size
    images, texts = images[rank * half:(rank + 1) * half], texts[rank * half:(rank + 1) * half]
    loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    opt = clip_nso(ddp_model.parameters(), ddp_model)
    checksums, per_step = [], []

    def checksum_closure():
        weights = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        mine = torch.stack([weights.sum(), (weights * torch.arange(weights.numel(), dtype=torch.float64)).sum()])
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        checksums.append(torch.stack(gathered))
        loss = loss_fn(**ddp_model(images, texts))
        loss.backward()
        return loss

    for _ in range(CLIP_STEPS):
        before = all_reduces[0]
        opt.step(checksum_closure)
        per_step.append(all_reduces[0] - before)
    result = {"checksums": torch.stack(checksums), "nso_all_reduces": per_step}
    if rank == 0:
        result["state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}

    # Variants: clean pass + k = 2, and a closure with micro-batches under its own nested no_sync.
    counts = {}
    heavy = NSO(ddp_model.parameters(), torch.optim.SGD, sigma=0.01, num_perturbs=2, lam=0.5,
                ddp_model=ddp_model, lr=0.0)
    before = all_reduces[0]

    def whole_batch_closure():
        loss = loss_fn(**ddp_model(images, texts))
        loss.backward()
        return loss

    heavy.step(whole_batch_closure)
    counts["lam0.5_k2"] = all_reduces[0] - before

    def micro_batch_closure():
        chunks = list(zip(images.chunk(2), texts.chunk(2)))
        with ddp_model.no_sync():
            first = loss_fn(**ddp_model(*chunks[0]))
            first.backward()
        second = loss_fn(**ddp_model(*chunks[1]))
        second.backward()
        return (first + second).detach() / 2

    before = all_reduces[0]
    heavy.step(micro_batch_closure)
    counts["nested_no_sync"] = all_reduces[0] - before
    result["variant_all_reduces"] = counts
    result.update(compiled_ddp_steps(rank, world_size, config, initial, images, texts, loss_fn))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def compiled_ddp_steps(rank, world_size, config, initial, images, texts, loss_fn) -> dict:
    """The same NSO steps from the same start through --torchcompile's layout, torch.compile(DDP)
    (OpenCLIP's order; aot_eager is bitwise equal to eager), counting all-reduces and asserting
    that no step after the first recompiles."""
    model = open_clip.create_model(resolve_model_name(config), output_dict=True)
    model.load_state_dict(torch.load(initial, weights_only=True))
    layout = distribute(model, World(rank=rank, world_size=world_size), compile=dict(backend="aot_eager", mode=None))
    ddp_model = layout.forward_model._orig_mod
    assert isinstance(ddp_model, DDP) and unwrap(layout.forward_model) is model
    assert unwrap(DDP(torch.compile(model))) is model
    all_reduces = count_all_reduces(ddp_model)
    opt = clip_nso(model.parameters(), layout)

    def closure():
        loss = loss_fn(**layout.forward_model(images, texts))
        loss.backward()
        return loss

    per_step = []
    for step in range(CLIP_STEPS):
        before = all_reduces[0]
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            opt.step(closure)
        per_step.append(all_reduces[0] - before)
    result = {"compiled_all_reduces": per_step, "compiled_graphs": counters["stats"]["unique_graphs"]}
    if rank == 0:
        result["compiled_state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
    return result


@pytest.fixture(scope="module")
def clip_two_ranks(tmp_path_factory):
    """Runs the 2-rank job once; the tests below check different parts of its record."""
    directory = tmp_path_factory.mktemp("nso_clip")
    config = os.path.join(os.path.dirname(__file__), "configs", "tiny-vit.json")
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(config), output_dict=True)
    initial = str(directory / "initial.pt")
    torch.save(model.state_dict(), initial)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=generator)
    texts = torch.randint(0, 49408, (16, 16), generator=generator)
    data = str(directory / "data.pt")
    torch.save((images, texts), data)
    run_ranks(clip_world_worker, 2, config, initial, data, str(directory))
    ranks = [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    # The same steps in one process on the concatenated batch.
    loss_fn = open_clip.ClipLoss()
    opt = clip_nso(model.parameters())

    def closure():
        loss = loss_fn(**model(images, texts))
        loss.backward()
        return loss

    for _ in range(CLIP_STEPS):
        opt.step(closure)
    return {"ranks": ranks, "initial": torch.load(initial, weights_only=True), "single": model.state_dict()}


@pytest.mark.slow
def test_every_rank_sees_identical_perturbed_weights(clip_two_ranks):
    checksums = clip_two_ranks["ranks"][0]["checksums"]  # (passes, ranks, 2), gathered inside the closure
    assert checksums.shape == (2 * CLIP_STEPS, 2, 2)
    assert torch.equal(checksums[:, 0], checksums[:, 1])
    assert not torch.equal(checksums[0, 0], checksums[1, 0])  # w + e and w - e differ


@pytest.mark.slow
def test_exactly_one_gradient_all_reduce_per_step(clip_two_ranks):
    for rank in clip_two_ranks["ranks"]:
        assert rank["nso_all_reduces"] == [1] * CLIP_STEPS
        assert rank["variant_all_reduces"] == {"lam0.5_k2": 1, "nested_no_sync": 1}


@pytest.mark.slow
def test_compiled_ddp_equals_eager_ddp_with_one_all_reduce_per_step(clip_two_ranks):
    for rank in clip_two_ranks["ranks"]:
        assert rank["compiled_all_reduces"] == [1] * CLIP_STEPS
        assert rank["compiled_graphs"] >= 1
    eager, compiled = (clip_two_ranks["ranks"][0][key] for key in ("state_dict", "compiled_state_dict"))
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.slow
def test_two_ranks_with_half_batches_equal_one_rank_with_the_whole_batch(clip_two_ranks):
    """Why the objectives agree: with local_loss + gather_with_grad, rank r's loss L_r is the
    contrastive loss of its B/2 rows against all B columns, so mean_r L_r is exactly the
    single-process loss on B. Rank r's backward yields d(sum_r' L_r')/d(its features) (the
    all_gather's backward sums over ranks) times d(features)/d(theta), plus d(L_r)/d(logit_scale);
    DDP's average over the 2 ranks is therefore grad(mean_r L_r) = the single-process gradient.
    Identical noise on every rank (seeded per tensor) makes every perturbed point agree too. The
    tiny ViT has no dropout, so nothing else is random."""
    two_ranks, single, initial = clip_two_ranks["ranks"][0]["state_dict"], clip_two_ranks["single"], \
        clip_two_ranks["initial"]
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 1e-3
    for key in single:
        torch.testing.assert_close(two_ranks[key], single[key], rtol=1e-4, atol=2e-6, msg=key)
