"""Hessian evaluator against the exact Hessian of the micro CLIP (1633 parameters): trace and
per-parameter traces, top eigenvalues, exact vs finite-difference HVPs, Hutch++ vs Hutchinson,
noise stability and curvature; 2 gloo ranks against one process; bad input."""
import datetime
import math
import os

import open_clip
import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import CONFIGS, run_ranks
from nsoclip.curvature import (HessianError, Objective, curvature_along, hessian_metrics, hessian_trace,
                               noise_stability, top_eigenvalues)
from nsoclip.layout import block_of, tower_of
from nsoclip.loss import contrastive_loss_fn
from nsoclip.model import resolve_model_name
from nsoclip.spectral import hutchinson, hutchpp, lanczos_top

MICRO = str(CONFIGS / "micro-vit.json")
BATCH, NUM_BATCHES = 6, 2


def micro_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(resolve_model_name(MICRO), output_dict=True)


def micro_batches(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, 8, 8, generator=generator), torch.randint(1, 16, (BATCH, 4), generator=generator))
            for _ in range(NUM_BATCHES)]


def local_loss_fn():
    return contrastive_loss_fn(open_clip.ClipLoss())


def exact_hessian(model, loss_fn, batches) -> torch.Tensor:
    """The full Hessian by torch.autograd.functional.hessian on the flat parameter vector
    (an independent code path: functional_call + vmapped reverse-over-reverse)."""
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(vector):
        state = {n: piece.view(s) for n, piece, s in zip(names, vector.split(sizes), shapes)}
        call = lambda images, texts: torch.func.functional_call(model, state, (images, texts))  # noqa: E731
        return sum(loss_fn(call, batch) for batch in batches) / len(batches)

    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(objective, flat, vectorize=True)
    model.train()
    return hessian.double()


@pytest.fixture(scope="module")
def micro():
    model, batches, loss_fn = micro_model(), micro_batches(), local_loss_fn()
    hessian = exact_hessian(model, loss_fn, batches)
    blocks, start = {}, 0
    for name, p in model.named_parameters():
        blocks[name] = hessian[start:start + p.numel(), start:start + p.numel()].trace().item()
        start += p.numel()
    return {"model": model, "batches": batches, "loss_fn": loss_fn, "hessian": hessian, "blocks": blocks,
            "eigenvalues": torch.linalg.eigvalsh(hessian).flip(0)}


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


PROBES = 36


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_and_per_param_traces_match_exact_hessian(micro, method):
    model = micro["model"]
    model.train()
    before = flat_weights(model)
    result = hessian_trace(model, micro["loss_fn"], micro["batches"], num_probes=PROBES, method=method, seed=3)
    exact = micro["hessian"].trace().item()
    assert result["num_hvps"] == PROBES and result["num_probes"] == PROBES
    assert abs(result["trace"] - exact) <= 3 * result["stderr"], (result["trace"], exact, result["stderr"])
    # The standard error is the right size: Hutchinson's per-probe variance is
    # 2 (||H||_F^2 - sum_i H_ii^2); Hutch++'s deflated residual must not do worse.
    hessian = micro["hessian"]
    expected_stderr = math.sqrt(2 * (hessian.pow(2).sum() - hessian.diagonal().pow(2).sum()).item() / PROBES)
    if method == "hutchinson":
        assert 0.6 * expected_stderr < result["stderr"] < 1.5 * expected_stderr, (result["stderr"], expected_stderr)
    else:
        assert result["stderr"] < expected_stderr, (result["stderr"], expected_stderr)
    assert model.training and torch.equal(flat_weights(model), before)  # mode and weights restored
    assert set(result["per_param"]) == set(micro["blocks"])
    for name, block_trace in micro["blocks"].items():
        tolerance = 4 * result["per_param_stderr"][name] + 1e-6 * abs(exact)
        assert abs(result["per_param"][name] - block_trace) <= tolerance, (name, result["per_param"][name], block_trace)
    assert math.isclose(sum(result["per_param"].values()), result["trace"], rel_tol=1e-9)
    assert math.isclose(sum(result["per_tower"].values()), result["trace"], rel_tol=1e-9)
    assert math.isclose(sum(result["per_block"].values()), result["trace"], rel_tol=1e-9)


