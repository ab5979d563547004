"""Sharpness-Aware Minimization (SAM, and ASAM with `adaptive=True`): the baseline NSO is compared
with, under the same contract as `nsoclip.nso.NSO` (closure-driven step, shared param_groups,
unscale / clip / skip through `nsoclip.update.apply_update`, one snapshot of w, exact restore).

    e = rho * T^2 g / ||T g||   (T = |w| elementwise for ASAM, the identity for SAM; g = grad L(w))
    update from grad L(w + e), applied at w

`ascent` chooses which g:
- "local": each rank's own gradient; the ascent pass runs under DDP's no_sync, so one gradient
  all-reduce per step. Ranks then perturb differently (SAM's m-sharpness with m = the per-rank
  batch): with a gathered contrastive loss, the descent-pass loss mixes features computed at
  different weights, and results depend on the world size.
- "global": the all-reduced gradient, so every rank uses the same e and the step equals a
  single-process step on the global batch, at the price of a second all-reduce. Under FSDP2 the
  gradient is reduce-scattered instead, and its norm is summed over the shards (one scalar
  all-reduce); "local" cannot exist there (no rank holds weights of its own) and is refused.

BatchNorm running statistics are updated by the ascent pass (at w) only; the descent pass at
w + e leaves them as they were (`nsoclip.perturbed`).
"""
from typing import Optional

import torch

from .checks import NON_NEGATIVE
from .parallel import local_tensor
from .perturbed import PerturbedOptimizer
from .rng import capture_rng, restore_rng

ASCENTS = ("local", "global")
RHO = NON_NEGATIVE


class SAM(PerturbedOptimizer):
    def __init__(self, params, base_optimizer, *, rho: float = 0.05, adaptive: bool = False,
                 ascent: str = "local", ddp_model=None, model=None, **base_optimizer_kwargs):
        RHO.check("SAM: rho", rho)
        if ascent not in ASCENTS:
            raise ValueError(f"SAM: unknown ascent {ascent!r} (choose from {', '.join(ASCENTS)})")
        super().__init__(params, base_optimizer, ddp_model, base_optimizer_kwargs, model=model)
        if ascent == "local" and self.layout.sharded:
            raise ValueError("SAM: ascent 'local' needs every rank to hold the whole model (DDP); with sharded "
                             "parameters use ascent='global'")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.ascent = ascent

    @torch.no_grad()
    def _ascend(self, params) -> None:
        """w -> w + e. A non-finite gradient (fp16 overflow) makes e NaN on purpose: the descent
        gradient turns NaN, the all-reduce carries it to every rank, and all ranks skip the step
        and back off the loss scale together, without an extra collective or a host sync."""
        with_grad = [(view.tensor, local_tensor(p.grad))
                     for p, view in zip(params, self.layout.local_views(params)) if p.grad is not None]
        if not with_grad:
            return
        if self.adaptive:
            norms = [torch.linalg.vector_norm(g * w.abs()) for w, g in with_grad]
        else:
            norms = [torch.linalg.vector_norm(g) for _, g in with_grad]
        scale = self.rho / (self.layout.total_norm(norms) + 1e-12)
        for w, g in with_grad:
            direction = g * w * w if self.adaptive else g
            w.addcmul_(direction, scale.to(w.dtype))

    def step(self, closure, *, grad_scaler=None, max_grad_norm: Optional[float] = None) -> torch.Tensor:
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs forward + backward and returns the loss")
        params = [p for _, p in self._trainable()]
        self.zero_grad(set_to_none=True)
        rng = capture_rng(self._cuda_devices(params))
        clean_loss = self._run_pass(closure, sync=self.ascent == "global", at_w=True)
        weights = [view.tensor for view in self.layout.local_views(params)]
        self._take_snapshot(weights)
        self._ascend(params)
        self.zero_grad(set_to_none=True)
        restore_rng(rng)  # the descent pass sees the dropout masks the ascent was computed for
        perturbed_loss = self._run_pass(closure, sync=True, at_w=False)
        self._restore_snapshot(weights)
        self._stats = {"rho": self.rho, "clean_loss": clean_loss, "perturbed_loss": perturbed_loss}
        self._apply(grad_scaler, max_grad_norm, perturbed=True)
        return perturbed_loss
