"""Optimizers: OpenCLIP's parameter groups and the one factory behind `--opt` (AdamW, or NSO / SAM
around AdamW). The update they share is `nsoclip.update`."""
import torch

from .nso import NSO, SigmaGroupsError, sigma_per_parameter
from .sam import SAM


OPTIMIZERS = ("adamw", "nso", "sam")


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """OpenCLIP's rule: gains, biases, logit_scale and other 1-d tensors are not decayed."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def parameter_groups(model: torch.nn.Module, weight_decay: float):
    """OpenCLIP's two groups, as (name, param) pairs: torch keeps the names in each group's
    `param_names` (NSO's per-group sigma matches them)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [(n, p) for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
        {"params": [(n, p) for n, p in named if not no_weight_decay(n, p)], "weight_decay": weight_decay},
    ]


def check_against_model(args, model: torch.nn.Module) -> None:
    """The optimizer flags that need the model's parameter names, checked before the run folder
    is touched: every --nso-sigma-groups pattern must match a trainable parameter."""
    if args.opt == "nso" and args.nso_sigma_groups:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        try:
            sigma_per_parameter(names, args.nso_sigma_groups, args.nso_sigma)
        except SigmaGroupsError as error:
            raise SigmaGroupsError(f"--nso-sigma-groups {args.nso_sigma_groups!r}: {error}") from None


def create_optimizer(args, model: torch.nn.Module, layout=None) -> torch.optim.Optimizer:
    """AdamW, or NSO / SAM around AdamW, over OpenCLIP's two parameter groups (`--opt`); `layout`
    (nsoclip.parallel) is how the model lies over the ranks, after which the groups are taken."""
    groups = parameter_groups(model, args.wd)
    adamw = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, **adamw)
    if args.opt == "nso":
        return NSO(groups, torch.optim.AdamW, sigma=args.nso_sigma, num_perturbs=args.nso_num_perturbs,
                   two_point=args.nso_two_point, lam=args.nso_lam, distribution=args.nso_distribution,
                   seed=args.seed, ddp_model=layout, sigma_schedule=args.nso_sigma_schedule,
                   sigma_ramp_steps=args.nso_sigma_ramp_steps, perturb=args.nso_perturb,
                   noise_scale=args.nso_noise_scale, noise_eta=args.nso_noise_eta,
                   sigma_groups=args.nso_sigma_groups, every=args.nso_every, start_step=args.nso_start_step,
                   model=model, **adamw)
    return SAM(groups, torch.optim.AdamW, rho=args.sam_rho, adaptive=args.sam_adaptive,
               ascent=args.sam_ascent, ddp_model=layout, model=model, **adamw)