def test_per_block_traces_are_exact_when_the_sketch_spans_everything():
    """Hutch++'s per-segment split (exact part from A Q, residual from probes) on a dense
    matrix: with a sketch as large as the dimension the residual vanishes and every block's
    trace is exact; Hutchinson's per-block estimates are unbiased (checked over many probes)."""
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    matrix = root @ root.T - 5 * torch.eye(12, dtype=torch.float64)
    segments = [(0, 3), (3, 7), (7, 12)]
    exact = [matrix[a:b, a:b].trace().item() for a, b in segments]
    sketched = hutchpp(lambda rows: rows @ matrix, 12, 39, torch.Generator().manual_seed(1), segments, torch.float64)
    assert torch.allclose(sketched.samples.mean(0), torch.tensor(exact, dtype=torch.float64), atol=1e-9)
    probed = hutchinson(lambda rows: rows @ matrix, 12, 4000, torch.Generator().manual_seed(2), segments, torch.float64)
    for column, value in enumerate(exact):
        mean, stderr = probed.estimate([column])
        assert abs(mean - value) <= 4 * stderr


def test_top_eigenvalues_match_exact_eigenvalues(micro):
    eigenvalues = top_eigenvalues(micro["model"], micro["loss_fn"], micro["batches"], k=3, max_iter=100, seed=1)
    exact = micro["eigenvalues"][:3].tolist()
    assert len(eigenvalues) == 3 and eigenvalues == sorted(eigenvalues, reverse=True)
    for found, truth in zip(eigenvalues, exact):
        assert abs(found - truth) <= 1e-3 * abs(truth), (eigenvalues, exact)


