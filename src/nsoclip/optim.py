"""Optimizers: OpenCLIP's parameter groups, the one factory behind `--opt`, and the update that
every optimizer shares (unscale, clip, skip on NaN/inf, step).

The training loop calls `take_step(optimizer, closure, ...)` and never learns whether the
gradient came from one clean pass or from perturbed ones: NSO and SAM own their passes."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """OpenCLIP's rule: gains, biases, logit_scale and other 1-d tensors are not decayed."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def parameter_groups(model: torch.nn.Module, weight_decay: float):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_weight_decay(n, p)], "weight_decay": weight_decay},
    ]


@dataclass
class UpdateResult:
    grad_norm: torch.Tensor
    applied: bool


def apply_update(optimizer: torch.optim.Optimizer, grad_scaler=None,
                 max_grad_norm: Optional[float] = None) -> UpdateResult:
    """Unscale (fp16), measure and optionally clip the gradient norm, then step, unless the
    gradient holds NaN/inf. Gradients are all-reduced before this point, so every rank sees the
    same norm and takes the same decision without another collective."""
    if grad_scaler is not None:
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
    return UpdateResult(grad_norm=grad_norm.detach(), applied=finite)


def take_step(optimizer, closure: Callable[[], torch.Tensor], grad_scaler=None,
              max_grad_norm: Optional[float] = None):
    """(loss, UpdateResult) for any optimizer: closure-driven ones (NSO, SAM) run their own passes."""
    if getattr(optimizer, "runs_closure", False):
        loss = optimizer.step(closure, grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        return loss, optimizer.last_update
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    return loss, apply_update(optimizer, grad_scaler, max_grad_norm)


def create_optimizer(args, model: torch.nn.Module, ddp_model=None) -> torch.optim.Optimizer:
    """AdamW, or NSO / SAM around AdamW, over OpenCLIP's two parameter groups (`--opt`)."""
    groups = parameter_groups(model, args.wd)
    adamw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, **adamw)
    if args.opt == "nso":
        from .nso import NSO
        return NSO(groups, torch.optim.AdamW, sigma=args.nso_sigma, num_perturbs=args.nso_num_perturbs,
                   two_point=args.nso_two_point, lam=args.nso_lam, distribution=args.nso_distribution,
                   seed=args.seed, ddp_model=ddp_model, sigma_schedule=args.nso_sigma_schedule,
                   sigma_ramp_steps=args.nso_sigma_ramp_steps, perturb=args.nso_perturb, **adamw)
    from .sam import SAM
    return SAM(groups, torch.optim.AdamW, rho=args.sam_rho, adaptive=args.sam_adaptive,
               ascent=args.sam_ascent, ddp_model=ddp_model, **adamw)

