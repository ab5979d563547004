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
SCALES = ("filter", "layer", "element")
SCALED_STEPS = 2


def scaled_nso(params, noise_scale, ddp_model=None):
    return NSO(params, torch.optim.SGD, sigma=0.05, seed=5, noise_scale=noise_scale, ddp_model=ddp_model,
               lr=0.5, momentum=0.9)


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

    # Noise relative to the weights: fresh models from the same initial weights.
    result["scaled"] = {}
    for noise_scale in SCALES:
        scaled_model = open_clip.create_model(resolve_model_name(config), output_dict=True)
        scaled_model.load_state_dict(torch.load(initial, weights_only=True))
        scaled_ddp = DDP(scaled_model)
        scaled_opt = scaled_nso(scaled_ddp.parameters(), noise_scale, scaled_ddp)

        def scaled_closure():
            loss = loss_fn(**scaled_ddp(images, texts))
            loss.backward()
            return loss

        for _ in range(SCALED_STEPS):
            scaled_opt.step(scaled_closure)
        result["scaled"][noise_scale] = {k: v.clone() for k, v in scaled_model.state_dict().items()}
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
    scaled = {}
    for noise_scale in SCALES:
        single = open_clip.create_model(resolve_model_name(config), output_dict=True)
        single.load_state_dict(torch.load(initial, weights_only=True))
        scaled_opt = scaled_nso(single.parameters(), noise_scale)

        def scaled_closure():
            loss = loss_fn(**single(images, texts))
            loss.backward()
            return loss

        for _ in range(SCALED_STEPS):
            scaled_opt.step(scaled_closure)
        scaled[noise_scale] = single.state_dict()
    return {"ranks": ranks, "initial": torch.load(initial, weights_only=True), "single": model.state_dict(),
            "scaled": scaled}


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


# ---- noise relative to the weights, per-group sigma, schedules of perturbed steps ------------

def scaled_tensors():
    """A matrix whose rows differ in scale by 30x, a 1-d tensor and a scalar."""
    generator = torch.Generator().manual_seed(4)
    rows = torch.logspace(-1.5, 0, 8).unsqueeze(1)
    matrix = torch.nn.Parameter(torch.randn(8, 4000, generator=generator) * rows)
    vector = torch.nn.Parameter(torch.randn(3000, generator=generator) * 0.3)
    scalar = torch.nn.Parameter(torch.tensor(-2.0))
    return [matrix, vector, scalar]


def noise_of_one_step(params, noise_scale, two_point=False, **kwargs):
    """The perturbations e (point - w) NSO evaluated at, per pass and tensor."""
    start = [p.detach().clone() for p in params]
    points = []

    def closure():
        points.append([(p.detach() - s) for p, s in zip(params, start)])
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    NSO(params, torch.optim.SGD, sigma=0.1, two_point=two_point, noise_scale=noise_scale, lr=0.0,
        **kwargs).step(closure)
    return start, points


@pytest.mark.parametrize("noise_scale", ["absolute", "filter", "layer", "element"])
def test_noise_std_follows_the_scale_rule(noise_scale):
    sigma, eta = 0.1, 0.01
    (matrix, vector, scalar), [noise] = noise_of_one_step(scaled_tensors(), noise_scale, noise_eta=eta)
    e_matrix, e_vector, e_scalar = noise
    row_std = e_matrix.std(dim=1)
    if noise_scale == "absolute":
        expected_rows, expected_vector = torch.full((8,), sigma), sigma
    elif noise_scale == "filter":
        expected_rows = sigma * matrix.norm(dim=1) / math.sqrt(matrix.shape[1])
        expected_vector = sigma * vector.norm() / math.sqrt(vector.numel())
        assert abs(e_scalar) > 0 and e_scalar.abs() < 6 * sigma * abs(scalar)
    elif noise_scale == "layer":
        expected_rows = torch.full((8,), float(sigma * matrix.norm() / math.sqrt(matrix.numel())))
        expected_vector = sigma * vector.norm() / math.sqrt(vector.numel())
    else:  # element: e / (sigma (|w| + eta)) is unit-std noise, in every row whatever its scale
        standardised = e_matrix / (sigma * (matrix.abs() + eta))
        torch.testing.assert_close(standardised.std(dim=1), torch.ones(8), rtol=0.05, atol=0)
        assert abs(float((e_vector / (sigma * (vector.abs() + eta))).std()) - 1) < 0.05
        return
    # Each row's std has a relative standard error of about 1/sqrt(2 * 4000) = 1.1%.
    torch.testing.assert_close(row_std, expected_rows.float(), rtol=0.05, atol=0)
    assert abs(float(e_vector.std()) / float(expected_vector) - 1) < 0.05
    if noise_scale == "filter":  # rows 30x apart get noise 30x apart
        assert row_std[-1] / row_std[0] > 20