def test_lanczos_finds_largest_algebraic_eigenvalues_of_a_coupled_matrix():
    """A dense matrix with a dominant negative eigenvalue and strong coupling between three
    parameter blocks: the eigenvalues are those of the whole matrix (one jointly normalised
    vector), largest algebraic first, not the largest in magnitude nor per-block values."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([-50.0, 19.7, 12.0, 11.5], dtype=torch.float64),
                          torch.linspace(-3, 3, 36, dtype=torch.float64)])
    matrix = basis @ torch.diag(spectrum) @ basis.T
    found, used = lanczos_top(lambda rows: rows @ matrix, 40, 3, 40, 1e-6, torch.Generator().manual_seed(1),
                              torch.float64)
    assert used <= 40
    assert torch.allclose(torch.tensor(found, dtype=torch.float64), torch.tensor([19.7, 12.0, 11.5], dtype=torch.float64),
                          rtol=1e-6)


def test_exact_and_finite_difference_hvps_agree(micro):
    """Exact HVP vs H v from the full Hessian: 1e-4 relative; finite difference (fp32, RMS step
    FD_STEP = 3e-5) vs exact: below 2e-3 relative (measured 1e-4 to 3e-4); weights restored bit for bit."""
    model = micro["model"]
    before = flat_weights(model)
    generator = torch.Generator().manual_seed(5)
    with Objective(model, micro["loss_fn"], micro["batches"], hvp="exact") as exact_op, \
            Objective(model, micro["loss_fn"], micro["batches"], hvp="finite_difference") as fd_op:
        for _ in range(3):
            vector = torch.randint(0, 2, (exact_op.dim,), generator=generator).float() * 2 - 1
            truth = micro["hessian"] @ vector.double()
            exact = exact_op.hvp(vector).double()
            approx = fd_op.hvp(vector).double()
            assert (exact - truth).norm() <= 1e-4 * truth.norm()
            assert (approx - exact).norm() <= 2e-3 * exact.norm(), ((approx - exact).norm() / exact.norm()).item()
    assert torch.equal(flat_weights(model), before)


def counted(loss_fn):
    """loss_fn and the list it appends to on every call: how often a graph was built."""
    calls = []

    def wrapped(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    return wrapped, calls


def test_products_share_each_batch_graph_and_keep_a_single_one(micro):
    """Rows of one products() call share each batch's graph (one loss evaluation per batch and
    call); a single batch's graph is kept between calls and dropped when at_antithetic_points()
    swaps the weights, so the next product is again the Hessian at w. Every product matches H v from the
    exact Hessian, for one batch and for two."""
    model = micro["model"]
    one = micro["batches"][:1]
    hessian_one = exact_hessian(model, micro["loss_fn"], one)
    loss_fn, calls = counted(micro["loss_fn"])
    with Objective(model, loss_fn, one) as objective:
        rows = torch.randint(0, 2, (3, objective.dim), generator=torch.Generator().manual_seed(11)).float() * 2 - 1
        first = objective.products(rows)
        again = objective.hvp(rows[1])
        assert len(calls) == 1 and torch.equal(again, first[1])
        clean = objective.loss()
        moved = objective.at_antithetic_points(objective.split(rows[0]), 0.1, objective.loss)
        assert len(calls) == 4 and clean not in moved
        after = objective.hvp(rows[1])
        assert len(calls) == 5 and torch.equal(after, first[1])
    truth = rows.double() @ hessian_one
    assert (first.double() - truth).norm() <= 1e-4 * truth.norm()

    loss_fn, calls = counted(micro["loss_fn"])
    with Objective(model, loss_fn, micro["batches"]) as objective:
        both = objective.products(rows)
        assert len(calls) == NUM_BATCHES
        objective.hvp(rows[0])
        assert len(calls) == 2 * NUM_BATCHES
    truth = rows.double() @ micro["hessian"]
    assert (both.double() - truth).norm() <= 1e-4 * truth.norm()


def test_antithetic_points_leave_w_untouched_even_on_error(micro):
    """The points are swapped in under the parameters; the parameters hold w's own tensors,
    unchanged, afterwards, also when the evaluation raises."""
    model = micro["model"]
    before = flat_weights(model)
    storages = [p.data.data_ptr() for p in model.parameters()]
    with Objective(model, micro["loss_fn"], micro["batches"]) as objective:
        direction = objective.split(torch.ones(objective.dim))
        seen = objective.at_antithetic_points(direction, 0.5, lambda: flat_weights(model))
        assert torch.allclose(seen[0], before + 0.5) and torch.allclose(seen[1], before - 0.5)

        def fail():
            raise RuntimeError("out of memory")

        with pytest.raises(RuntimeError, match="out of memory"):
            objective.at_antithetic_points(direction, 0.5, fail)
    assert torch.equal(flat_weights(model), before)
    assert [p.data.data_ptr() for p in model.parameters()] == storages


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_block_size_changes_speed_not_results(micro, hvp):
    """Hutchinson draws the same probes whatever the block, and a product does not depend on
    the other rows of its block: the estimates agree to float32 rounding (kernels may round
    differently with other memory layouts)."""
    model, loss_fn, batches = micro["model"], micro["loss_fn"], micro["batches"]
    results = [hessian_trace(model, loss_fn, batches, num_probes=10, hvp=hvp, seed=2, block_size=size)
               for size in (1, 4, 16)]
    for result in results[1:]:
        assert result["trace"] == pytest.approx(results[0]["trace"], rel=1e-5)
        assert result["per_param"] == pytest.approx(results[0]["per_param"], rel=1e-5, abs=1e-6 * abs(result["trace"]))


def test_hutchpp_beats_hutchinson_on_outlier_spectrum(micro):
    """The micro CLIP's Hessian has a few large outliers at both ends (eigenvalues 2.0e4, 8.2e3,
    6.9e3 and -1.9e4, -9.3e3, -8.2e3 against a bulk mostly below 3e3 in magnitude; trace -1.9e4,
    Frobenius norm 3.5e4). At 96 HVPs over 8 seeds the measured mean absolute errors are
    Hutchinson 4146 and Hutch++ 409 (10x smaller); the test asks for at least 4x."""
    hessian = micro["hessian"].float()
    exact = micro["hessian"].trace().item()
    segments = [(0, hessian.shape[0])]
    errors = {"hutchinson": [], "hutchpp": []}
    for seed in range(8):
        for method, estimator in (("hutchinson", hutchinson), ("hutchpp", hutchpp)):
            samples = estimator(lambda rows: rows @ hessian, hessian.shape[0], 96, torch.Generator().manual_seed(seed),
                                segments)
            errors[method].append(abs(samples.estimate()[0] - exact))
    mean_error = {method: sum(values) / len(values) for method, values in errors.items()}
    assert mean_error["hutchpp"] < mean_error["hutchinson"] / 4, mean_error


def test_noise_stability_matches_half_sigma_squared_trace(micro):
    """E[L(w+e)] - L(w) = sigma^2/2 tr(H) + O(sigma^4): at sigma = 1e-4 the two-point estimate
    agrees with the exact trace within 3 standard errors; weights restored exactly."""
    model = micro["model"]
    before = flat_weights(model)
    sigma = 1e-4
    [result] = noise_stability(model, micro["loss_fn"], micro["batches"], [sigma], num_draws=48, seed=0)
    expected = sigma ** 2 / 2 * micro["hessian"].trace().item()
    assert abs(result["mean"] - expected) <= 3 * result["stderr"], (result, expected)
    assert result["stderr"] < 0.5 * abs(expected)
    assert torch.equal(flat_weights(model), before)


def test_curvature_along_a_direction(micro):
    model = micro["model"]
    generator = torch.Generator().manual_seed(7)
    direction = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    flat = torch.cat([d.reshape(-1) for d in direction.values()]).double()
    result = curvature_along(model, micro["loss_fn"], micro["batches"], direction)
    expected = (flat @ micro["hessian"] @ flat).item()
    assert math.isclose(result["curvature"], expected, rel_tol=1e-4)
    assert math.isclose(result["rayleigh_quotient"], expected / flat.dot(flat).item(), rel_tol=1e-4)


def test_parameter_filter_and_training_metrics(micro):
    """A name filter restricts the Hessian to those parameters' principal submatrix."""
    model = micro["model"]
    result = hessian_trace(model, micro["loss_fn"], micro["batches"], num_probes=24, params="visual.transformer")
    assert set(result["per_param"]) == {n for n in micro["blocks"] if "visual.transformer" in n}
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    keep = torch.cat([torch.arange(s, s + n) for name, s, n in zip(names, starts, sizes) if "visual.transformer" in name])
    sub_trace = micro["hessian"][keep][:, keep].trace().item()
    assert abs(result["trace"] - sub_trace) <= 3 * result["stderr"] + 1e-3 * abs(sub_trace)

    class Args:
        hessian_probes, hessian_method, hessian_hvp, hessian_params = 4, "hutchinson", "exact", None
        hessian_top_k, hessian_max_iter, hessian_block_size, seed = 2, 100, 8, 1

    metrics = hessian_metrics(model, micro["loss_fn"], micro["batches"], Args)
    assert {"hessian/trace", "hessian/trace_stderr", "hessian/top_eigenvalue", "hessian/eigenvalue_2"} <= set(metrics)
    assert math.isclose(metrics["hessian/top_eigenvalue"], micro["eigenvalues"][0].item(), rel_tol=1e-3)


