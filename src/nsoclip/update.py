"""The update every optimizer shares (unscale, clip, skip on NaN/inf, step) and `take_step`, the
one call the training loop makes. The loop never learns whether the gradient came from one clean
pass or from perturbed ones: NSO and SAM own their passes and end in `apply_update` too."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class UpdateResult:
    grad_norm: torch.Tensor
    applied: bool
    loss_scale: Optional[float] = None  # the fp16 GradScaler's scale this step was taken with
    perturbed: bool = False  # the gradient came from passes at perturbed weights (NSO, SAM)


def apply_update(optimizer: torch.optim.Optimizer, grad_scaler=None,
                 max_grad_norm: Optional[float] = None) -> UpdateResult:
    """Unscale (fp16), measure and optionally clip the gradient norm, then step, unless the
    gradient holds NaN/inf. Gradients are all-reduced before this point, so every rank sees the
    same norm and takes the same decision without another collective."""
    loss_scale = None
    if grad_scaler is not None:
        loss_scale = grad_scaler.get_scale()
        grad_scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    finite = bool(torch.isfinite(grad_norm))
    if grad_scaler is not None:
        if finite:
            grad_scaler.step(optimizer)
        grad_scaler.update()
    elif finite:
        optimizer.step()
    return UpdateResult(grad_norm=grad_norm.detach(), applied=finite, loss_scale=loss_scale)


def take_step(optimizer, closure: Callable[[], torch.Tensor], grad_scaler=None,
              max_grad_norm: Optional[float] = None):
    """(loss, UpdateResult) for any optimizer: closure-driven ones (NSO, SAM) run their own passes."""
    if getattr(optimizer, "runs_closure", False):
        loss = optimizer.step(closure, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        return loss, optimizer.last_update
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    return loss, apply_update(optimizer, grad_scaler, max_grad_norm)
