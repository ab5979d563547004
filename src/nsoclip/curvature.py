"""Hessian of the training objective: trace (Hutchinson / Hutch++), per-parameter and per-block
traces, top eigenvalues (Lanczos), noise stability and curvature along a direction, on one
process or across all ranks of a torch.distributed job. The CLI is `nsoclip.hessian`.

The objective is the one training minimises: for batches b_1..b_N on each of R ranks,
    L(w) = 1/N sum_n 1/R sum_r loss_r(w; b_n)
where loss_r is rank r's `loss_fn` value. With OpenCLIP's ClipLoss(local_loss=True,
gather_with_grad=True), loss_r is the contrastive loss of rank r's rows against the features
gathered from every rank, so the mean over ranks is the loss of the global batch and each
gradient is exactly what DDP averages. Every product H v is computed from this rank's batches
(the gathered features make it depend on every rank) and averaged over ranks; probes and
noise come from generators seeded identically on every rank, so all ranks get the same result.
"""
import itertools
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import distributed
from .checks import POSITIVE_INT
from .errors import NsoclipError
from .layout import block_of, tower_of
from .parallel import unwrap
from .spectral import HUTCHINSON_BLOCK, TraceSamples, hutchinson, hutchpp, lanczos_top

METHODS = ("hutchinson", "hutchpp")
HVPS = ("exact", "finite_difference")
NUM_PROBES = POSITIVE_INT
BLOCK_SIZE = POSITIVE_INT

# Central-difference step: the perturbation t*v has a root-mean-square entry of FD_STEP, i.e.
# ||t v|| = FD_STEP * sqrt(dim). Chosen by measurement in fp32 (docs/hessian.md): on both test
# CLIPs (micro: 1.6k parameters, ||w|| = 12; tiny: 1.7M, ||w|| = 46) the error against the exact
# HVP is smallest with an RMS step near 3e-5 (truncation error grows above it, fp32 rounding of
# the gradient difference below it), whereas a step relative to ||w|| has different optima for
# the two. Weights of CLIP models are O(0.01-1), so 3e-5 is far above their fp32 spacing.
FD_STEP = 3e-5


class HessianError(NsoclipError, ValueError):
    """Input the Hessian evaluator cannot work with (no batches, no parameters, bad settings)."""


def name_filter(params) -> Callable[[str], bool]:
    """`params` as a predicate on parameter names: None (all), a comma-separated string of
    substrings (as --hessian-params), a callable, or a list of exact names."""
    if params is None:
        return lambda name: True
    if callable(params):
        return params
    if isinstance(params, str):
        needles = [n.strip() for n in params.split(",") if n.strip()]
        return lambda name: any(needle in name for needle in needles)
    names = set(params)
    return names.__contains__


def select_parameters(model: torch.nn.Module, params=None) -> Dict[str, torch.nn.Parameter]:
    """Trainable parameters of the bare model whose names pass the filter, in model order."""
    named = dict(unwrap(model).named_parameters())
    if params is not None and not isinstance(params, str) and not callable(params):
        unknown = [n for n in params if n not in named]
        if unknown:
            raise HessianError(f"params: no trainable parameter named {', '.join(unknown[:5])}")
    keep = name_filter(params)
    selected = {name: p for name, p in named.items() if p.requires_grad and keep(name)}
    if not selected:
        raise HessianError(f"params {params!r}: selects no trainable parameter")
    return selected


