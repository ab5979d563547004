"""Matrix-free spectral estimators for a symmetric operator A known only through products A v:
Hutchinson and Hutch++ traces (with the traces of diagonal blocks, per segment), Lanczos for
the extreme eigenvalues and stochastic Lanczos quadrature (SLQ) for the spectral density.

Every long-lived vector is sharded. A rank holds its slice of each flat vector (`Space`: which
entries are local is the caller's business, a contiguous slice under DDP, per-parameter shards
under FSDP), does its arithmetic locally and sums small tensors over ranks with the caller's
`reduce`, so memory per rank is 1/R of the replicated algorithm and nothing here knows about
models or torch.distributed: the estimators are tested against dense matrices. The estimators
never draw random numbers: the caller's `probes(start, count)` is a pure function of the probe
indices, so every layout, block size and resumed run sees the same probes. Every decision
(stopping, convergence, breakdown) is taken on reduced numbers, so all ranks take it together
and call `reduce` equally often, and all return the same numbers.

The estimators hand over every vector they already know in one block, so an operator that
shares work between products (the Hessian reuses one batch's graph) can.

Trace estimators return per-probe *samples*: one row per independent probe, one column per
segment (e.g. one parameter tensor). The estimate is the column mean and the standard error
comes from the spread of the rows, so any grouping of segments (a layer, a tower) gets a
correct standard error by summing columns first.

Every estimator is resumable. It calls `checkpoint(state)` after each block of products, with
`state` a plain dict of ints, floats, lists and tensors (torch.save / torch.load(weights_only=
True) round-trip it); passing the last state back as `state` continues the run, with the same
arguments, and gives bit for bit the result of an uninterrupted run. The state's tensors may be
views of working buffers that later steps overwrite, so write it out (to a temporary file, then
rename) within the callback. A view saves its whole storage: a Lanczos state writes the full
(max_iter, local_dim) basis buffer, hence `checkpoint_every`. A state that holds a `basis` also
holds a `basis_id`: while the id stays the same the basis only grows (rows already handed over
never change), so a caller may append the new rows to what it wrote before instead of writing
the basis again, and pass the rows back as `basis` to resume."""
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

# (m, local_dim) -> (m, local_dim): this rank's slice of A v for each row v (given as this
# rank's slices); the estimators may overwrite the result but never the input.
Products = Callable[[torch.Tensor], torch.Tensor]
# (start, count) -> (count, local_dim) of +-1: this rank's slices of probes start..start+count-1.
Probes = Callable[[int, int], torch.Tensor]
Checkpoint = Callable[[dict], None]

# Hutchinson probes drawn and multiplied together: enough to share each batch's graph across
# several products, few enough that the block (probes and products, 2 x 8 parameter-sized
# vectors) stays small beside the model.
HUTCHINSON_BLOCK = 8
# No early stop before this many probes: a standard error from fewer is itself too noisy to trust.
HUTCHINSON_MIN_PROBES = 2 * HUTCHINSON_BLOCK
# float64 elements converted at a time per operand of Space.gram / the sketch's QR (32 MiB), so
# no float64 copy of a basis is ever made.
CHUNK = 1 << 22
# Sketch directions whose Gram eigenvalue is below this fraction of the largest are dropped
# (singular values below 1e-5 of the largest): a float64 Gram matrix of 1e8-long vectors is
# accurate to about 1e-12 of its norm, so what remains is reliably full rank for the second pass.
RANK_RTOL = 1e-10
# A Lanczos residual below this many units of roundoff of ||T|| means the Krylov space is
# invariant: what is left of the vector is rounding noise.
BREAKDOWN_ULPS = 100
# Spectral density defaults: Gaussians as wide as 1% of the Ritz values' spread, on a grid
# reaching 5 widths past the extreme ones (so it holds all but 6e-7 of the mass), 1024 points
# (about 10 per width).
DENSITY_SIGMA = 0.01
DENSITY_PAD = 5.0
DENSITY_GRID = 1024


def identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class Space:
    """This rank's view of the flat vectors: its local length, the global length, the cross-rank
    sum, and the segments (e.g. parameter tensors) whose diagonal-block traces are wanted.

    `reduce` sums a small tensor over ranks (an all_reduce; it may work in place and return its
    argument). `segments` are (segment id, local start, local end): a segment may be split over
    ranks, appear in several local pieces, or be absent here, so `num_segments` (the same on
    every rank) must be given with them. With neither, the whole vector is one segment. Trace
    totals add the segments, so they should cover the vector."""
    local_dim: int
    dim: int
    reduce: Callable[[torch.Tensor], torch.Tensor] = identity
    segments: Sequence[Tuple[int, int, int]] = ()
    num_segments: int = 0
    dtype: torch.dtype = torch.float32
    device: Union[str, torch.device] = "cpu"
    _buffers: Optional[List[torch.Tensor]] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.segments = tuple(tuple(segment) for segment in self.segments)
        if not 0 <= self.local_dim <= self.dim or self.dim < 1:
            raise ValueError(f"Space: local_dim {self.local_dim} and dim {self.dim} need "
                             "0 <= local_dim <= dim, dim >= 1")
        if not self.segments and not self.num_segments:
            self.segments, self.num_segments = ((0, 0, self.local_dim),), 1
        if self.num_segments < 1:
            raise ValueError("Space: segments given without num_segments (it must be the same on every rank)")
        for segment, start, end in self.segments:
            if not (0 <= segment < self.num_segments and 0 <= start <= end <= self.local_dim):
                raise ValueError(f"Space: segment ({segment}, {start}, {end}) outside {self.num_segments} segments "
                                 f"or local_dim {self.local_dim}")

    def gram(self, rows: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """rows @ others^T over the global vectors, (len(rows), len(others)) float64 after one
        reduce. Float64 keeps the sketch's QR and the reorthogonalisation accurate for float32
        vectors; it is formed a chunk of columns at a time, never as a float64 copy of a basis,
        in two float64 buffers of at most CHUNK elements kept for the Space's lifetime (fresh
        ones for every chunk made the conversion 4x slower on CPU: each is new pages to fault in)."""
        local = torch.zeros(len(rows), len(others), dtype=torch.float64, device=self.device)
        step = max(1, CHUNK // max(1, len(rows), len(others)))
        left_buffer, right_buffer = (self._buffer(index, len(operand) * min(step, self.local_dim))
                                     for index, operand in enumerate((rows, others)))
        for start in range(0, self.local_dim, step):
            width = min(step, self.local_dim - start)
            left = left_buffer[:len(rows) * width].view(len(rows), width)
            right = right_buffer[:len(others) * width].view(len(others), width)
            local.addmm_(left.copy_(rows[:, start:start + width]), right.copy_(others[:, start:start + width]).T)
        return self.reduce(local)

    def _buffer(self, index: int, size: int) -> torch.Tensor:
        """Float64 buffer `index` with at least `size` (<= CHUNK) elements, grown when needed."""
        if self._buffers is None:
            self._buffers = [torch.empty(0, dtype=torch.float64, device=self.device) for _ in range(2)]
        if len(self._buffers[index]) < size:
            self._buffers[index] = torch.empty(size, dtype=torch.float64, device=self.device)
        return self._buffers[index]

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self.gram(x[None], y[None]).item()

    def segment_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """(m, local_dim) -> (m, num_segments) float64: each row summed over each segment, local
        pieces scattered into their segment's column, then one reduce."""
        local = torch.zeros(len(rows), self.num_segments, dtype=torch.float64, device=self.device)
        for segment, start, end in self.segments:
            local[:, segment] += rows[:, start:end].sum(dim=1, dtype=torch.float64)
        return self.reduce(local)


def dense_space(dim: int, segments: Optional[Sequence[Tuple[int, int]]] = None, dtype=torch.float32,
                device="cpu") -> Space:
    """The whole vector on one process, segments given as (start, end) pairs."""
    pieces = [(index, start, end) for index, (start, end) in enumerate(segments or [(0, dim)])]
    return Space(dim, dim, segments=pieces, num_segments=len(pieces), dtype=dtype, device=device)


def dense_probes(seed: int, dim: int, dtype=torch.float32, device="cpu") -> Probes:
    """Probe i is the Rademacher vector NumPy draws from the seed sequence (seed, i): a pure
    function of (seed, i), the same on every machine and device, for any block; a sharded caller
    takes its entries of the same rows. Drawn on the host, so a caller with long vectors on an
    accelerator may prefer a device-side stream of its own."""
    def draw(start: int, count: int) -> torch.Tensor:
        bits = np.stack([np.random.default_rng([seed, index]).integers(0, 2, dim, dtype=np.int8)
                         for index in range(start, start + count)])
        return torch.from_numpy(bits).to(device=device, dtype=dtype).mul_(2).sub_(1)

    return draw


@dataclass
class TraceSamples:
    samples: torch.Tensor  # (num_rows, num_segments) float64; row sums estimate the trace
    num_matvecs: int

    def estimate(self, columns=None) -> Tuple[float, float]:
        """(mean, standard error) of the trace restricted to `columns` (all when None)."""
        rows = self.samples if columns is None else self.samples[:, list(columns)]
        totals = rows.sum(dim=1)
        stderr = totals.std().item() / math.sqrt(len(totals)) if len(totals) > 1 else math.nan
        return totals.mean().item(), stderr


@dataclass
class LanczosResult:
    eigenvalues: List[float]  # the k wanted Ritz values, the wanted end first
    num_products: int
    vectors: Optional[torch.Tensor] = None  # (k, local_dim) Ritz vectors, with return_vectors


def _positive(**values):
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} {value}: must be >= 1")


def _resume(state: Optional[dict], estimator: str, **settings) -> Optional[dict]:
    """The state to continue from (None for a fresh run), refused when it belongs to another
    estimator or to settings that would change what was already computed."""
    if state is None:
        return None
    if state.get("estimator") != estimator:
        raise ValueError(f"state is from {state.get('estimator')!r}, not {estimator}")
    for name, value in settings.items():
        if state[name] != value:
            raise ValueError(f"state has {name} {state[name]}, this run {value}")
    return state


def _save(checkpoint: Optional[Checkpoint], state: dict):
    if checkpoint is not None:
        checkpoint(state)


def _draw(probes: Probes, space: Space, start: int, count: int) -> torch.Tensor:
    block = probes(start, count)
    if tuple(block.shape) != (count, space.local_dim):
        raise ValueError(f"probes({start}, {count}) gave shape {tuple(block.shape)}, not ({count}, {space.local_dim})")
    return block.to(device=space.device, dtype=space.dtype)


def _precise_enough(samples: torch.Tensor, target: Optional[float], minimum: int) -> bool:
    if target is None or len(samples) < minimum:
        return False
    mean, stderr = TraceSamples(samples, len(samples)).estimate()
    return stderr <= target * abs(mean)


def hutchinson(products: Products, space: Space, probes: Probes, num_probes: int, *,
               block_size: int = HUTCHINSON_BLOCK, target_rel_stderr: Optional[float] = None,
               min_probes: int = HUTCHINSON_MIN_PROBES, state: Optional[dict] = None,
               checkpoint: Optional[Checkpoint] = None) -> TraceSamples:
    """z^T A z for Rademacher z, `block_size` probes per products call; segment s of a sample is
    z_s . (A z)_s, unbiased for the trace of A's diagonal block s (the off-block terms have zero
    mean). Probe i is always probe i, so the block size changes speed, not results.

    With `target_rel_stderr`, stops at the first block end where the total's |stderr / mean| is
    at most the target, but not before `min_probes` samples (a standard error from fewer is too
    noisy to stop on); `num_probes` caps the products either way. A checkpoint after each block
    holds the samples so far."""
    _positive(num_probes=num_probes, block_size=block_size)
    if min_probes < 2:
        raise ValueError(f"min_probes {min_probes}: a standard error needs >= 2")
    if target_rel_stderr is not None and not target_rel_stderr > 0:
        raise ValueError(f"target_rel_stderr {target_rel_stderr}: must be > 0")
    state = _resume(state, "hutchinson")
    samples = (state["samples"] if state else torch.zeros(0, space.num_segments, dtype=torch.float64)).to(space.device)
    while len(samples) < num_probes and not _precise_enough(samples, target_rel_stderr, min_probes):
        block = _draw(probes, space, len(samples), min(block_size, num_probes - len(samples)))
        samples = torch.cat([samples, space.segment_sums(products(block).mul_(block))])
        _save(checkpoint, {"estimator": "hutchinson", "samples": samples})
    return TraceSamples(samples, len(samples))


def _mix(rows: torch.Tensor, weights: torch.Tensor):
    """rows[:p] = weights @ rows[:q] for a (p, q) float64 matrix with p <= q, in place, in
    float64 a chunk of columns at a time: the sketch never exists twice, nor whole in float64."""
    p, q = weights.shape
    weights = weights.to(rows.device)
    step = max(1, CHUNK // q)
    for start in range(0, rows.shape[1], step):
        rows[:p, start:start + step] = weights @ rows[:q, start:start + step].double()


def _orthonormalise(space: Space, rows: torch.Tensor) -> int:
    """Overwrites rows[:r] with an orthonormal basis (as rows) of the span of `rows`; returns r.

    A tall-skinny QR that communicates two small Gram matrices: CholeskyQR2 (Fukaya et al.
    2014), whose first pass takes the Gram matrix's eigen-decomposition instead of its Cholesky
    factor (as SVQB, Stathopoulos & Wu 2002), so a rank-deficient sketch (more sketch vectors
    than A has rank, or A S nearly singular) drops its null directions (RANK_RTOL) instead of
    failing; the second, Cholesky, pass restores orthogonality to working precision. Hutch++
    needs only the span, and any orthonormal basis of it keeps the estimate unbiased. Small
    eigen-problems are solved on the host in float64 so every rank gets the same factors."""
    values, vectors = torch.linalg.eigh(space.gram(rows, rows).cpu())
    keep = values > RANK_RTOL * max(values[-1].item(), 0.0)
    rank = int(keep.sum())
    if rank == 0:
        return 0
    _mix(rows, (vectors[:, keep] / values[keep].sqrt()).T)
    factor = torch.linalg.cholesky(space.gram(rows[:rank], rows[:rank]).cpu())
    _mix(rows, torch.linalg.solve_triangular(factor, torch.eye(rank, dtype=torch.float64), upper=False))
    return rank


def hutchpp(products: Products, space: Space, probes: Probes, num_matvecs: int, *,
            block_size: int = HUTCHINSON_BLOCK, state: Optional[dict] = None,
            checkpoint: Optional[Checkpoint] = None) -> TraceSamples:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with a budget of `num_matvecs` products: a
    third sketch the range (Q = orth(A S), S = probes 0..m-1), up to a third compute A Q, and
    the rest run Hutchinson on the deflated remainder with probes m, m+1, ...; when the sketch
    has rank r < m (see _orthonormalise) the m - r products saved go to the remainder. Budgets
    below 3 leave no room for a sketch and fall back to Hutchinson. Products go `block_size`
    rows at a time, so memory is the sketch plus one block; a checkpoint follows every block.

    Per segment s, the trace of A's diagonal block is sum_{i in s} (A QQ^T)_ii (exact, from A Q
    and Q) plus sum_{i in s} u_i (A u)_i with u = (I - QQ^T) g, unbiased for
    sum_{i in s} (A (I - QQ^T))_ii; the segments add up to the usual Hutch++ estimate. The
    standard error is conditional on the sketch: it is the spread of the residual probes."""
    _positive(num_matvecs=num_matvecs, block_size=block_size)
    sketch = num_matvecs // 3
    if sketch == 0:
        return hutchinson(products, space, probes, num_matvecs, block_size=block_size, state=state,
                          checkpoint=checkpoint)
    basis = torch.empty(sketch, space.local_dim, dtype=space.dtype, device=space.device)
    state = _resume(state, "hutchpp", sketch=sketch) or {
        "estimator": "hutchpp", "sketch": sketch, "basis": basis[:0], "rank": None, "exact_rows": 0,
        "exact": torch.zeros(1, space.num_segments, dtype=torch.float64),
        "samples": torch.zeros(0, space.num_segments, dtype=torch.float64)}
    filled = len(state["basis"])
    basis[:filled] = state["basis"]
    rank, exact_rows = state["rank"], state["exact_rows"]
    exact, samples = state["exact"].to(space.device), state["samples"].to(space.device)

    def save():
        _save(checkpoint, {"estimator": "hutchpp", "sketch": sketch, "rank": rank, "exact_rows": exact_rows,
                           "basis": basis[:filled if rank is None else rank],
                           "basis_id": "sketch" if rank is None else "range", "exact": exact, "samples": samples})

    while rank is None:
        count = min(block_size, sketch - filled)
        basis[filled:filled + count] = products(_draw(probes, space, filled, count))
        filled += count
        if filled == sketch:
            rank = _orthonormalise(space, basis)
        save()
    q = basis[:rank]
    while exact_rows < rank:
        rows = q[exact_rows:exact_rows + block_size]
        exact = exact + space.segment_sums(products(rows).mul_(rows)).sum(dim=0, keepdim=True)
        exact_rows += len(rows)
        save()
    num_residual = num_matvecs - sketch - rank
    while len(samples) < num_residual:
        g = _draw(probes, space, sketch + len(samples), min(block_size, num_residual - len(samples)))
        if rank:
            g.addmm_(space.gram(g, q).to(space.dtype), q, alpha=-1)
        samples = torch.cat([samples, space.segment_sums(products(g).mul_(g))])
        save()
    return TraceSamples(exact + samples, sketch + rank + len(samples))


class _Krylov:
    """A Lanczos recurrence on this rank's slices, with full reorthogonalisation (classical
    Gram-Schmidt twice through Space.gram) so the basis stays orthonormal and no spurious copies
    of converged eigenvalues appear. The basis is a (max_iter, local_dim) buffer of local slices.

    Its state: `alphas` and `betas` (T's diagonal and the coupling from each basis row to the
    next, so len(betas) == len(alphas)), `basis` (the first len(alphas) + 1 rows; the last is
    the vector to multiply next) and `starts` (probes used as start vectors)."""

    def __init__(self, space: Space, max_iter: int, basis_id: str, state: Optional[dict] = None,
                 start: Optional[torch.Tensor] = None):
        self.space, self.basis_id = space, basis_id
        self.basis = torch.empty(max_iter, space.local_dim, dtype=space.dtype, device=space.device)
        if state is None:
            self.alphas, self.betas, self.starts = [], [], 1
            self.basis[0] = start / math.sqrt(space.dot(start, start))
        else:
            if len(state["basis"]) > max_iter:
                raise ValueError(f"state has {len(state['basis'])} Lanczos vectors, more than max_iter {max_iter}")
            self.alphas, self.betas, self.starts = list(state["alphas"]), list(state["betas"]), state["starts"]
            self.basis[:len(state["basis"])] = state["basis"]
        self.residual = None

    def state(self) -> dict:
        return {"alphas": list(self.alphas), "betas": list(self.betas), "starts": self.starts,
                "basis": self.basis[:len(self.alphas) + 1], "basis_id": self.basis_id}

    def _orthogonalise(self, vector: torch.Tensor, known: torch.Tensor) -> float:
        """Removes the span of `known` from `vector` (twice, as one pass leaves rounding-size
        components that grow); returns the total coefficient on the last row (alpha)."""
        last = 0.0
        for _ in range(2):
            coefficients = self.space.gram(known, vector[None])[:, 0]
            vector.addmv_(known.T, coefficients.to(vector.dtype), alpha=-1)
            last += coefficients[-1].item()
        return last

    def step(self, products: Products) -> float:
        """One product: appends alpha and beta and keeps the new residual; returns beta."""
        j = len(self.alphas)
        known = self.basis[:j + 1]
        self.residual = products(known[j:j + 1])[0]
        self.alphas.append(self._orthogonalise(self.residual, known))
        beta = math.sqrt(self.space.dot(self.residual, self.residual))
        self.betas.append(beta)
        return beta

    def invariant(self) -> bool:
        """The last residual is rounding noise: the Krylov space is (numerically) invariant."""
        scale = max(max(abs(a) for a in self.alphas), max(self.betas[:-1], default=0.0))
        return self.betas[-1] <= BREAKDOWN_ULPS * torch.finfo(self.space.dtype).eps * scale

    def extend(self):
        j = len(self.alphas)
        torch.div(self.residual, self.betas[-1], out=self.basis[j])

    def restart(self, vector: torch.Tensor) -> bool:
        """Continues with `vector` made orthogonal to the basis instead of the (noise) residual:
        T's coupling to it is zero. False when nothing of it is left (the basis spans all)."""
        j = len(self.alphas)
        before = math.sqrt(self.space.dot(vector, vector))
        self._orthogonalise(vector, self.basis[:j])
        norm = math.sqrt(self.space.dot(vector, vector))
        if norm <= BREAKDOWN_ULPS * torch.finfo(self.space.dtype).eps * before:
            return False
        self.betas[-1] = 0.0
        self.starts += 1
        torch.div(vector, norm, out=self.basis[j])
        return True

    def ritz(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of T, in float64 on the host so that every
        rank solves the same small problem identically."""
        tridiagonal = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if len(self.alphas) > 1:
            off = torch.tensor(self.betas[:-1], dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        return torch.linalg.eigh(tridiagonal)


def lanczos(products: Products, space: Space, probes: Probes, k: int, max_iter: int, tol: float, *,
            which: str = "largest", return_vectors: bool = False, state: Optional[dict] = None,
            checkpoint: Optional[Checkpoint] = None, checkpoint_every: int = 1) -> LanczosResult:
    """The k largest (largest first) or smallest (smallest first) algebraic eigenvalues, the
    products used and, with `return_vectors`, the Ritz vectors as (k, local_dim) local slices,
    each with the sign that makes its largest coefficient in the Lanczos basis positive (so runs
    on different layouts agree).

    Starts from probe 0, normalised. Stops when each of the k wanted Ritz pairs has residual
    ||A y - theta y|| = |beta_j s_j| <= tol * |theta|, or after max_iter (at most dim) products.
    If the Krylov space becomes invariant with fewer than k Ritz values (A has fewer distinct
    eigenvalues seen from the start vector than wanted), it continues from the next probe made
    orthogonal to the basis, so k values come back, repeated ones with their multiplicity.
    Otherwise, as any single-vector Lanczos, it finds each distinct eigenvalue once. Memory:
    max_iter local vectors. A checkpoint follows every `checkpoint_every` products (the state
    is _Krylov's; the basis makes it large)."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which {which!r}: expected 'largest' or 'smallest'")
    _positive(k=k, max_iter=max_iter, checkpoint_every=checkpoint_every)
    if k > space.dim:
        raise ValueError(f"k {k}: more eigenvalues than the dimension {space.dim}")
    max_iter = min(max_iter, space.dim)
    state = _resume(state, "lanczos")
    krylov = _Krylov(space, max_iter, "lanczos", state, None if state else _draw(probes, space, 0, 1)[0])
    while True:
        beta = krylov.step(products)
        values, vectors = krylov.ritz()
        size = len(values)
        count = min(k, size)
        wanted = torch.arange(size - 1, size - 1 - count, -1) if which == "largest" else torch.arange(count)
        residuals = (beta * vectors[-1, wanted]).abs()
        converged = len(wanted) == k and bool((residuals <= tol * values[wanted].abs()).all())
        if converged or size == max_iter:
            break
        if krylov.invariant():
            if not krylov.restart(_draw(probes, space, krylov.starts, 1)[0]):
                break
        else:
            krylov.extend()
        if size % checkpoint_every == 0:
            _save(checkpoint, {"estimator": "lanczos", **krylov.state()})
    result = LanczosResult(values[wanted].tolist(), size)
    if return_vectors:
        coefficients = vectors[:, wanted]
        largest = coefficients.abs().argmax(dim=0)
        coefficients = coefficients * coefficients[largest, torch.arange(len(wanted))].sign()
        result.vectors = coefficients.T.to(device=space.device, dtype=space.dtype) @ krylov.basis[:size]
    return result


def slq(products: Products, space: Space, probes: Probes, num_probes: int, num_steps: int, *,
        state: Optional[dict] = None, checkpoint: Optional[Checkpoint] = None,
        checkpoint_every: int = 1) -> List[Tuple[List[float], List[float]]]:
    """Stochastic Lanczos quadrature (Golub & Meurant; Ghorbani, Krishnan, Xiao 2019; PyHessian):
    for each probe v (probe i, normalised), num_steps (at most dim) Lanczos steps with full
    reorthogonalisation and the eigen-decomposition of the tridiagonal T give Ritz values
    theta_i and weights tau_i = (first component of T's eigenvector i)^2, a quadrature rule for
    the spectral measure seen from v: sum_i tau_i f(theta_i) estimates tr f(A) / dim (the
    weights sum to 1; f(x) = x gives v^T A v, f(x) = x^2 gives ||A v||^2). Returns one
    (ritz_values, weights) pair per probe.

    When the Krylov space becomes invariant early, the probe's rule has fewer nodes: it is then
    exact for that probe, and continuing from another vector would only add zero weights.
    Memory: num_steps local vectors, one probe at a time. A checkpoint follows each probe and
    every `checkpoint_every` products within one (the state then holds that probe's _Krylov)."""
    _positive(num_probes=num_probes, num_steps=num_steps, checkpoint_every=checkpoint_every)
    num_steps = min(num_steps, space.dim)
    state = _resume(state, "slq", num_steps=num_steps) or {"estimator": "slq", "num_steps": num_steps,
                                                            "nodes": [], "lanczos": None}
    nodes, ongoing = [tuple(pair) for pair in state["nodes"]], state["lanczos"]
    while len(nodes) < num_probes:
        krylov = _Krylov(space, num_steps, f"probe{len(nodes)}", ongoing,
                         None if ongoing else _draw(probes, space, len(nodes), 1)[0])
        while True:
            krylov.step(products)
            size = len(krylov.alphas)
            if size == num_steps or krylov.invariant():
                break
            krylov.extend()
            if size % checkpoint_every == 0:
                _save(checkpoint, {"estimator": "slq", "num_steps": num_steps, "nodes": list(nodes),
                                   "lanczos": krylov.state()})
        values, vectors = krylov.ritz()
        nodes.append((values.tolist(), vectors[0].square().tolist()))
        ongoing = None
        _save(checkpoint, {"estimator": "slq", "num_steps": num_steps, "nodes": list(nodes), "lanczos": None})
    return nodes


def gaussian_density(ritz_values: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], *,
                     grid_size: int = DENSITY_GRID, sigma: Optional[float] = None,
                     grid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The spectral density from SLQ's quadrature rules (one per probe), each node broadened into
    a Gaussian of width sigma and the probes averaged: (grid, density), float64.

    Each probe's weights sum to 1 and each Gaussian integrates to 1, so the density integrates
    to 1 over the real line; on the default grid (the Ritz values' range padded by DENSITY_PAD
    sigmas, about 10 points per sigma) the trapezoid rule gives 1 to ~1e-6. sigma defaults to
    DENSITY_SIGMA of the Ritz values' spread (of their magnitude, or 1, when they all agree):
    wider smooths the few nodes of each probe into a density, narrower resolves closer clusters
    and needs more Lanczos steps. An explicit `grid` is used as given."""
    if len(ritz_values) != len(weights) or len(ritz_values) == 0:
        raise ValueError(f"gaussian_density: {len(ritz_values)} Ritz value lists for {len(weights)} weight lists")
    nodes = [torch.as_tensor(values, dtype=torch.float64) for values in ritz_values]
    masses = [torch.as_tensor(mass, dtype=torch.float64) for mass in weights]
    every = torch.cat(nodes)
    low, high = every.min().item(), every.max().item()
    if sigma is None:
        sigma = DENSITY_SIGMA * ((high - low) or max(abs(low), abs(high)) or 1.0)
    if not sigma > 0:
        raise ValueError(f"gaussian_density: sigma {sigma} must be > 0")
    if grid is None:
        grid = torch.linspace(low - DENSITY_PAD * sigma, high + DENSITY_PAD * sigma, grid_size, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    density = torch.zeros_like(grid)
    for theta, tau in zip(nodes, masses):
        density += torch.exp(-0.5 * ((grid[:, None] - theta) / sigma) ** 2) @ tau
    return grid, density / (len(nodes) * sigma * math.sqrt(2 * math.pi))
