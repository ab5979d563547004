"""Noise Stability Optimization (NSO): the gradient of the loss averaged over random weight
perturbations, then an ordinary optimizer's update at the unperturbed weights.

    g = lam * grad L(w) + (1 - lam) / (k * (1 + two_point)) * sum_i [grad L(w + e_i) (+ grad L(w - e_i))]

Costs only what the formula costs: 2k forward/backward passes for two-point with lam == 0 (the
clean pass runs only when lam > 0), one DDP gradient all-reduce per step (every pass but the last
runs under `no_sync`; gradients accumulate in `.grad`), and one parameter-sized snapshot of w.
The noise e_i is a pure function of (seed, step, i, parameter index, element position in the full
tensor), drawn on the parameter's device from explicitly seeded generators (`rng.Streams`), so
every rank perturbs identically without talking, a rank holding a shard of a parameter (FSDP2)
draws the noise of its own elements only, and a resumed run continues the same noise stream.

The optimizer knows nothing about CLIP: `closure()` runs forward + backward at the current
weights (with `grad_scaler.scale(loss).backward()` under fp16) and returns the loss.
"""
import math
from typing import Callable, Optional, Union

import torch

from .checks import FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT
from .parallel import local_view
from .perturbed import PerturbedOptimizer
from .rng import Draw, Streams, capture_rng, restore_rng

DISTRIBUTIONS = ("normal", "laplace", "uniform")
SIGMA_SCHEDULES = ("constant", "linear", "exp")
PERTURB_CHOICES = ("all", "weights")
EXP_RAMP_START = 0.01  # the exp ramp starts two decades below sigma
SIGMA = NON_NEGATIVE
NUM_PERTURBS = NON_NEGATIVE_INT
LAM = FRACTION
SIGMA_RAMP_STEPS = NON_NEGATIVE_INT


def noise_draw(distribution: str, std: float) -> Draw:
    """Fills a tensor with zero-mean noise of standard deviation `std`. Normal and uniform are
    drawn in place (no temporary); laplace is a difference of two exponentials (one temporary)."""
    if std == 0:
        return lambda tensor, generator: tensor.zero_()
    if distribution == "normal":
        return lambda tensor, generator: tensor.normal_(0.0, std, generator=generator)
    if distribution == "uniform":
        half_width = math.sqrt(3.0) * std
        return lambda tensor, generator: tensor.uniform_(-half_width, half_width, generator=generator)
    rate = math.sqrt(2.0) / std  # Laplace(b) has variance 2 b^2: b = std / sqrt(2), exponentials of rate 1 / b

    def laplace(tensor, generator):
        tensor.exponential_(rate, generator=generator)
        tensor.sub_(torch.empty_like(tensor).exponential_(rate, generator=generator))
    return laplace


def perturb_weights_only(param: torch.Tensor) -> bool:
    """'weights': matrices, convolutions and embeddings; leaves out every 0-d/1-d tensor
    (biases, norm gains, logit_scale, class tokens), the tensors OpenCLIP also exempts from
    weight decay."""
    return param.ndim >= 2


