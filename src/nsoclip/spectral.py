"""Matrix-free spectral estimators for a symmetric operator given only as `products(V) -> V A`,
the products A v for each row v of a block V: Hutchinson and Hutch++ trace estimates (with
per-segment diagonal-block traces) and Lanczos for the largest eigenvalues. The estimators hand
over every vector they already know in one block, so an operator that shares work between
products (the Hessian reuses one batch's graph) can. Pure linear algebra on flat vectors:
nothing here knows about models or ranks, so the estimators are tested against dense matrices.

Every trace estimator returns per-probe *samples*: one row per independent probe, one column per
segment (a contiguous slice of the vector, e.g. one parameter tensor). The estimate is the
column mean and the standard error comes from the spread of the rows, so any grouping of
segments (a layer, a tower) gets a correct standard error by summing columns first."""
import math
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

Products = Callable[[torch.Tensor], torch.Tensor]  # (m, dim) -> (m, dim): row i is A v_i
Segment = Tuple[int, int]

# Hutchinson probes drawn and multiplied together: enough to share each batch's graph across
# several products, few enough that the block (probes and products, 2 x 8 parameter-sized
# vectors) stays small beside the model.
HUTCHINSON_BLOCK = 8


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


def rademacher(count: int, dim: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """`count` rows of +-1 entries, drawn on the generator's device so every rank with the same
    seed and device type draws the same probes."""
    bits = torch.randint(0, 2, (count, dim), generator=generator, device=generator.device)
    return (bits.to(dtype) * 2 - 1).to(device)


def segment_sums(rows: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """(m, dim) -> (m, num_segments) float64 sums of each row over each segment."""
    return torch.stack([rows[:, start:end].sum(dim=1, dtype=torch.float64) for start, end in segments], dim=1)


def hutchinson(products: Products, dim: int, num_probes: int, generator: torch.Generator,
               segments: Sequence[Segment], dtype=torch.float32, device="cpu",
               block_size: int = HUTCHINSON_BLOCK) -> TraceSamples:
    """z^T A z with Rademacher z, `block_size` probes at a time; segment s of row i is
    z_s . (A z)_s, an unbiased estimate of the trace of A's diagonal block s (the off-block terms
    have zero mean)."""
    rows = []
    for start in range(0, num_probes, block_size):
        probes = rademacher(min(block_size, num_probes - start), dim, generator, dtype, device)
        rows.append(segment_sums(products(probes).mul_(probes), segments))
    return TraceSamples(torch.cat(rows), num_probes)


def orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (as rows) of the span of the rows; QR in float64 for stability."""
    q, _ = torch.linalg.qr(rows.T.to(torch.float64))
    return q.T.to(rows.dtype).contiguous()


def hutchpp(products: Products, dim: int, num_matvecs: int, generator: torch.Generator,
            segments: Sequence[Segment], dtype=torch.float32, device="cpu") -> TraceSamples:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with a budget of `num_matvecs` products:
    a third sketch the range (Q = orth(A S)), a third compute A Q, and the rest run Hutchinson
    on the deflated remainder (I - QQ^T) A (I - QQ^T). Budgets below 3 leave no room for a
    sketch and fall back to Hutchinson. Each of the three phases is one block of products.

    Per segment s, the trace of A's diagonal block is sum_{i in s} (A QQ^T)_ii (exact, from A Q
    and Q) plus sum_{i in s} u_i (A u)_i with u = (I - QQ^T) g, unbiased for
    sum_{i in s} (A (I - QQ^T))_ii; the segments add up to the usual Hutch++ estimate. The
    standard error is conditional on the sketch: it is the spread of the residual probes."""
    sketch = num_matvecs // 3
    if sketch == 0:
        return hutchinson(products, dim, num_matvecs, generator, segments, dtype, device)
    basis = orthonormal_rows(products(rademacher(sketch, dim, generator, dtype, device)))
    exact = segment_sums((products(basis) * basis).sum(dim=0, keepdim=True), segments)
    residual = rademacher(num_matvecs - 2 * sketch, dim, generator, dtype, device)
    residual -= (residual @ basis.T) @ basis
    return TraceSamples(exact + segment_sums(residual * products(residual), segments), num_matvecs)


def lanczos_top(products: Products, dim: int, k: int, max_iter: int, tol: float, generator: torch.Generator,
                dtype=torch.float32, device="cpu") -> Tuple[List[float], int]:
    """The k largest algebraic eigenvalues (largest first) and the number of products used.

    Lanczos with full reorthogonalisation (twice, classical Gram-Schmidt), so the Krylov basis
    stays orthonormal and no spurious copies of converged eigenvalues appear. The basis is
    kept on `device`: memory is max_iter vectors of length dim. Stops when each of the top k
    Ritz pairs has residual ||A y - theta y|| <= tol * |theta| (|beta_j * s_j| in Lanczos terms),
    when the Krylov space is invariant, or after max_iter products."""
    if k < 1 or max_iter < 1:
        raise ValueError(f"lanczos_top: k={k} and max_iter={max_iter} must be >= 1")
    max_iter = min(max_iter, dim)
    basis = torch.empty(max_iter, dim, dtype=dtype, device=device)
    alphas, betas = [], []
    q = rademacher(1, dim, generator, dtype, device)[0]
    basis[0] = q / q.norm()
    ritz = torch.empty(0, dtype=torch.float64)
    for j in range(max_iter):
        w = products(basis[j:j + 1])[0]
        alpha = torch.dot(w, basis[j]).item()
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = w.norm().item()
        alphas.append(alpha)
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors = torch.linalg.eigh(tridiagonal)
        top = min(k, j + 1)
        residuals = (beta * vectors[-1, -top:]).abs()
        converged = bool((residuals <= tol * ritz[-top:].abs().clamp_min(1e-30)).all()) and top == k
        if converged or beta <= 1e-10 * max(1.0, ritz.abs().max().item()) or j + 1 == max_iter:
            return ritz.flip(0)[:k].tolist(), j + 1
        betas.append(beta)
        basis[j + 1] = w / beta