@pytest.mark.parametrize("noise_scale", ["filter", "layer", "element"])
def test_relative_noise_pairs_stay_antithetic(noise_scale):
    """Norms come from the snapshot: w - e mirrors w + e exactly (up to one float rounding)."""
    _, points = noise_of_one_step(scaled_tensors(), noise_scale, two_point=True)
    plus, minus = points
    for e_plus, e_minus in zip(plus, minus):
        torch.testing.assert_close(e_minus, -e_plus, rtol=0, atol=1e-6)
        assert e_plus.abs().max() > 0


def test_relative_std_of_a_dim0_shard_is_the_shard_of_the_whole():
    """The contract a sharded layout relies on: filter rows are local to a dim-0 shard; a
    tensor-wide norm needs the sum of the shards' sums of squares (one reduction) and the whole
    tensor's numel."""
    from nsoclip.nso import relative_std, sum_of_squares
    weights = scaled_tensors()[0].detach()
    whole = relative_std("filter", weights)
    shards = weights.chunk(3)
    offsets = [0, *torch.tensor([len(s) for s in shards]).cumsum(0).tolist()]
    for shard, start in zip(shards, offsets):
        torch.testing.assert_close(relative_std("filter", shard), whole[start:start + len(shard)], rtol=0, atol=0)
    total = sum(sum_of_squares(shard) for shard in shards)
    torch.testing.assert_close(relative_std("layer", shards[1], total, weights.numel()),
                               relative_std("layer", weights), rtol=1e-6, atol=0)


def test_reduce_hook_gets_the_tensor_wide_sums_once_per_step():
    calls = []

    def reduce(sums):
        calls.append([float(s) for s in sums])
        return sums

    params = scaled_tensors()
    _, [noise] = noise_of_one_step(params, "filter", reduce=reduce)
    # filter: the 1-d tensor and the scalar need tensor-wide norms, the matrix's rows do not.
    assert len(calls) == 1 and len(calls[0]) == 2
    assert calls[0][1] == pytest.approx(4.0)
    _, [doubled] = noise_of_one_step(scaled_tensors(), "filter", reduce=lambda sums: [4 * s for s in sums])
    torch.testing.assert_close(doubled[1], 2 * noise[1])  # the norm is what reduce returned
    torch.testing.assert_close(doubled[0], noise[0])


def named_tiny_clip():
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(os.path.join(os.path.dirname(__file__), "configs",
                                                                   "tiny-vit.json")), output_dict=True)
    return model


def test_sigma_groups_assign_sigma_by_tower_and_name_first_match_wins():
    model = named_tiny_clip()
    names = [n for n, _ in model.named_parameters()]
    opt = NSO(model.named_parameters(), torch.optim.SGD, sigma=0.02,
              sigma_groups="visual.conv1=0.03,visual=0.01,text=0.005,logit_scale=0", lr=0.0)
    sigma = dict(zip(names, opt.tensor_sigmas))
    assert sigma["visual.conv1.weight"] == 0.03  # listed before 'visual': first match wins
    assert sigma["visual.transformer.resblocks.0.attn.in_proj_weight"] == 0.01
    assert sigma["visual.class_embedding"] == 0.01
    # 'text' is the text tower (layout.tower_of), whose OpenCLIP names do not say "text".
    assert sigma["transformer.resblocks.1.mlp.c_fc.weight"] == 0.005
    assert sigma["token_embedding.weight"] == sigma["ln_final.weight"] == sigma["text_projection"] == 0.005
    assert sigma["logit_scale"] == 0.0
    assert set(opt.tensor_sigmas) == {0.03, 0.01, 0.005, 0.0}
    # The rest keep --nso-sigma.
    assert NSO(model.named_parameters(), torch.optim.SGD, sigma=0.02, sigma_groups=[("visual", 0.01)],
               lr=0.0).tensor_sigmas[names.index("token_embedding.weight")] == 0.02

    # The realised noise: each large tensor's std is its group's sigma; sigma 0 leaves it at w.
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    def closure():
        seen.update({n: p.detach() - start[n] for n, p in model.named_parameters()})
        out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16)))
        loss = open_clip.ClipLoss()(**out)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(seen["logit_scale"], torch.zeros(()))
    for name, noise in seen.items():
        if noise.numel() >= 4000:
            assert float(noise.std()) == pytest.approx(sigma[name], rel=0.1), name


