"""Learning-rate schedules as pure functions of the optimizer step, as OpenCLIP's: linear warmup,
then cosine, constant, or constant with a final cooldown. Being stateless, a resumed run needs
nothing but the step to continue the schedule exactly."""
import math


def lr_at(step: int, *, base_lr: float, warmup: int, total_steps: int, kind: str = "cosine",
          cooldown_steps: int = 0, cooldown_power: float = 1.0, cooldown_end_lr: float = 0.0) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "const":
        return base_lr
    if kind == "const-cooldown":
        cooldown_start = total_steps - cooldown_steps
        if step < cooldown_start:
            return base_lr
        progress = (step - cooldown_start) / max(1, total_steps - cooldown_start)
        return (1 - progress) ** cooldown_power * (base_lr - cooldown_end_lr) + cooldown_end_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


class LRSchedule:
    """Sets every param group's lr for a step; works for AdamW, NSO and SAM alike since
    they share their base optimizer's param_groups. --skip-scheduler (OpenCLIP's meaning): --lr
    at every step, no warmup and no decay."""

    def __init__(self, optimizer, args, steps_per_epoch: int):
        self.optimizer = optimizer
        self.skip = args.skip_scheduler
        self.settings = dict(
            base_lr=args.lr, warmup=args.warmup, total_steps=steps_per_epoch * args.epochs,
            kind=args.lr_scheduler, cooldown_steps=steps_per_epoch * (args.epochs_cooldown or 0),
            cooldown_power=args.lr_cooldown_power, cooldown_end_lr=args.lr_cooldown_end)

    def __call__(self, step: int) -> float:
        lr = self.settings["base_lr"] if self.skip else lr_at(step, **self.settings)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
