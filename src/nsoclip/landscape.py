"""Loss landscapes: the training objective on a line (1d) or a plane (2d) through the weights w,
along the top Hessian eigenvectors or along filter-normalised random directions (Li, Xu, Taylor,
Studer, Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets"), as a grid of gathered
losses that `nsoclip.report` draws. The CLI is `nsoclip.hessian --landscape 1d|2d`.

Each grid point is L(w + x d1 (+ y d2)) with the same loss and batches as `nsoclip.curvature`
(every rank's batches, dropout off), formed in a buffer swapped in beside w, which is never
written."""
import itertools
import math
from typing import Callable, Optional

import torch

from .checks import POSITIVE, Range
from .curvature import HessianError, Objective, hessian_eigenpairs

DIMENSIONS = ("1d", "2d")
DIRECTIONS = ("random", "eigen")
NUM_POINTS = Range(int, at_least=2)
SPAN = POSITIVE
# Li et al.'s guard against a zero random filter.
FILTER_EPS = 1e-10


def filter_normalised(objective: Objective, key: tuple) -> torch.Tensor:
    """A flat random direction (streams keyed by `key`, as the probes) in which every filter
    (row along the first dimension: an output unit of a linear layer or convolution, a token of
    an embedding) has the norm of the same filter of w. Tensors with fewer than two dimensions
    (biases, norms, class token, logit_scale) get zero, as Li et al. do by default
    (`ignore biasbn`): their scale is not comparable to a filter's."""
    direction = objective.normal_direction(key)
    for (start, end), shape, weight, param in zip(objective.segments, objective.shapes, objective.weights(),
                                                  objective.params):
        piece = direction[start:end]
        if param.ndim < 2:
            piece.zero_()
            continue
        rows = piece.view(shape[0], math.prod(shape[1:]))  # this rank's rows: whole filters in any layout
        norms = weight.reshape(rows.shape).to(rows.dtype).norm(dim=1, keepdim=True)
        rows.mul_(norms / (rows.norm(dim=1, keepdim=True) + FILTER_EPS))
    return direction


def loss_landscape(model, loss_fn, batches, *, dims: int = 1, directions: str = "random", num_points: int = 21,
                   span: float = 1.0, seed: int = 0, params=None, vectors: Optional[torch.Tensor] = None,
                   hvp: str = "exact", max_iter: int = 100, progress: Optional[Callable[[int], None]] = None,
                   state: Optional[dict] = None, checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """The loss at `num_points` coordinates in [-span, span] along each of `dims` directions:
    `loss` is a list (1d) or a list of rows, loss[i][j] at x = coordinates[i], y =
    coordinates[j] (2d), beside `loss_at_w`.

    directions="eigen": the unit top eigenvectors (coordinates in parameter units), given as
    `vectors` (hessian_eigenpairs(vectors=True)'s local slices, `dims` rows used) or computed
    here by Lanczos (`max_iter`, `hvp`; their `eigenvalues` are then returned too).
    directions="random": filter_normalised directions, the coordinates in units of the
    filters' own norms (1 doubles every filter at most). A checkpoint follows every point."""
    if dims not in (1, 2):
        raise HessianError(f"dims {dims!r}: expected 1 or 2")
    if directions not in DIRECTIONS:
        raise HessianError(f"directions {directions!r}: expected one of {', '.join(DIRECTIONS)}")
    NUM_POINTS.check("num_points", num_points, HessianError)
    SPAN.check("span", span, HessianError)
    eigenvalues = None
    if directions == "eigen" and vectors is None:
        pairs = hessian_eigenpairs(model, loss_fn, batches, k=dims, max_iter=max_iter, seed=seed, params=params,
                                   hvp=hvp, vectors=True, progress=progress)
        vectors, eigenvalues = pairs["vectors"], pairs["eigenvalues"]
    with Objective(model, loss_fn, batches, params, hvp=None, progress=progress) as objective:
        if directions == "eigen":
            if vectors.ndim != 2 or len(vectors) < dims or vectors.shape[1] != objective.shards.local_dim:
                raise HessianError(f"vectors of shape {tuple(vectors.shape)}: expected at least {dims} rows of this "
                                   f"rank's {objective.shards.local_dim} entries")
            local = vectors[:dims].to(device=objective.device, dtype=objective.dtype).contiguous()
            axes = objective.shards.to_model(local)
        else:
            axes = torch.stack([filter_normalised(objective, (seed, "landscape", axis)) for axis in range(dims)])
        coordinates = torch.linspace(-span, span, num_points, dtype=torch.float64).tolist()
        # axes are model-side vectors: whole (one process, DDP) or this rank's rows (FSDP2)
        grid = list(itertools.product(coordinates, repeat=dims))
        centre = state["loss_at_w"] if state else objective.loss()
        losses = list(state["losses"]) if state else []
        pieces = [objective.split(axis) for axis in axes]
        weights = objective.weights()
        point = objective.point_buffers()[0]
        while len(losses) < len(grid):
            first, *others = grid[len(losses)]
            for index, (weight, buffer) in enumerate(zip(weights, point)):
                torch.add(weight, pieces[0][index], alpha=first, out=buffer)
                for coefficient, axis in zip(others, pieces[1:]):
                    buffer.add_(axis[index], alpha=coefficient)
            losses.append(objective.at(point, objective.loss))
            if checkpoint is not None:
                checkpoint({"loss_at_w": centre, "losses": list(losses)})
        dim = objective.dim
    loss = losses if dims == 1 else [losses[row * num_points:(row + 1) * num_points] for row in range(num_points)]
    result = {"dims": dims, "directions": directions, "coordinates": coordinates, "loss": loss, "loss_at_w": centre,
              "num_points": num_points, "span": span, "num_params": dim}
    if eigenvalues is not None:
        result["eigenvalues"] = eigenvalues
    return result
