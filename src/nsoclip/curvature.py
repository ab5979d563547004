"""Hessian of the training objective: trace (Hutchinson / Hutch++), per-parameter and per-block
traces, extreme eigenvalues and eigenvectors (Lanczos), the spectral density (stochastic Lanczos
quadrature), noise stability and curvature along a direction, on one process or across all ranks
of a torch.distributed job. Landscapes are `nsoclip.landscape`; the CLI is `nsoclip.hessian`.

The objective is the one training minimises: for batches b_1..b_N on each of R ranks,
    L(w) = 1/N sum_n 1/R sum_r loss_r(w; b_n)
where loss_r is rank r's `loss_fn` value. With OpenCLIP's ClipLoss(local_loss=True,
gather_with_grad=True), loss_r is the contrastive loss of rank r's rows against the features
gathered from every rank, so the mean over ranks is the loss of the global batch and each
gradient is exactly what DDP averages.

The estimators' vectors are sharded: rank r keeps only its contiguous slice of every long-lived
parameter-sized vector (`FlatShards`), so a Lanczos basis of m vectors costs m P / R per rank.
A product H v gathers the slices of v into the full vector (transient), computes this rank's
H v from its own batches (the gathered features make it depend on every rank) and
reduce-scatters the mean, so each rank receives its slice. Probes and noise are pure functions of
(seed, purpose, index, parameter, element) drawn with `rng.Streams`, so every rank, every
layout and every resumed run sees the same ones; all ranks return the same numbers.

Every estimator takes `state` and `checkpoint` (see `spectral`): `checkpoint(state)` is called
after each block of products and passing the last state back continues the run bit for bit
(`nsoclip.resumable` keeps them on disk for the CLI).
"""
import contextlib
import itertools
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import distributed
from .checks import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from .checkpoint import save_checkpoint
from .errors import NsoclipError
from .layout import block_of, tower_of
from .parallel import as_layout, full_tensor, local_tensor, unwrap
from .rng import Streams
from .spectral import (DENSITY_GRID, HUTCHINSON_BLOCK, Probes, Space, TraceSamples, gaussian_density, hutchinson,
                       hutchpp, lanczos, slq)

METHODS = ("hutchinson", "hutchpp")
HVPS = ("exact", "finite_difference")
WHICH = ("largest", "smallest")
NUM_PROBES = POSITIVE_INT
BLOCK_SIZE = POSITIVE_INT
NUM_EIGENVALUES = NON_NEGATIVE_INT
TARGET_REL_STDERR = POSITIVE
DENSITY_PROBES = POSITIVE_INT
DENSITY_STEPS = POSITIVE_INT

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


