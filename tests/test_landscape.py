"""Loss landscapes on a quadratic model whose Hessian is known: the line along the top
eigenvector is lambda_1 t^2 / 2, the plane along the top two is (lambda_1 x^2 + lambda_2 y^2) / 2,
filter-normalised random directions have w's filter norms (zero on 1-d tensors) and give
t^2 d^T A d / 2; an interrupted grid resumes to the same numbers; bad input is refused."""
import math

import pytest
import torch

from nsoclip.curvature import HessianError, Objective
from nsoclip.landscape import filter_normalised, loss_landscape

F64 = torch.float64


class Quadratic(torch.nn.Module):
    """L(w) = (w - c)^T A (w - c) / 2 over the flat (weight, bias), with c the initial weights:
    the gradient is zero at w and the Hessian is A."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(3, 4, generator=generator, dtype=F64))
        self.bias = torch.nn.Parameter(torch.randn(2, generator=generator, dtype=F64))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.weight.reshape(-1), self.bias])


def quadratic_loss(model, batch):
    matrix, centre = batch
    offset = model.flat() - centre
    return 0.5 * offset @ matrix @ offset


@pytest.fixture(scope="module")
def quadratic():
    model = Quadratic()
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(14, 14, generator=generator, dtype=F64))
    spectrum = torch.cat([torch.tensor([9.0, 5.0], dtype=F64), torch.linspace(-2, 2, 12, dtype=F64)])
    matrix = basis @ torch.diag(spectrum) @ basis.T
    return model, [(matrix, model.flat().detach().clone())], spectrum


def test_line_along_the_top_eigenvector_is_half_lambda_t_squared(quadratic):
    model, batches, spectrum = quadratic
    before = model.flat().detach().clone()
    result = loss_landscape(model, quadratic_loss, batches, dims=1, directions="eigen", num_points=7, span=1.5)
    assert result["eigenvalues"] == pytest.approx([9.0], rel=1e-7)
    assert result["coordinates"] == pytest.approx([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    assert result["loss_at_w"] == 0.0
    for t, loss in zip(result["coordinates"], result["loss"]):
        assert loss == pytest.approx(9.0 * t * t / 2, rel=1e-6, abs=1e-12)
    assert torch.equal(model.flat().detach(), before)  # w never written


def test_plane_along_the_top_two_eigenvectors(quadratic):
    model, batches, _ = quadratic
    result = loss_landscape(model, quadratic_loss, batches, dims=2, directions="eigen", num_points=3, span=1.0)
    assert result["eigenvalues"] == pytest.approx([9.0, 5.0], rel=1e-7)
    for i, x in enumerate(result["coordinates"]):
        for j, y in enumerate(result["coordinates"]):
            assert result["loss"][i][j] == pytest.approx((9.0 * x * x + 5.0 * y * y) / 2, rel=1e-6, abs=1e-12)


def test_filter_normalised_random_directions(quadratic):
    """Li et al.'s normalisation: each row of the weight has w's row norm, the bias is zero;
    the loss along the direction is the quadratic form of the direction."""
    model, batches, _ = quadratic
    with Objective(model, quadratic_loss, batches) as objective:
        direction = filter_normalised(objective, (3, "landscape", 0))
    rows = direction[:12].view(3, 4)
    torch.testing.assert_close(rows.norm(dim=1), model.weight.detach().norm(dim=1))
    assert torch.equal(direction[12:], torch.zeros(2, dtype=F64))
    result = loss_landscape(model, quadratic_loss, batches, dims=1, directions="random", num_points=5, span=2.0,
                            seed=3)
    curvature = (direction @ batches[0][0] @ direction).item()
    for t, loss in zip(result["coordinates"], result["loss"]):
        assert loss == pytest.approx(curvature * t * t / 2, rel=1e-9, abs=1e-12)
    assert "eigenvalues" not in result


def test_interrupted_grid_resumes_to_the_same_numbers(quadratic):
    model, batches, _ = quadratic
    options = dict(dims=2, directions="random", num_points=3, span=0.5, seed=4)
    whole = loss_landscape(model, quadratic_loss, batches, **options)
    saved = []

    def stop_after_four(state):
        saved.append(state)
        if len(saved) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loss_landscape(model, quadratic_loss, batches, checkpoint=stop_after_four, **options)
    assert len(saved[-1]["losses"]) == 4
    assert loss_landscape(model, quadratic_loss, batches, state=saved[-1], **options) == whole
    assert not any(math.isnan(v) for row in whole["loss"] for v in row)


def test_bad_input(quadratic):
    model, batches, _ = quadratic
    cases = [(dict(dims=3), "dims 3"), (dict(directions="pca"), "directions 'pca'"), (dict(num_points=1), "num_points 1"),
             (dict(span=0.0), "span 0.0"), (dict(directions="eigen", vectors=torch.zeros(1, 3, dtype=F64)), "shape")]
    for options, message in cases:
        with pytest.raises(HessianError, match=message):
            loss_landscape(model, quadratic_loss, batches, **options)