def test_block_and_tower_names():
    assert block_of("visual.transformer.resblocks.3.attn.in_proj_weight") == "visual.blocks.3"
    assert block_of("transformer.resblocks.0.mlp.c_fc.weight") == "text.blocks.0"
    assert block_of("token_embedding.weight") == "text.other"
    assert block_of("visual.conv1.weight") == "visual.other"
    assert block_of("logit_scale") == "other"
    assert tower_of("text.transformer.resblocks.1.ln_1.weight") == "text"


def test_bad_input_is_refused_with_one_line(micro):
    model, loss_fn, batches = micro["model"], micro["loss_fn"], micro["batches"]
    cases = [
        (lambda: hessian_trace(model, loss_fn, [], num_probes=4), "no batches"),
        (lambda: hessian_trace(model, loss_fn, batches, num_probes=0), "num_probes 0"),
        (lambda: hessian_trace(model, loss_fn, batches, method="xtrace"), "method 'xtrace'"),
        (lambda: hessian_trace(model, loss_fn, batches, hvp="jvp"), "hvp 'jvp'"),
        (lambda: hessian_trace(model, loss_fn, batches, params="no_such_layer"), "selects no trainable parameter"),
        (lambda: hessian_trace(model, loss_fn, batches, params=["visual.nope"]), "no trainable parameter named"),
        (lambda: hessian_trace(model, loss_fn, batches, block_size=0), "block_size 0"),
        (lambda: top_eigenvalues(model, loss_fn, batches, k=0), "k 0"),
        (lambda: noise_stability(model, loss_fn, batches, [0.0]), "sigma must be > 0"),
    ]
    for call, message in cases:
        with pytest.raises(HessianError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


# ---- two gloo ranks ---------------------------------------------------------------------------

def rank_slice(batches, rank: int, world_size: int):
    half = BATCH // world_size
    return [(images[rank * half:(rank + 1) * half], texts[rank * half:(rank + 1) * half]) for images, texts in batches]


DISTRIBUTED_PROBES = 6


def hessian_worker(rank, world_size, port, state_path, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    model = micro_model()
    model.load_state_dict(torch.load(state_path, weights_only=True))
    batches = rank_slice(micro_batches(), rank, world_size)
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                     world_size=world_size))
    result = {
        "exact": hessian_trace(model, loss_fn, batches, num_probes=DISTRIBUTED_PROBES, seed=4),
        "fd": hessian_trace(model, loss_fn, batches, num_probes=2, hvp="finite_difference", seed=4),
        "eigenvalues": top_eigenvalues(model, loss_fn, batches, k=2, max_iter=12, tol=0.0, seed=0),
        "noise": noise_stability(model, loss_fn, batches, [1e-3], num_draws=2, seed=0),
        # one batch: the gathered loss's graph is kept across products and Lanczos iterations
        "exact_one_batch": hessian_trace(model, loss_fn, batches[:1], num_probes=DISTRIBUTED_PROBES, seed=4),
        "eigenvalues_one_batch": top_eigenvalues(model, loss_fn, batches[:1], k=2, max_iter=12, tol=0.0, seed=0),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_differ_from_local_hessians(micro, tmp_path):
    model = micro["model"]
    state_path = tmp_path / "state.pt"
    torch.save(model.state_dict(), state_path)
    run_ranks(hessian_worker, 2, str(state_path), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["exact"]["trace"] == ranks[1]["exact"]["trace"]  # every rank gets the same result
    assert ranks[0]["eigenvalues"] == ranks[1]["eigenvalues"]

    loss_fn, batches = micro["loss_fn"], micro["batches"]
    single = hessian_trace(model, loss_fn, batches, num_probes=DISTRIBUTED_PROBES, seed=4)
    two = ranks[0]["exact"]
    assert math.isclose(two["trace"], single["trace"], rel_tol=1e-4, abs_tol=1e-4 * single["stderr"])
    for name, value in single["per_param"].items():
        assert math.isclose(two["per_param"][name], value, rel_tol=1e-3, abs_tol=1e-5 * abs(single["trace"])), name
    fd_single = hessian_trace(model, loss_fn, batches, num_probes=2, hvp="finite_difference", seed=4)
    assert math.isclose(ranks[0]["fd"]["trace"], fd_single["trace"], rel_tol=1e-3)
    lanczos_single = top_eigenvalues(model, loss_fn, batches, k=2, max_iter=12, tol=0.0, seed=0)
    assert ranks[0]["eigenvalues"] == pytest.approx(lanczos_single, rel=1e-4)
    one_batch = hessian_trace(model, loss_fn, batches[:1], num_probes=DISTRIBUTED_PROBES, seed=4)
    assert math.isclose(ranks[0]["exact_one_batch"]["trace"], one_batch["trace"], rel_tol=1e-4,
                        abs_tol=1e-4 * one_batch["stderr"])
    assert ranks[0]["eigenvalues_one_batch"] == pytest.approx(
        top_eigenvalues(model, loss_fn, batches[:1], k=2, max_iter=12, tol=0.0, seed=0), rel=1e-4)
    [noise_single] = noise_stability(model, loss_fn, batches, [1e-3], num_draws=2, seed=0)
    assert math.isclose(ranks[0]["noise"][0]["mean"], noise_single["mean"], rel_tol=1e-3, abs_tol=1e-6)

    # Averaging each rank's own (ungathered) Hessian is a different matrix: the contrastive loss
    # couples the two halves of the global batch.
    local = [hessian_trace(model, loss_fn, rank_slice(batches, r, 2), num_probes=DISTRIBUTED_PROBES, seed=4)["trace"]
             for r in range(2)]
    averaged = sum(local) / 2
    assert abs(averaged - single["trace"]) > 0.05 * abs(single["trace"]), (averaged, single["trace"])