def world_position():
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if distributed.is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FlatShards:
    """One process or DDP (every rank holds the whole model). The estimators' vectors: rank r's
    contiguous slice [r S, min((r + 1) S, P)) of the flat vector of all selected parameters,
    S = ceil(P / R), so the ranks' slices tile it in rank order (the last may be shorter, or
    empty when P < R). The model's side: whole parameters, so a product gathers its vectors,
    computes this rank's H v and reduce-scatters the mean. `pieces` lists the parameters the
    slice touches as (parameter index, first element, end element, local offset)."""

    def __init__(self, params: Sequence[torch.Tensor], rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.sizes = [p.numel() for p in params]  # of the model-side vectors: whole parameters
        self.shapes = [p.shape for p in params]
        self.dim = sum(self.sizes)
        self.shard = -(-self.dim // world_size)
        self.offset = min(rank * self.shard, self.dim)
        self.local_dim = min(self.dim, self.offset + self.shard) - self.offset
        self.pieces = []
        for index, (end, size) in enumerate(zip(itertools.accumulate(self.sizes), self.sizes)):
            low, high = max(end - size, self.offset), min(end, self.offset + self.local_dim)
            if low < high:
                self.pieces.append((index, low - (end - size), high - (end - size), low - self.offset))
        self.model_pieces = [(index, 0, size, end - size) for index, (end, size)
                             in enumerate(zip(itertools.accumulate(self.sizes), self.sizes))]

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slices (a view) of full vectors given as rows."""
        return full[..., self.offset:self.offset + self.local_dim]

    def padded(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """(rows, R S) zeros: full vectors laid out as the collectives want them."""
        return torch.zeros(rows, self.world_size * self.shard, dtype=like.dtype, device=like.device)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Full vectors (m, P) from every rank's slices (m, local_dim); on one process the rows
        themselves. A view into a (m, R S) buffer, one all-gather per row."""
        if self.world_size == 1:
            return rows
        full = self.padded(len(rows), rows)
        piece = torch.zeros(self.shard, dtype=rows.dtype, device=rows.device)
        for target, row in zip(full, rows):
            piece[:self.local_dim] = row
            distributed.all_gather_into(target, piece)
        return full[:, :self.dim]

    to_model = gather  # the model holds whole parameters: its vectors are the full ones

    def scatter_mean(self, padded: torch.Tensor) -> torch.Tensor:
        """This rank's slices (m, local_dim) of the mean over ranks of full vectors given in a
        `padded` (m, R S) buffer (its padding zero): one reduce-scatter per row."""
        if self.world_size == 1:
            return padded[:, :self.dim]
        out = torch.empty(len(padded), self.shard, dtype=padded.dtype, device=padded.device)
        for target, row in zip(out, padded):
            distributed.reduce_scatter_sum(target, row)
        return out[:, :self.local_dim].div_(self.world_size)

    def products(self, rows: torch.Tensor, local_products) -> torch.Tensor:
        """Gather, this rank's H v of the full vectors, reduce-scatter the mean."""
        full = self.gather(rows)
        if self.world_size == 1:
            return local_products(full, None)
        padded = self.padded(len(rows), rows)
        local_products(full, padded[:, :self.dim])
        return self.scatter_mean(padded)

    def norm(self, vector: torch.Tensor) -> float:
        return vector.norm().item()  # model-side vectors are whole on every rank

    def weights(self, params) -> List[torch.Tensor]:
        return [p.data for p in params]

    def at(self, params, point, evaluate):
        """Swaps the parameters' tensors for `point` (`.data`): w is never written, so it comes
        back bit for bit without a snapshot, also on error."""
        weights = [p.data for p in params]
        try:
            for p, value in zip(params, point):
                p.data = value
            return evaluate()
        finally:
            for p, weight in zip(params, weights):
                p.data = weight

    gradient_passes = staticmethod(contextlib.nullcontext)  # autograd.grad leaves `.grad` alone

    def gradients(self, loss: torch.Tensor, params, seed: torch.Tensor) -> List[torch.Tensor]:
        """This rank's gradient of seed x loss (not averaged over ranks)."""
        return list(torch.autograd.grad(loss, params, grad_outputs=seed.to(loss.dtype), allow_unused=True,
                                        materialize_grads=True))

    averaged = False  # gradients() is this rank's own: products average them over ranks


class ParameterShards:
    """FSDP2 (`fully_shard`): every rank holds rows of each parameter (Shard(0) on a 1-D mesh of
    all ranks), and the estimators' vectors are split the same way, so each rank's slice of a
    vector is the elements of its local rows, parameter after parameter, and probes, noise and
    directions drawn for them equal those of any other layout element for element. Forming
    w +- t v and the products touches only the local shards: the forward all-gathers the
    perturbed shards, the backward's reduce-scatter averages the gradients over ranks, so
    finite-difference products need no collective of their own. w is kept in a snapshot of the
    local shards (P / R) and copied back after every evaluation at another point."""

    def __init__(self, params: Sequence[torch.Tensor], layout):
        for p in params:
            if not isinstance(p, DTensor) or any(not (isinstance(placement, Shard) and placement.dim == 0)
                                                 for placement in p.placements):
                raise HessianError("FSDP2: the Hessian needs every parameter sharded by rows over all ranks "
                                   "(fully_shard on a 1-D mesh, as --fsdp lays it out)")
        self.layout, self.params, self.world_size = layout, list(params), dist.get_world_size()
        views = layout.local_views(self.params)
        self.sizes = [view.tensor.numel() for view in views]
        self.shapes = [view.tensor.shape for view in views]
        self.dim = sum(view.numel for view in views)
        self.local_dim = sum(self.sizes)
        ends = list(itertools.accumulate(self.sizes))
        self.pieces = [(index, view.start, view.start + size, end - size)
                       for index, (view, size, end) in enumerate(zip(views, self.sizes, ends)) if size]
        self.model_pieces = self.pieces
        self._snapshot = None

    def local(self, full: torch.Tensor) -> torch.Tensor:
        starts = list(itertools.accumulate([p.numel() for p in self.params], initial=0))
        return torch.cat([full[..., starts[index] + first:starts[index] + end]
                          for index, first, end, _ in self.pieces], dim=-1)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Full vectors (m, P): each parameter's rows gathered as a DTensor would (collectives)."""
        full = []
        for row in rows:
            pieces = row.split(self.sizes)
            full.append(torch.cat([full_tensor(DTensor.from_local(piece.reshape(shape), p.device_mesh, p.placements,
                                                                  run_check=False, shape=p.shape,
                                                                  stride=p.stride())).reshape(-1)
                                   for piece, shape, p in zip(pieces, self.shapes, self.params)]))
        return torch.stack(full) if full else rows.new_zeros(0, self.dim)

    def to_model(self, rows: torch.Tensor) -> torch.Tensor:
        return rows  # the model holds the same local rows

    def products(self, rows: torch.Tensor, local_products) -> torch.Tensor:
        return local_products(rows, None)  # FSDP's reduce-scatter already averaged the gradients

    def norm(self, vector: torch.Tensor) -> float:
        return self.layout.total_norm([vector.norm()]).item()

    def weights(self, params) -> List[torch.Tensor]:
        """The snapshot of w's local shards, taken on first use."""
        if self._snapshot is None:
            self._snapshot = [view.tensor.clone() for view in self.layout.local_views(params)]
        return self._snapshot

    def at(self, params, point, evaluate):
        """Writes `point` into the local shards (after a reshard, so the next forward gathers
        it), evaluates, and copies w back from the snapshot, also on error."""
        weights = self.weights(params)
        try:
            torch._foreach_copy_([view.tensor for view in self.layout.local_views(params)], list(point))
            return evaluate()
        finally:
            torch._foreach_copy_([view.tensor for view in self.layout.local_views(params)], weights)

    @contextlib.contextmanager
    def gradient_passes(self):
        """`.grad` is where FSDP2 puts the gradients: the model's own (a training loop's) are
        set aside during the passes and put back after them."""
        model_params = list(self.layout.model.parameters())
        kept = [p.grad for p in model_params]
        for p in model_params:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in zip(model_params, kept):
                p.grad = grad

    def gradients(self, loss: torch.Tensor, params, seed: torch.Tensor) -> List[torch.Tensor]:
        """The gradient of seed x loss averaged over ranks (FSDP's reduce-scatter in backward),
        as local rows, inside `gradient_passes`. `.grad` is cleared right after, before the next
        forward: cleared between a forward and its backward, FSDP2's root unit (gathered from
        one to the other) would add the previous pass's gradient."""
        loss.backward(seed.to(loss.dtype))
        grads = [local_tensor(p.grad).clone() if p.grad is not None
                 else torch.zeros(shape, dtype=p.dtype, device=local_tensor(p).device)
                 for p, shape in zip(params, self.shapes)]
        for p in self.layout.model.parameters():
            p.grad = None
        return grads

    averaged = True


def vector_layout(model: torch.nn.Module, params: Sequence[torch.Tensor]):
    """How the estimators' vectors over `params` are split: like the parameters of an FSDP2
    model, else in contiguous slices of the flat vector."""
    if isinstance(model, FSDPModule):
        return ParameterShards(params, as_layout(model))
    return FlatShards(params, *world_position())


def _coin(tensor: torch.Tensor, generator: torch.Generator):
    tensor.random_(0, 2, generator=generator)  # 0 or 1 straight into the probe's own dtype


def _unit_normal(tensor: torch.Tensor, generator: torch.Generator):
    tensor.normal_(0.0, 1.0, generator=generator)


class Objective:
    """L(w) over this rank's batches and all ranks, as a function of the selected parameters
    seen as one flat vector: loss, gradient and Hessian-vector products, and the sharded
    vector space (`space`, `shards`, `probes`) the estimators work in. `shards` is FlatShards
    (one process, DDP) or ParameterShards (an FSDP2 model); the model-side vectors (directions
    to move w along, products' inputs and outputs) are whole parameters with the first and this
    rank's local rows with the second: `split`, `segments` and `normal_direction` follow them.

    Use as a context manager: dropout is off (eval mode) and so are TF32 matmuls and
    convolutions while it is open (central differences of TF32 gradients would be rounding
    noise: the step moves weights by about TF32's precision), the model's mode and the TF32
    settings are restored and any kept graph is freed on exit. `hvp` is how products are formed
    (None: an evaluation that forms none, such as noise stability). `progress(n)`, when given,
    is called with the number of products (or loss evaluations) just done.

    A compiled model (torch.compile of the bare model) serves losses and finite-difference
    products through its compiled forward; exact products refuse it, since aot_autograd has no
    double backward (pass the uncompiled model for them)."""

    def __init__(self, model, loss_fn, batches, params=None, hvp: Optional[str] = "exact",
                 progress: Optional[Callable[[int], None]] = None):
        if hvp is not None and hvp not in HVPS:
            raise HessianError(f"hvp {hvp!r}: expected one of {', '.join(HVPS)}")
        self.model = unwrap(model)
        self.forward = compiled_forward(model, hvp) if isinstance(model, OptimizedModule) else self.model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.hvp_kind = hvp
        self.progress = progress
        self.named = select_parameters(self.model, params)
        self.names = list(self.named)
        self.params = list(self.named.values())
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.device = local_tensor(self.params[0]).device
        check_batch_counts(len(self.batches), self.device)
        if hvp == "exact" and isinstance(self.model, FSDPModule):
            raise HessianError("hvp 'exact' (--hessian-hvp exact) cannot run on an FSDP2 model (--fsdp): double "
                               "backward needs the gradient as a function of the parameters, and FSDP2 forms it "
                               "outside autograd (reduce-scatter in its backward hooks); use finite_difference")
        self.shards = vector_layout(self.model, self.params)
        self.dim = self.shards.dim
        self.sizes, self.shapes = self.shards.sizes, self.shards.shapes
        ends = list(itertools.accumulate(self.sizes))
        self.segments = [(end - size, end) for size, end in zip(self.sizes, ends)]
        self.space = Space(self.shards.local_dim, self.dim, distributed.all_reduce_sum,
                           [(index, offset, offset + end - start) for index, start, end, offset in self.shards.pieces],
                           len(self.params), self.dtype, self.device)
        self.streams = Streams()
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

    def split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """A model-side flat vector as one tensor per parameter (in the parameters' dtype)."""
        pieces = flat.split(self.sizes)
        if all(p.dtype == flat.dtype for p in self.params):
            return [piece.view(shape) for piece, shape in zip(pieces, self.shapes)]
        return [piece.view(shape).to(p.dtype) for piece, shape, p in zip(pieces, self.shapes, self.params)]

    def flatten(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def probes(self, seed: int, purpose: str) -> Probes:
        """Rademacher probes for the estimators: entry e of parameter j of probe i is element e
        of the stream (seed, purpose, i, j), so it does not depend on how the vector is split
        over ranks. Each block is drawn straight into its (count, local_dim) buffer as 0/1 in
        the vectors' dtype and mapped to +-1 in place: no index-sized temporaries."""
        def draw(start: int, count: int) -> torch.Tensor:
            block = torch.empty(count, self.shards.local_dim, dtype=self.dtype, device=self.device)
            for index, row in enumerate(block, start=start):
                for param, first, end, offset in self.shards.pieces:
                    self.streams.fill_(row[offset:offset + end - first], (seed, purpose, index, param), _coin,
                                       start=first, numel=self.params[param].numel())
            return block.mul_(2).sub_(1)

        return draw

    def normal_direction(self, key: tuple, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A model-side flat N(0, I) vector: parameter j is the stream (*key, j), as for probes."""
        out = torch.empty(sum(self.sizes), dtype=self.dtype, device=self.device) if out is None else out
        for param, first, end, offset in self.shards.model_pieces:
            self.streams.fill_(out[offset:offset + end - first], (*key, param), _unit_normal, start=first,
                               numel=self.params[param].numel())
        return out

    def weights(self) -> List[torch.Tensor]:
        """w as model-side tensors (read only)."""
        return self.shards.weights(self.params)

    def _tick(self, count: int):
        if self.progress is not None:
            self.progress(count)

    @torch.no_grad()
    def loss(self) -> float:
        total = sum(self.loss_fn(self.forward, batch).detach().double() for batch in self.batches)
        self._tick(1)
        return distributed.all_reduce_mean(total.reshape(1) / len(self.batches)).item()

    def local_gradients(self, scale: float = 1.0) -> List[torch.Tensor]:
        """The gradient of scale x (mean loss over this rank's batches), one model-side tensor
        per parameter: this rank's own (FlatShards) or already averaged over ranks
        (ParameterShards). The scale enters as the seed of the backward pass, so it costs no
        pass of its own."""
        seed = torch.tensor(scale / len(self.batches), device=self.device)
        total = None
        with self.shards.gradient_passes():
            for batch in self.batches:
                grads = self.shards.gradients(self.loss_fn(self.forward, batch), self.params, seed)
                if total is None:
                    total = grads
                else:
                    torch._foreach_add_(total, grads)
        return total

    def local_gradient(self) -> torch.Tensor:
        return self.flatten(self.local_gradients())

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H v for one full vector, averaged over ranks (one all-reduce), full on every rank
        (one process and DDP)."""
        product = self.local_products(vector[None])[0]
        self.num_products += 1
        self._tick(1)
        return distributed.all_reduce_mean(product)

    def products(self, rows: torch.Tensor) -> torch.Tensor:
        """H v for each vector v given as this rank's slices (m, local_dim): this rank's slices of
        the products, averaged over ranks. Full vectors exist only during the call, and only on
        one process or under DDP."""
        out = self.shards.products(rows, self.local_products)
        self.num_products += len(rows)
        self._tick(len(rows))
        return out

    def local_products(self, vectors: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """H v from this rank's batches for each model-side row v of `vectors`, into `out` when
        given: not averaged over ranks under FlatShards, averaged under ParameterShards."""
        out = torch.empty_like(vectors) if out is None else out
        if self.hvp_kind == "exact":
            return self._exact_products(vectors, out)
        return self._finite_difference_products(vectors, out)

    def _exact_products(self, vectors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Double backward: the vector-Jacobian product of the gradient with v, which is H v as H
        is symmetric. Each batch's gradient graph (forward and first backward) is built once per
        call and shared by all of its products; with a single batch it is also kept between
        calls (see gradient_graph). Flash / memory-efficient attention has no double
        backward, so the math kernel is forced."""
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
        loss = self.loss_fn(self.forward, batch)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
        positions = [i for i, g in enumerate(grads) if g.requires_grad]
        graph = [grads[i] for i in positions], positions
        if len(self.batches) == 1:
            self._kept_graph = graph
        return graph

    def _finite_difference_products(self, vectors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(g(w + t v) - g(w - t v)) / 2t per row, with ||t v|| = FD_STEP * sqrt(dim). The two
        gradients, of the loss scaled by 1/2t, are taken at the antithetic points swapped in beside
        w, and their difference is written straight into the flat result: the parameter-sized
        work is the norm of v, forming the two points and the difference."""
        for target, vector in zip(out, vectors):
            vector_norm = self.shards.norm(vector)
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

    def point_buffers(self) -> List[List[torch.Tensor]]:
        """Two sets of model-side parameter buffers, allocated once per Objective (fresh ones
        every product cost page faults on CPU)."""
        if self._points is None:
            self._points = [[torch.empty_like(w) for w in self.weights()] for _ in range(2)]
        return self._points

    def at_antithetic_points(self, directions, step: float, evaluate: Callable[[], object]) -> list:
        """[evaluate() with the model at w + step * d, evaluate() at w - step * d]. Both points
        are formed together, parameter by parameter (the second reads w and d from cache), into
        the point buffers and put in place by `at`."""
        points = self.point_buffers()
        for weight, direction, plus, minus in zip(self.weights(), directions, *points):
            torch.add(weight, direction, alpha=step, out=plus)
            torch.add(weight, direction, alpha=-step, out=minus)
        return [self.at(point, evaluate) for point in points]

    def at(self, point: Sequence[torch.Tensor], evaluate: Callable[[], object]):
        """evaluate() with the model at `point` (model-side tensors) instead of w; w is back
        afterwards, bit for bit, also on error."""
        self._kept_graph = None  # it would read the moved weights
        return self.shards.at(self.params, point, evaluate)

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


def check_batch_counts(count: int, device=None):
    """Every rank must bring the same, non-zero number of batches, or collectives would hang;
    all ranks see the same min/max, so all raise together."""
    low = high = count
    if distributed.is_distributed():
        counts = torch.tensor([-count, count], dtype=torch.float64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        low, high = int(-counts[0].item()), int(counts[1].item())
    if low == 0:
        raise HessianError("no batches: the Hessian needs at least one batch on every rank")
    if low != high:
        raise HessianError(f"ranks have different numbers of batches ({low} to {high}); give each rank the same")


def hessian_trace(model, loss_fn, batches, *, num_probes: int = 64, method: str = "hutchinson",
                  hvp: str = "exact", seed: int = 0, params=None, block_size: int = HUTCHINSON_BLOCK,
                  target_rel_stderr: Optional[float] = None, progress: Optional[Callable[[int], None]] = None,
                  state: Optional[dict] = None, checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Trace of the Hessian of the training objective with its standard error, and the traces
    of the diagonal blocks of each parameter, transformer block and tower.

    `num_probes` is the budget of Hessian-vector products (Hutch++ spends a third on the
    sketch, a third on it again and the rest on residual probes; see spectral.hutchpp).
    Products go `block_size` at a time, sharing each batch's graph between them; memory grows
    by 2 x block_size parameter-sized vectors during a block. With `target_rel_stderr`
    (Hutchinson only) the run stops at the first block where |stderr / trace| is at most the
    target (after spectral.HUTCHINSON_MIN_PROBES probes), `num_probes` being the cap;
    `num_hvps` says how many products it took."""
    NUM_PROBES.check("num_probes", num_probes, HessianError)
    BLOCK_SIZE.check("block_size", block_size, HessianError)
    if method not in METHODS:
        raise HessianError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if target_rel_stderr is not None:
        TARGET_REL_STDERR.check("target_rel_stderr", target_rel_stderr, HessianError)
        if method != "hutchinson":
            raise HessianError(f"target_rel_stderr: only the hutchinson method stops at a precision, not {method}")
    with Objective(model, loss_fn, batches, params, hvp, progress) as objective:
        arguments = (objective.products, objective.space, objective.probes(seed, method), num_probes)
        options = dict(block_size=block_size, state=state, checkpoint=checkpoint)
        if method == "hutchinson":
            samples = hutchinson(*arguments, target_rel_stderr=target_rel_stderr, **options)
        else:
            samples = hutchpp(*arguments, **options)
        trace, stderr = samples.estimate()
        result = {"trace": trace, "stderr": stderr, "num_probes": num_probes, "num_hvps": samples.num_matvecs,
                  "method": method, "hvp": hvp, "num_params": objective.dim, "target_rel_stderr": target_rel_stderr}
        result.update(objective.per_segment(samples))
    return result


def hessian_eigenpairs(model, loss_fn, batches, *, k: int = 1, max_iter: int = 100, tol: float = 1e-4,
                       seed: int = 0, params=None, hvp: str = "exact", which: str = "largest", vectors: bool = False,
                       progress: Optional[Callable[[int], None]] = None, state: Optional[dict] = None,
                       checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """The k largest (largest first) or smallest (smallest first) algebraic Hessian eigenvalues
    by Lanczos with full reorthogonalisation over all selected parameters as one vector, as
    `eigenvalues`, with `num_hvps`; with `vectors`, also the unit Ritz vectors as this rank's
    slices (k, local_dim) of the flat vector (`FlatShards` of the selected parameters; one
    process: the whole vectors). Memory: max_iter vectors of P / R per rank."""
    if which not in WHICH:
        raise HessianError(f"which {which!r}: expected one of {', '.join(WHICH)}")
    POSITIVE_INT.check("k", k, HessianError)
    if max_iter < k:
        raise HessianError(f"max_iter {max_iter}: must be >= k ({k})")
    with Objective(model, loss_fn, batches, params, hvp, progress) as objective:
        if k > objective.dim:
            raise HessianError(f"k {k}: more eigenvalues than the {objective.dim} selected parameters")
        found = lanczos(objective.products, objective.space, objective.probes(seed, "lanczos"), k, max_iter, tol,
                        which=which, return_vectors=vectors, state=state, checkpoint=checkpoint)
    result = {"eigenvalues": found.eigenvalues, "num_hvps": found.num_products, "which": which}
    if vectors:
        result["vectors"] = found.vectors
    return result


def top_eigenvalues(model, loss_fn, batches, *, k: int = 1, max_iter: int = 100, tol: float = 1e-4,
                    seed: int = 0, params=None, hvp: str = "exact", which: str = "largest",
                    progress: Optional[Callable[[int], None]] = None) -> List[float]:
    """The k largest (which="largest", largest first) or smallest (smallest first) algebraic
    Hessian eigenvalues (see hessian_eigenpairs)."""
    return hessian_eigenpairs(model, loss_fn, batches, k=k, max_iter=max_iter, tol=tol, seed=seed, params=params,
                              hvp=hvp, which=which, progress=progress)["eigenvalues"]


def spectral_density(model, loss_fn, batches, *, num_probes: int, num_steps: int, seed: int = 0, params=None,
                     hvp: str = "exact", grid_size: int = DENSITY_GRID, sigma: Optional[float] = None,
                     progress: Optional[Callable[[int], None]] = None, state: Optional[dict] = None,
                     checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (spectral.slq): for
    each of `num_probes` Rademacher probes, `num_steps` Lanczos steps give Ritz values and
    weights (`ritz_values`, `weights`: one list per probe; each probe's weights sum to 1, so
    sum(weights * ritz_values) estimates trace / dim and sum(weights * ritz_values^2)
    trace(H^2) / dim), and their Gaussian-broadened average on a grid (`grid`, `density`; it
    integrates to 1, see spectral.gaussian_density for the default width). Memory: num_steps
    vectors of P / R per rank, one probe at a time."""
    DENSITY_PROBES.check("num_probes", num_probes, HessianError)
    DENSITY_STEPS.check("num_steps", num_steps, HessianError)
    with Objective(model, loss_fn, batches, params, hvp, progress) as objective:
        nodes = slq(objective.products, objective.space, objective.probes(seed, "slq"), num_probes, num_steps,
                    state=state, checkpoint=checkpoint)
        dim = objective.dim
    ritz_values, weights = [list(values) for values, _ in nodes], [list(mass) for _, mass in nodes]
    grid, density = gaussian_density(ritz_values, weights, grid_size=grid_size, sigma=sigma)
    return {"ritz_values": ritz_values, "weights": weights, "grid": grid.tolist(), "density": density.tolist(),
            "num_probes": num_probes, "num_steps": num_steps, "num_hvps": sum(len(values) for values in ritz_values),
            "num_params": dim, "hvp": hvp}


def noise_stability(model, loss_fn, batches, sigmas: Sequence[float], *, num_draws: int = 8, seed: int = 0,
                    params=None, progress: Optional[Callable[[int], None]] = None, state: Optional[dict] = None,
                    checkpoint: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """E[L(w + e)] - L(w) for e ~ N(0, sigma^2 I) on the selected parameters: NSO's objective
    minus the loss. Two-point estimate (L(w + e) + L(w - e)) / 2 - L(w) per draw (antithetic
    pairs cancel the first-order term), mean and standard error over draws. The same unit
    directions (streams keyed by the draw) are reused for every sigma (common random numbers,
    so the curve is smooth in sigma), drawn again for each, so one is held at a time; the
    perturbed weights are swapped in beside w, which is never written. A checkpoint follows
    every draw."""
    POSITIVE_INT.check("num_draws", num_draws, HessianError)
    if any(POSITIVE.violated(sigma) for sigma in sigmas):
        raise HessianError(f"sigmas {list(sigmas)}: every sigma must be > 0")
    with Objective(model, loss_fn, batches, params, hvp=None, progress=progress) as objective:
        clean = state["loss"] if state else objective.loss()
        deltas = [list(row) for row in state["deltas"]] if state else []
        direction = None
        while len(deltas) < len(sigmas) or (deltas and len(deltas[-1]) < num_draws):
            if not deltas or len(deltas[-1]) == num_draws:
                deltas.append([])
            row = deltas[-1]
            direction = objective.normal_direction((seed, "noise_stability", len(row)), direction)
            pieces = objective.split(direction)
            plus, minus = objective.at_antithetic_points(pieces, sigmas[len(deltas) - 1], objective.loss)
            row.append((plus + minus) / 2 - clean)
            if checkpoint is not None:
                checkpoint({"loss": clean, "deltas": [list(done) for done in deltas]})
    results = []
    for sigma, row in zip(sigmas, deltas):
        values = torch.tensor(row, dtype=torch.float64)
        stderr = values.std().item() / math.sqrt(num_draws) if num_draws > 1 else math.nan
        results.append({"sigma": sigma, "mean": values.mean().item(), "stderr": stderr, "num_draws": num_draws,
                        "loss": clean})
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
        local = objective.shards.local(flat[None]).contiguous()
        curvature = objective.space.dot(local[0], objective.products(local)[0])
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
        whole = full_tensor(p.detach())
        difference[name] = whole - reference[name].to(whole.device, whole.dtype).reshape(whole.shape)
    return difference


def save_eigenvectors(path, model, params=None, **groups) -> None:
    """Write eigenvectors as one torch file (rank 0; every rank must call): for each group
    (e.g. top=..., bottom=...), a result of hessian_eigenpairs(vectors=True) gives
    `{group}_eigenvalues` (list) and `{group}` ((k, P) float tensor, one flat unit eigenvector
    per row), beside `names` and `shapes` of the selected parameters, which split a row into
    parameter tensors in that order (as torch.split(row, [prod(shape) ...]))."""
    selected = select_parameters(model, params)
    shards = vector_layout(unwrap(model), list(selected.values()))
    content = {"names": list(selected), "shapes": [list(p.shape) for p in selected.values()]}
    for group, result in groups.items():
        content[f"{group}_eigenvalues"] = list(result["eigenvalues"])
        content[group] = shards.gather(result["vectors"]).cpu().clone()
    if not distributed.is_distributed() or dist.get_rank() == 0:
        save_checkpoint(content, path)


def hessian_metrics(model, loss_fn, batches, args) -> Dict[str, float]:
    """Scalars for the training loop's --hessian-frequency, with the --hessian-* settings."""
    settings = dict(params=args.hessian_params, seed=args.seed)
    batches = list(batches)
    result = hessian_trace(model, loss_fn, batches, num_probes=args.hessian_probes, method=args.hessian_method,
                           hvp=args.hessian_hvp, block_size=args.hessian_block_size,
                           target_rel_stderr=args.hessian_target_rel_stderr, **settings)
    metrics = {"hessian/trace": result["trace"], "hessian/trace_stderr": result["stderr"]}
    if args.hessian_target_rel_stderr is not None:
        metrics["hessian/trace_num_hvps"] = result["num_hvps"]
    for tower, trace in result["per_tower"].items():
        metrics[f"hessian/trace_{tower}"] = trace
    lanczos_settings = dict(max_iter=args.hessian_max_iter, hvp=args.hessian_hvp, **settings)
    if args.hessian_top_k > 0:
        eigenvalues = top_eigenvalues(model, loss_fn, batches, k=args.hessian_top_k, **lanczos_settings)
        metrics["hessian/top_eigenvalue"] = eigenvalues[0]
        for rank, value in enumerate(eigenvalues[1:], start=2):
            metrics[f"hessian/eigenvalue_{rank}"] = value
    if args.hessian_bottom_k > 0:
        eigenvalues = top_eigenvalues(model, loss_fn, batches, k=args.hessian_bottom_k, which="smallest",
                                      **lanczos_settings)
        metrics["hessian/bottom_eigenvalue"] = eigenvalues[0]
        for rank, value in enumerate(eigenvalues[1:], start=2):
            metrics[f"hessian/bottom_eigenvalue_{rank}"] = value
    return metrics