@pytest.mark.parametrize("groups,message", [
    ("visual", "is not pattern=sigma"),
    ("visual=abc", "is not a number"),
    ("=0.1", "is not pattern=sigma"),
    ("visual=-0.1", "must be a finite number >= 0"),
    ("visual=0.1,visual=0.2", "is given twice"),
    ("visual=0.1,vision=0.2", "'vision' matches no trainable parameter"),
])
def test_bad_sigma_groups_raise(groups, message):
    from nsoclip.nso import SigmaGroupsError
    with pytest.raises(SigmaGroupsError, match=message):
        NSO(named_tiny_clip().named_parameters(), torch.optim.SGD, sigma=0.01, sigma_groups=groups, lr=0.0)


def test_sigma_groups_need_parameter_names():
    with pytest.raises(ValueError, match="named parameters"):
        NSO(named_tiny_clip().parameters(), torch.optim.SGD, sigma=0.01, sigma_groups="visual=0.1", lr=0.0)


def counting_closure(model, batch, calls):
    def closure():
        calls.append(flat(model.parameters()))
        loss = mlp_loss(model, batch)
        loss.backward()
        return loss
    return closure


def test_every_and_start_step_choose_the_step_kinds():
    """Steps t >= S with (t - S) % N == 0 are perturbed (two passes); the others are plain
    steps from one pass at w, exactly the base optimizer's step."""
    model, batch, reference = mlp(), mlp_batch(), mlp()
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.3, every=3, start_step=2, lr=0.1)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    kinds = []
    for step in range(9):
        calls = []
        start = flat(model.parameters())
        opt.step(counting_closure(model, batch, calls))
        kinds.append(opt.last_update.perturbed)
        assert len(calls) == (2 if kinds[-1] else 1)
        if not kinds[-1]:
            assert torch.equal(calls[0], start) and set(opt.last_stats) == {"clean_loss", "grad_norm"}
            reference.load_state_dict(model.state_dict())
            torch.nn.utils.vector_to_parameters(start, reference.parameters())
            reference_opt.zero_grad()
            mlp_loss(reference, batch).backward()
            reference_opt.step()
            assert torch.equal(flat(reference.parameters()), flat(model.parameters()))
    assert kinds == [False, False, True, False, False, True, False, False, True]


def test_every_and_start_step_resume_exactly():
    batch = mlp_batch()

    def make(seed=2):
        model = mlp()
        return model, NSO(model.parameters(), torch.optim.AdamW, sigma=0.2, seed=seed, every=2, start_step=3, lr=1e-2)

    model, opt = make()
    points = []
    for _ in range(8):
        opt.step(counting_closure(model, batch, points))

    interrupted, interrupted_opt = make()
    for _ in range(5):
        interrupted_opt.step(counting_closure(interrupted, batch, []))
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optimizer": interrupted_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = make(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    resumed_points, kinds = [], []
    for _ in range(3):
        resumed_opt.step(counting_closure(resumed, batch, resumed_points))
        kinds.append(resumed_opt.last_update.perturbed)
    assert kinds == [True, False, True]  # steps 5, 6, 7 with S = 3, N = 2
    # Steps 0-4 made 1+1+1+2+1 = 6 passes; the resumed steps 5-7 repeat passes 6.. exactly.
    assert all(torch.equal(a, b) for a, b in zip(points[6:], resumed_points)) and len(resumed_points) == 5
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("noise_scale", SCALES)
def test_relative_noise_two_ranks_equal_one_process(clip_two_ranks, noise_scale):
    """Norms of w are the same on every rank, so every rank draws the same relative noise."""
    two_ranks = [rank["scaled"][noise_scale] for rank in clip_two_ranks["ranks"]]
    single, initial = clip_two_ranks["scaled"][noise_scale], clip_two_ranks["initial"]
    assert all(torch.equal(two_ranks[0][k], two_ranks[1][k]) for k in single)
    assert max(float((single[k] - initial[k]).abs().max()) for k in single) > 1e-3
    for key in single:
        torch.testing.assert_close(two_ranks[0][key], single[key], rtol=1e-4, atol=2e-6, msg=f"{noise_scale}: {key}")


def test_added_parameter_group_gets_its_sigma():
    model = named_tiny_clip()
    named = list(model.named_parameters())
    conv = next(pair for pair in named if pair[0] == "visual.conv1.weight")
    opt = NSO([pair for pair in named if pair is not conv], torch.optim.SGD, sigma=0.02, sigma_groups="visual=0.5",
              lr=0.0)
    opt.add_param_group({"params": [conv]})
    start = conv[1].detach().clone()
    seen = []

    def closure():
        seen.append(conv[1].detach() - start)
        loss = sum(p.sum() for _, p in named)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(opt.tensor_sigmas) == len(named) and opt.tensor_sigmas[-1] == 0.5
    assert float(seen[0].std()) == pytest.approx(0.5, rel=0.1)