class Objective:
    """L(w) over this rank's batches and all ranks, as a function of the selected parameters
    seen as one flat vector: loss, gradient and Hessian-vector products.

    Use as a context manager: dropout is off (eval mode) and so are TF32 matmuls and
    convolutions while it is open (central differences of TF32 gradients would be rounding
    noise: the step moves weights by about TF32's precision), the model's mode and the TF32
    settings are restored and any kept graph is freed on exit. `progress(n)`, when given, is
    called with the number of products (or loss evaluations) just done.

    A compiled model (torch.compile of the bare model) serves losses and finite-difference
    products through its compiled forward; exact products refuse it, since aot_autograd has no
    double backward (pass the uncompiled model for them)."""

    def __init__(self, model, loss_fn, batches, params=None, hvp: str = "exact",
                 progress: Optional[Callable[[int], None]] = None):
        if hvp not in HVPS:
            raise HessianError(f"hvp {hvp!r}: expected one of {', '.join(HVPS)}")
        self.model = unwrap(model)
        self.forward = compiled_forward(model, hvp) if isinstance(model, OptimizedModule) else self.model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.hvp_kind = hvp
        self.progress = progress
        check_batch_counts(len(self.batches))
        self.named = select_parameters(self.model, params)
        self.names = list(self.named)
        self.params = list(self.named.values())
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.device = self.params[0].device
        self.sizes = [p.numel() for p in self.params]
        ends = list(itertools.accumulate(self.sizes))
        self.segments = [(end - size, end) for size, end in zip(self.sizes, ends)]
        self.dim = ends[-1]
        self.num_products = 0
        self._kept_graph = self._points = None

    def __enter__(self):
        self._was_training = self.model.training
        self._tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.model.train(self._was_training)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32
        self._kept_graph = self._points = None

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        pieces = flat.split(self.sizes)
        if all(p.dtype == flat.dtype for p in self.params):
            return [piece.view(p.shape) for piece, p in zip(pieces, self.params)]
        return [piece.view(p.shape).to(p.dtype) for piece, p in zip(pieces, self.params)]

    def flatten(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def _tick(self, count: int):
        if self.progress is not None:
            self.progress(count)

    @torch.no_grad()
    def loss(self) -> float:
        total = sum(self.loss_fn(self.forward, batch).detach().double() for batch in self.batches)
        self._tick(1)
        return distributed.all_reduce_mean(total.reshape(1) / len(self.batches)).item()

    def local_gradients(self, scale: float = 1.0) -> List[torch.Tensor]:
        """This rank's gradient of scale x (mean loss over its batches), one tensor per parameter.
        The scale enters as the seed of the backward pass, so it costs no pass of its own."""
        seed = torch.tensor(scale / len(self.batches), device=self.device)
        total = None
        for batch in self.batches:
            loss = self.loss_fn(self.forward, batch)
            grads = list(torch.autograd.grad(loss, self.params, grad_outputs=seed.to(loss.dtype), allow_unused=True,
                                             materialize_grads=True))
            if total is None:
                total = grads
            else:
                torch._foreach_add_(total, grads)
        return total

    def local_gradient(self) -> torch.Tensor:
        return self.flatten(self.local_gradients())

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        return self.products(vector[None])[0]

    def products(self, vectors: torch.Tensor) -> torch.Tensor:
        """H v for each row v of `vectors` (m, dim), averaged over ranks in one all-reduce."""
        local = (self._exact_products if self.hvp_kind == "exact" else self._finite_difference_products)(vectors)
        self.num_products += len(vectors)
        self._tick(len(vectors))
        return distributed.all_reduce_mean(local)

    def _exact_products(self, vectors: torch.Tensor) -> torch.Tensor:
        """Double backward: the vector-Jacobian product of the gradient with v, which is H v as H
        is symmetric. Each batch's gradient graph (forward and first backward) is built once per
        call and shared by all of its products; with a single batch it is also kept between
        calls (see gradient_graph). Flash / memory-efficient attention has no double
        backward, so the math kernel is forced."""
        out = torch.empty_like(vectors)
        directions = [self.split(vector) for vector in vectors]
        with sdpa_kernel(SDPBackend.MATH):
            for index, batch in enumerate(self.batches):
                outputs, positions = self.gradient_graph(batch)
                kept = self._kept_graph is not None
                if not outputs:  # no gradient depends on the parameters: this batch adds H = 0
                    if index == 0:
                        out.zero_()
                    continue
                for row, (target, direction) in enumerate(zip(out, directions)):
                    products = torch.autograd.grad(outputs, self.params,
                                                   grad_outputs=[direction[i] for i in positions],
                                                   retain_graph=kept or row + 1 < len(vectors), allow_unused=True,
                                                   materialize_grads=True)
                    pieces = [t.reshape(-1).to(self.dtype) for t in products]
                    if index == 0:
                        torch.cat(pieces, out=target)
                    else:
                        target += torch.cat(pieces)
        return out.div_(len(self.batches)) if len(self.batches) > 1 else out

    def gradient_graph(self, batch):
        """One batch's gradient with its graph (create_graph), as (the gradients that depend on
        the parameters, their positions in self.params). With a single batch on this rank the
        graph is kept while the weights stay as they are, so every later product skips the
        forward and the first backward; it costs no extra peak memory, since a product holds the
        whole graph anyway. Several batches' graphs together would cost N times that, so they
        are rebuilt for every call instead."""
        if self._kept_graph is not None:
            return self._kept_graph
        loss = self.loss_fn(self.model, batch)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
        positions = [i for i, g in enumerate(grads) if g.requires_grad]
        graph = [grads[i] for i in positions], positions
        if len(self.batches) == 1:
            self._kept_graph = graph
        return graph

    def _finite_difference_products(self, vectors: torch.Tensor) -> torch.Tensor:
        """(g(w + t v) - g(w - t v)) / 2t per row, with ||t v|| = FD_STEP * sqrt(dim). The two
        gradients, of the loss scaled by 1/2t, are taken at the antithetic points swapped in beside
        w, and their difference is written straight into the flat result: the parameter-sized
        work is the norm of v, forming the two points and the difference."""
        out = torch.empty_like(vectors)
        for target, vector in zip(out, vectors):
            vector_norm = vector.norm().item()
            if vector_norm == 0:
                target.zero_()
                continue
            step = FD_STEP * math.sqrt(self.dim) / vector_norm
            directions = self.split(vector)
            scale = 1 / (2 * step)
            plus, minus = self.at_antithetic_points(directions, step, lambda: self.local_gradients(scale))
            for (start, end), high, low in zip(self.segments, plus, minus):
                torch.sub(high.reshape(-1), low.reshape(-1), out=target[start:end])
        return out

    def at_antithetic_points(self, directions, step: float, evaluate: Callable[[], object]) -> list:
        """[evaluate() with the model at w + step * d, evaluate() at w - step * d]; w's own tensors
        are back under the parameters afterwards, also on error. Both points are formed
        together, parameter by parameter (the second reads w and d from cache), into two sets of
        buffers allocated once per Objective (fresh ones every product cost page faults on CPU),
        which are swapped in under the parameters (`.data`): w is never written, so it comes
        back bit for bit without a snapshot or a restoring copy."""
        self._kept_graph = None  # it would read the swapped-in weights
        weights = [p.data for p in self.params]
        if self._points is None:
            self._points = [[torch.empty_like(w) for w in weights] for _ in range(2)]
        for weight, direction, plus, minus in zip(weights, directions, *self._points):
            torch.add(weight, direction, alpha=step, out=plus)
            torch.add(weight, direction, alpha=-step, out=minus)
        results = []
        try:
            for point in self._points:
                for p, value in zip(self.params, point):
                    p.data = value
                results.append(evaluate())
        finally:
            for p, weight in zip(self.params, weights):
                p.data = weight
        return results

    def per_segment(self, samples: TraceSamples) -> Dict[str, Dict[str, float]]:
        """Trace estimates with standard errors per parameter, transformer block and tower."""
        groups = {"per_param": {name: [i] for i, name in enumerate(self.names)},
                  "per_block": {}, "per_tower": {}}
        for i, name in enumerate(self.names):
            groups["per_block"].setdefault(block_of(name), []).append(i)
            groups["per_tower"].setdefault(tower_of(name), []).append(i)
        result = {}
        for key, members in groups.items():
            estimates = {group: samples.estimate(columns) for group, columns in members.items()}
            result[key] = {group: mean for group, (mean, _) in estimates.items()}
            result[f"{key}_stderr"] = {group: stderr for group, (_, stderr) in estimates.items()}
        return result


def compiled_forward(model: OptimizedModule, hvp: str) -> OptimizedModule:
    """The compiled model, where the evaluator can call it: finite differences through
    torch.compile of the bare model (this module averages over ranks itself, so not of DDP)."""
    if hvp == "exact":
        raise HessianError("hvp 'exact' needs double backward, which torch.compile (aot_autograd) does not "
                           "support: pass the uncompiled model, or use hvp 'finite_difference'")
    if model._orig_mod is not unwrap(model):
        raise HessianError("a compiled DDP wrapper: pass torch.compile of the bare model (the Hessian "
                           "evaluator averages over ranks itself)")
    return model


def check_batch_counts(count: int):
    """Every rank must bring the same, non-zero number of batches, or collectives would hang;
    all ranks see the same min/max, so all raise together."""
    low = high = count
    if distributed.is_distributed():
        counts = torch.tensor([-count, count], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        low, high = int(-counts[0].item()), int(counts[1].item())
    if low == 0:
        raise HessianError("no batches: the Hessian needs at least one batch on every rank")
    if low != high:
        raise HessianError(f"ranks have different numbers of batches ({low} to {high}); give each rank the same")


def hessian_trace(model, loss_fn, batches, *, num_probes: int = 64, method: str = "hutchinson",
                  hvp: str = "exact", seed: int = 0, params=None, block_size: int = HUTCHINSON_BLOCK,
                  progress: Optional[Callable[[int], None]] = None) -> dict:
    """Trace of the Hessian of the training objective with its standard error, and the traces
    of the diagonal blocks of each parameter, transformer block and tower.

    `num_probes` is the budget of Hessian-vector products (Hutch++ spends a third on the
    sketch, a third on it again and the rest on residual probes; see spectral.hutchpp).
    Hutchinson multiplies `block_size` probes at a time, sharing each batch's graph between
    them; memory grows by 2 x block_size parameter-sized vectors."""
    NUM_PROBES.check("num_probes", num_probes, HessianError)
    BLOCK_SIZE.check("block_size", block_size, HessianError)
    if method not in METHODS:
        raise HessianError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    with Objective(model, loss_fn, batches, params, hvp, progress) as objective:
        arguments = (objective.products, objective.dim, num_probes, objective.generator(seed), objective.segments,
                     objective.dtype, objective.device)
        samples = hutchinson(*arguments, block_size=block_size) if method == "hutchinson" else hutchpp(*arguments)
        trace, stderr = samples.estimate()
        result = {"trace": trace, "stderr": stderr, "num_probes": num_probes, "num_hvps": objective.num_products,
                  "method": method, "hvp": hvp, "num_params": objective.dim}
        result.update(objective.per_segment(samples))
    return result


def top_eigenvalues(model, loss_fn, batches, *, k: int = 1, max_iter: int = 100, tol: float = 1e-4,
                    seed: int = 0, params=None, hvp: str = "exact",
                    progress: Optional[Callable[[int], None]] = None) -> List[float]:
    """The k largest algebraic Hessian eigenvalues, largest first (Lanczos with full
    reorthogonalisation over all selected parameters as one vector)."""
    if k < 1:
        raise HessianError(f"k {k}: must be >= 1")
    if max_iter < k:
        raise HessianError(f"max_iter {max_iter}: must be >= k ({k})")
    with Objective(model, loss_fn, batches, params, hvp, progress) as objective:
        if k > objective.dim:
            raise HessianError(f"k {k}: more eigenvalues than the {objective.dim} selected parameters")
        eigenvalues, _ = lanczos_top(objective.products, objective.dim, k, max_iter, tol, objective.generator(seed),
                                     objective.dtype, objective.device)
    return eigenvalues


def noise_stability(model, loss_fn, batches, sigmas: Sequence[float], *, num_draws: int = 8, seed: int = 0,
                    params=None, progress: Optional[Callable[[int], None]] = None) -> List[dict]:
    """E[L(w + e)] - L(w) for e ~ N(0, sigma^2 I) on the selected parameters: NSO's objective
    minus the loss. Two-point estimate (L(w + e) + L(w - e)) / 2 - L(w) per draw (antithetic
    pairs cancel the first-order term), mean and standard error over draws. The same unit
    directions are reused for every sigma (common random numbers, so the curve is smooth in
    sigma); the perturbed weights are swapped in beside w, which is never written."""
    if num_draws < 1:
        raise HessianError(f"num_draws {num_draws}: must be >= 1")
    if any(not sigma > 0 for sigma in sigmas):
        raise HessianError(f"sigmas {list(sigmas)}: every sigma must be > 0")
    with Objective(model, loss_fn, batches, params, progress=progress) as objective:
        clean = objective.loss()
        generator = objective.generator(seed)
        directions = [torch.randn(objective.dim, generator=generator, device=objective.device,
                                  dtype=objective.dtype) for _ in range(num_draws)]
        results = []
        for sigma in sigmas:
            deltas = []
            for direction in directions:
                pieces = objective.split(direction)
                plus, minus = objective.at_antithetic_points(pieces, sigma, objective.loss)
                deltas.append((plus + minus) / 2 - clean)
            values = torch.tensor(deltas, dtype=torch.float64)
            stderr = values.std().item() / math.sqrt(num_draws) if num_draws > 1 else math.nan
            results.append({"sigma": sigma, "mean": values.mean().item(), "stderr": stderr,
                            "num_draws": num_draws, "loss": clean})
    return results


def curvature_along(model, loss_fn, batches, direction: Dict[str, torch.Tensor], *, hvp: str = "exact",
                    progress: Optional[Callable[[int], None]] = None) -> dict:
    """d^T H d for a direction given per parameter name (e.g. w - w0 against a reference
    checkpoint); parameters not named have zero direction. Also ||d|| and the Rayleigh
    quotient d^T H d / ||d||^2 (the curvature per unit step)."""
    names = list(direction)
    with Objective(model, loss_fn, batches, names, hvp, progress) as objective:
        for name in names:
            if tuple(direction[name].shape) != tuple(objective.named[name].shape):
                raise HessianError(f"direction {name}: shape {tuple(direction[name].shape)} does not match "
                                   f"the parameter's {tuple(objective.named[name].shape)}")
        flat = objective.flatten([direction[name].to(objective.device) for name in objective.names])
        curvature = torch.dot(flat.double(), objective.hvp(flat).double()).item()
    norm = flat.double().norm().item()
    return {"curvature": curvature, "norm": norm,
            "rayleigh_quotient": curvature / norm ** 2 if norm > 0 else math.nan}


def difference_from_reference(model, reference_state: Dict[str, torch.Tensor], params=None) -> Dict[str, torch.Tensor]:
    """w - w0 for the selected parameters, from a reference state dict (`module.` prefixes ignored)."""
    reference = {key.removeprefix("module."): value for key, value in reference_state.items()}
    selected = select_parameters(model, params)
    missing = [name for name in selected if name not in reference]
    if missing:
        raise HessianError(f"--reference-checkpoint lacks {', '.join(missing[:5])}")
    difference = {}
    for name, p in selected.items():
        if reference[name].numel() != p.numel():
            raise HessianError(f"--reference-checkpoint {name}: shape {tuple(reference[name].shape)} "
                               f"does not match the model's {tuple(p.shape)}")
        difference[name] = p.detach() - reference[name].to(p.device, p.dtype).reshape(p.shape)
    return difference


def hessian_metrics(model, loss_fn, batches, args) -> Dict[str, float]:
    """Scalars for the training loop's --hessian-frequency, with the --hessian-* settings."""
    settings = dict(params=args.hessian_params, seed=args.seed)
    batches = list(batches)
    result = hessian_trace(model, loss_fn, batches, num_probes=args.hessian_probes, method=args.hessian_method,
                           hvp=args.hessian_hvp, block_size=args.hessian_block_size, **settings)
    metrics = {"hessian/trace": result["trace"], "hessian/trace_stderr": result["stderr"]}
    for tower, trace in result["per_tower"].items():
        metrics[f"hessian/trace_{tower}"] = trace
    if args.hessian_top_k > 0:
        eigenvalues = top_eigenvalues(model, loss_fn, batches, k=args.hessian_top_k, max_iter=args.hessian_max_iter,
                                      hvp=args.hessian_hvp, **settings)
        metrics["hessian/top_eigenvalue"] = eigenvalues[0]
        for rank, value in enumerate(eigenvalues[1:], start=2):
            metrics[f"hessian/eigenvalue_{rank}"] = value
    return metrics