class NSO(PerturbedOptimizer):
    """Noise Stability Optimization around any `torch.optim` optimizer (see the module docstring).

    Beyond the pinned arguments: `sigma_schedule` ("constant", "linear", "exp") with
    `sigma_ramp_steps` N, where at step t (0-based) u = min(1, (t + 1) / N) and
    sigma_t = sigma * u (linear) or sigma * 0.01 ** (1 - u) (exp); a ramp needs N > 0.
    `perturb`: "all" trainable tensors, "weights" (tensors with ndim >= 2: no biases, norms,
    logit_scale), or a predicate `param -> bool`.
    """

    def __init__(self, params, base_optimizer, *, sigma: float, num_perturbs: int = 1, two_point: bool = True,
                 lam: float = 0.0, distribution: str = "normal", seed: int = 0, ddp_model=None,
                 sigma_schedule: str = "constant", sigma_ramp_steps: int = 0,
                 perturb: Union[str, Callable[[torch.Tensor], bool]] = "all", **base_optimizer_kwargs):
        SIGMA.check("NSO: sigma", sigma)
        NUM_PERTURBS.check("NSO: num_perturbs", num_perturbs)
        LAM.check("NSO: lam", lam)
        SIGMA_RAMP_STEPS.check("NSO: sigma_ramp_steps", sigma_ramp_steps)
        if num_perturbs == 0 and lam == 0:
            raise ValueError("NSO: num_perturbs 0 with lam 0 gives no gradient at all (raise either)")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"NSO: unknown distribution {distribution!r} (choose from {', '.join(DISTRIBUTIONS)})")
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"NSO: unknown sigma_schedule {sigma_schedule!r} "
                             f"(choose from {', '.join(SIGMA_SCHEDULES)})")
        if sigma_schedule != "constant" and sigma_ramp_steps == 0:
            raise ValueError(f"NSO: sigma_schedule {sigma_schedule!r} needs sigma_ramp_steps > 0")
        if not callable(perturb) and perturb not in PERTURB_CHOICES:
            raise ValueError(f"NSO: perturb {perturb!r} must be 'all', 'weights' or a predicate param -> bool")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"NSO: seed {seed!r} must be an integer")
        super().__init__(params, base_optimizer, ddp_model, base_optimizer_kwargs)
        self.sigma = float(sigma)
        self.num_perturbs = int(num_perturbs)
        self.two_point = bool(two_point)
        self.lam = float(lam)
        self.distribution = distribution
        self.seed = int(seed)
        self.sigma_schedule = sigma_schedule
        self.sigma_ramp_steps = int(sigma_ramp_steps)
        self.perturbs = {"all": lambda p: True, "weights": perturb_weights_only}.get(perturb, perturb)
        self.step_count = 0
        self._streams = Streams()

    def sigma_at(self, step: int) -> float:
        if self.sigma_schedule == "constant":
            return self.sigma
        progress = min(1.0, (step + 1) / self.sigma_ramp_steps)
        if self.sigma_schedule == "linear":
            return self.sigma * progress
        return self.sigma * EXP_RAMP_START ** (1.0 - progress)

    @property
    def perturbed_passes(self) -> int:
        """Passes at perturbed weights per step; none when their weight (1 - lam) is zero."""
        return 0 if self.lam == 1.0 else self.num_perturbs * (1 + self.two_point)

    def state_dict(self):
        """The base optimizer's state plus the noise stream's position, no temporary buffers."""
        state = super().state_dict()
        state["nso"] = {"seed": self.seed, "step": self.step_count}
        return state

    def load_state_dict(self, state_dict) -> None:
        """The checkpoint's seed wins over the constructor's, so a resumed run continues the same
        noise stream. A plain base-optimizer state dict also loads (the counter then stays)."""
        state = dict(state_dict)
        stream = state.pop("nso", None)
        super().load_state_dict(state)
        if stream is not None:
            self.seed, self.step_count = int(stream["seed"]), int(stream["step"])

    @torch.no_grad()
    def _move_to_noisy_point(self, indexed_params, perturbation: int, sigma: float) -> None:
        """w + e_i: noise drawn straight into each parameter, then the snapshot added. The noise of
        parameter j is the stream (seed, step, i, j), independent of the other tensors; a rank
        draws the slice of it that its local part of the parameter covers."""
        draw = noise_draw(self.distribution, sigma)
        for (index, param), weights in zip(indexed_params, self._snapshot):
            view = local_view(param)
            self._streams.fill_(view.tensor, (self.seed, self.step_count, perturbation, index), draw,
                                view.start, view.numel).add_(weights)

    @torch.no_grad()
    def _reflect_through_snapshot(self, params) -> None:
        """(w + e) -> w - e, as (w + e) + 2 (w - (w + e)): no second draw, no noise buffer."""
        torch._foreach_lerp_(params, self._snapshot, 2.0)

    def step(self, closure, *, grad_scaler=None, max_grad_norm: Optional[float] = None) -> torch.Tensor:
        if closure is None:
            raise ValueError("NSO.step needs a closure that runs forward + backward and returns the loss")
        indexed = [(index, p) for index, p in self._trainable() if self.perturbs(p)]
        perturbed = [view.tensor for view in self.layout.local_views([p for _, p in indexed])]
        sigma = self.sigma_at(self.step_count)
        perturbed_passes = self.perturbed_passes
        passes_left = (self.lam > 0) + perturbed_passes
        perturbed_weight = (1.0 - self.lam) / perturbed_passes if perturbed_passes else 0.0
        self.zero_grad(set_to_none=True)
        self._stats = {"sigma": sigma}

        if self.lam > 0:
            passes_left -= 1
            clean_loss = self._run_pass(closure, sync=passes_left == 0)
            self._stats["clean_loss"] = clean_loss
            # .grad now holds lam * grad L(w) / perturbed_weight, so that one final scaling by
            # perturbed_weight gives the weighted sum without a separate accumulator.
            if perturbed_passes:
                self._scale_grads(self.lam / perturbed_weight)
        losses = []
        if perturbed_passes:
            self._take_snapshot(perturbed)
            cuda_devices = self._cuda_devices(perturbed)
            for perturbation in range(self.num_perturbs):
                self._move_to_noisy_point(indexed, perturbation, sigma)
                rng = capture_rng(cuda_devices) if self.two_point else None
                passes_left -= 1
                losses.append(self._run_pass(closure, sync=passes_left == 0))
                if self.two_point:
                    self._reflect_through_snapshot(perturbed)
                    restore_rng(rng)  # dropout masks repeat, so the pair stays antithetic
                    passes_left -= 1
                    losses.append(self._run_pass(closure, sync=passes_left == 0))
            self._restore_snapshot(perturbed)
            self._scale_grads(perturbed_weight)
            loss = torch.stack(losses).mean()
            self._stats["perturbed_loss"] = loss
        else:
            loss = clean_loss
        self.step_count += 1
        self._apply(grad_scaler, max_grad_norm)
        return loss
