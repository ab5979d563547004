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

The noise scale is absolute (std sigma everywhere) or relative to the weights (per row, per
tensor or per element, from the snapshot of w so that w + e and w - e stay antithetic), and
sigma can differ per group of parameters, matched by name. Perturbed steps can be every N-th
step and start late; the other steps are plain base-optimizer steps from one pass at w.

The optimizer knows nothing about CLIP: `closure()` runs forward + backward at the current
weights (with `grad_scaler.scale(loss).backward()` under fp16) and returns the loss.
"""
import argparse
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .checks import FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT
from .errors import NsoclipError
from .layout import tower_of
from .parallel import local_view
from .perturbed import PerturbedOptimizer
from .rng import Draw, Streams, capture_rng, restore_rng

DISTRIBUTIONS = ("normal", "laplace", "uniform")
SIGMA_SCHEDULES = ("constant", "linear", "exp")
PERTURB_CHOICES = ("all", "weights")
NOISE_SCALES = ("absolute", "filter", "layer", "element")
EXP_RAMP_START = 0.01  # the exp ramp starts two decades below sigma
SIGMA = NON_NEGATIVE
NUM_PERTURBS = NON_NEGATIVE_INT
LAM = FRACTION
SIGMA_RAMP_STEPS = NON_NEGATIVE_INT
NOISE_ETA = NON_NEGATIVE
EVERY = POSITIVE_INT
START_STEP = NON_NEGATIVE_INT
# Sums of squares of local (shard) tensors -> the sums over every rank holding a part of the same
# tensors. Identity when each rank holds whole tensors (one process, DDP).
Reduce = Callable[[List[torch.Tensor]], List[torch.Tensor]]


class SigmaGroupsError(NsoclipError, ValueError):
    """A sigma group that cannot be used: bad syntax, or a pattern that matches no parameter."""


def parse_sigma_groups(spec: str) -> List[Tuple[str, float]]:
    """'visual=0.01,text=0.005,logit_scale=0' -> [(pattern, sigma), ...] in the order given."""
    groups = []
    for item in spec.split(","):
        pattern, separator, value = (part.strip() for part in item.partition("="))
        if not separator or not pattern:
            raise SigmaGroupsError(f"{item.strip()!r} is not pattern=sigma")
        try:
            sigma = float(value)
        except ValueError:
            raise SigmaGroupsError(f"{item.strip()!r}: sigma {value!r} is not a number") from None
        SIGMA.check(f"{pattern!r}: sigma", sigma, error=SigmaGroupsError)
        if pattern in (p for p, _ in groups):
            raise SigmaGroupsError(f"{pattern!r} is given twice")
        groups.append((pattern, sigma))
    return groups


def sigma_groups_flag(text: str) -> str:
    """argparse type of --nso-sigma-groups: the spec as given, once its syntax is checked."""
    try:
        parse_sigma_groups(text)
    except SigmaGroupsError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: must be pattern=sigma,... ({error})") from None
    return text


def matches(pattern: str, name: str) -> bool:
    """A pattern names a tower (visual, text, other: `layout.tower_of`, so 'text' is the whole
    text tower, whose OpenCLIP names carry no 'text' prefix) or any part of a parameter name
    (substring, which includes a prefix)."""
    return pattern == tower_of(name) or pattern in name


def sigma_per_parameter(names: Sequence[str], groups, default: float) -> List[float]:
    """Each parameter's sigma: that of the first group whose pattern matches its name, else
    `default`. Every group must match at least one parameter."""
    groups = parse_sigma_groups(groups) if isinstance(groups, str) else [(p, float(s)) for p, s in groups]
    sigmas, used = [], set()
    for name in names:
        pattern_sigma = next(((p, s) for p, s in groups if matches(p, name)), None)
        if pattern_sigma is not None:
            used.add(pattern_sigma[0])
        sigmas.append(default if pattern_sigma is None else pattern_sigma[1])
    unused = [p for p, _ in groups if p not in used]
    if unused:
        shown = ", ".join(list(names)[:3])
        raise SigmaGroupsError(f"sigma group {unused[0]!r} matches no trainable parameter (a pattern is a tower, "
                               f"visual/text/other, or part of a name such as {shown}; earlier groups match first)")
    return sigmas


def tensor_wide(noise_scale: str, weights: torch.Tensor) -> bool:
    """Whether the rule needs the norm of the whole tensor (under sharding: one reduction)."""
    return noise_scale == "layer" or (noise_scale == "filter" and weights.ndim < 2)


def sum_of_squares(weights: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weights, dtype=torch.float32).square()


def relative_std(noise_scale: str, weights: torch.Tensor, sum_squares: Optional[torch.Tensor] = None,
                 numel: Optional[int] = None) -> Optional[torch.Tensor]:
    """sigma's multiplier for a tensor's noise, from the snapshot of w: None for absolute and
    element noise (the latter is scaled elementwise, `scale_noise_`); a 0-d tensor
    ||w|| / sqrt(numel) for a tensor-wide norm (`sum_squares` and `numel` of the whole tensor, so
    a shard gets the tensor's value; default: those of `weights`); a column ||w_row|| / sqrt(row
    size) per row of dim 0 for filter noise of a tensor with ndim >= 2 (rows are whole in a dim-0
    shard)."""
    if noise_scale in ("absolute", "element"):
        return None
    if tensor_wide(noise_scale, weights):
        total = sum_of_squares(weights) if sum_squares is None else sum_squares
        return (total.sqrt() / math.sqrt(numel or weights.numel())).to(weights.dtype)
    rows = weights.flatten(1)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32) / math.sqrt(rows.shape[1])
    return norms.to(weights.dtype).view(-1, *[1] * (weights.ndim - 1))


def scale_noise_(noise: torch.Tensor, weights: torch.Tensor, noise_scale: str, eta: float,
                 std: Optional[torch.Tensor]) -> torch.Tensor:
    """Unit-relative noise (std sigma) -> the rule's noise: times `std` (per row or per tensor), or
    times |w| + eta elementwise (one temporary the size of the tensor)."""
    if noise_scale == "element":
        noise.mul_(weights.abs().add_(eta))
    elif std is not None:
        noise.mul_(std)
    return noise


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

    `noise_scale`: "absolute" (std sigma), "filter" (each row of dim 0 of a tensor with ndim >= 2:
    sigma ||w_row|| / sqrt(row size); 1-d tensors: as layer), "layer" (sigma ||w|| / sqrt(numel)),
    "element" (sigma (|w| + noise_eta)); norms from the snapshot of w. `reduce` sums the per-tensor
    sums of squares over the ranks that hold shards of the same tensors (None: the layout's, `parallel.Layout.sum_over_shards`).
    `sigma_groups`: 'pattern=sigma,...' or [(pattern, sigma), ...] over parameter names (pass named
    parameters, e.g. `model.named_parameters()`); first match wins, the rest get `sigma`.
    `every` N and `start_step` S: steps t >= S with (t - S) % N == 0 are perturbed, the others are
    plain base-optimizer steps from one pass at w. `model`: the module whose BatchNorm running
    statistics must stay those of w (default `ddp_model`; see `PerturbedOptimizer`).
    """

    def __init__(self, params, base_optimizer, *, sigma: float, num_perturbs: int = 1, two_point: bool = True,
                 lam: float = 0.0, distribution: str = "normal", seed: int = 0, ddp_model=None,
                 sigma_schedule: str = "constant", sigma_ramp_steps: int = 0,
                 perturb: Union[str, Callable[[torch.Tensor], bool]] = "all", noise_scale: str = "absolute",
                 noise_eta: float = 0.01, sigma_groups=None, every: int = 1, start_step: int = 0,
                 reduce: Optional[Reduce] = None, model: Optional[torch.nn.Module] = None, **base_optimizer_kwargs):
        SIGMA.check("NSO: sigma", sigma)
        NUM_PERTURBS.check("NSO: num_perturbs", num_perturbs)
        LAM.check("NSO: lam", lam)
        SIGMA_RAMP_STEPS.check("NSO: sigma_ramp_steps", sigma_ramp_steps)
        NOISE_ETA.check("NSO: noise_eta", noise_eta)
        EVERY.check("NSO: every", every)
        START_STEP.check("NSO: start_step", start_step)
        if noise_scale not in NOISE_SCALES:
            raise ValueError(f"NSO: unknown noise_scale {noise_scale!r} (choose from {', '.join(NOISE_SCALES)})")
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
        super().__init__(params, base_optimizer, ddp_model, base_optimizer_kwargs, model=model)
        self.sigma = float(sigma)
        self.num_perturbs = int(num_perturbs)
        self.two_point = bool(two_point)
        self.lam = float(lam)
        self.distribution = distribution
        self.seed = int(seed)
        self.sigma_schedule = sigma_schedule
        self.sigma_ramp_steps = int(sigma_ramp_steps)
        self.perturbs = {"all": lambda p: True, "weights": perturb_weights_only}.get(perturb, perturb)
        self.noise_scale = noise_scale
        self.noise_eta = float(noise_eta)
        self.every = int(every)
        self.start_step = int(start_step)
        self.reduce = reduce if reduce is not None else self.layout.sum_over_shards
        self.sigma_groups = sigma_groups
        self.tensor_sigmas = self._tensor_sigmas()
        self.step_count = 0
        self._streams = Streams()
        self._stds = []

    def _tensor_sigmas(self) -> List[float]:
        """sigma of every tensor in the groups, by the index the noise stream uses."""
        count = sum(len(group["params"]) for group in self.param_groups)
        sigma_groups = self.sigma_groups
        if not sigma_groups:
            return [self.sigma] * count
        if any("param_names" not in group for group in self.param_groups):
            raise ValueError("NSO: sigma_groups match parameter names: pass named parameters "
                             "(model.named_parameters(), or groups whose params are (name, param) pairs)")
        names = [name for group in self.param_groups for name in group["param_names"]]
        trainable = [i for i, p in enumerate(p for group in self.param_groups for p in group["params"])
                     if p.requires_grad]
        sigmas = [self.sigma] * count
        for index, sigma in zip(trainable, sigma_per_parameter([names[i] for i in trainable], sigma_groups,
                                                                self.sigma)):
            sigmas[index] = sigma
        return sigmas

    def ramp(self, step: int) -> float:
        """The sigma schedule's factor at `step`: 1 when constant or past the ramp."""
        if self.sigma_schedule == "constant":
            return 1.0
        progress = min(1.0, (step + 1) / self.sigma_ramp_steps)
        if self.sigma_schedule == "linear":
            return progress
        return EXP_RAMP_START ** (1.0 - progress)

    def sigma_at(self, step: int) -> float:
        return self.sigma * self.ramp(step)

    def perturbs_at(self, step: int) -> bool:
        """Whether step `step` (0-based) is a perturbed step (--nso-every, --nso-start-step)."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0

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
    def _noise_stds(self, numels: List[int]) -> List[Optional[torch.Tensor]]:
        """Per tensor, sigma's multiplier from the snapshot of w (`relative_std`), once per step:
        both points of a pair and every perturbation share it. The tensor-wide sums of squares of
        the local parts go through `reduce` together, one call per step; `numels` are the whole
        tensors' sizes."""
        wide = [j for j, weights in enumerate(self._snapshot) if tensor_wide(self.noise_scale, weights)]
        sums = [sum_of_squares(self._snapshot[j]) for j in wide]
        if sums:
            sums = self.reduce(sums)
        tensor_sums = dict(zip(wide, sums))
        return [relative_std(self.noise_scale, weights, tensor_sums.get(j), numels[j])
                for j, weights in enumerate(self._snapshot)]

    @torch.no_grad()
    def _move_to_noisy_point(self, indexed_params, perturbation: int, ramp: float) -> None:
        """w + e_i: noise drawn straight into each parameter, scaled by its rule, then the snapshot
        added. The noise of parameter j is the stream (seed, step, i, j), independent of the
        other tensors; a rank draws the slice of it that its local part of the parameter covers."""
        for (index, param), weights, std in zip(indexed_params, self._snapshot, self._stds):
            draw = noise_draw(self.distribution, self.tensor_sigmas[index] * ramp)
            view = local_view(param)
            self._streams.fill_(view.tensor, (self.seed, self.step_count, perturbation, index), draw,
                                view.start, view.numel)
            scale_noise_(view.tensor, weights, self.noise_scale, self.noise_eta, std).add_(weights)

    @torch.no_grad()
    def _reflect_through_snapshot(self, params) -> None:
        """(w + e) -> w - e, as (w + e) + 2 (w - (w + e)): no second draw, no noise buffer."""
        if params:  # none when every sigma is 0
            torch._foreach_lerp_(params, self._snapshot, 2.0)

    def step(self, closure, *, grad_scaler=None, max_grad_norm: Optional[float] = None) -> torch.Tensor:
        if closure is None:
            raise ValueError("NSO.step needs a closure that runs forward + backward and returns the loss")
        if not self.perturbs_at(self.step_count):
            return self._plain_step(closure, grad_scaler, max_grad_norm)
        if len(self.tensor_sigmas) != sum(len(group["params"]) for group in self.param_groups):
            self.tensor_sigmas = self._tensor_sigmas()  # a parameter group was added
        indexed = [(index, p) for index, p in self._trainable()
                   if self.perturbs(p) and self.tensor_sigmas[index] > 0]
        perturbed = [view.tensor for view in self.layout.local_views([p for _, p in indexed])]
        ramp = self.ramp(self.step_count)
        perturbed_passes = self.perturbed_passes
        passes_left = (self.lam > 0) + perturbed_passes
        perturbed_weight = (1.0 - self.lam) / perturbed_passes if perturbed_passes else 0.0
        self.zero_grad(set_to_none=True)
        self._stats = {"sigma": self.sigma * ramp}

        if self.lam > 0:
            passes_left -= 1
            clean_loss = self._run_pass(closure, sync=passes_left == 0, at_w=True)
            self._stats["clean_loss"] = clean_loss
            # .grad now holds lam * grad L(w) / perturbed_weight, so that one final scaling by
            # perturbed_weight gives the weighted sum without a separate accumulator.
            if perturbed_passes:
                self._scale_grads(self.lam / perturbed_weight)
        elif self._tracked_batch_norms():
            # No pass at w this step: BatchNorm statistics come from a forward at w (no gradient).
            self._stats["clean_loss"] = self._run_statistics_pass(closure)
        losses = []
        if perturbed_passes:
            self._take_snapshot(perturbed)
            self._stds = self._noise_stds([p.numel() for _, p in indexed])
            cuda_devices = self._cuda_devices(perturbed)
            for perturbation in range(self.num_perturbs):
                self._move_to_noisy_point(indexed, perturbation, ramp)
                rng = capture_rng(cuda_devices) if self.two_point else None
                passes_left -= 1
                losses.append(self._run_pass(closure, sync=passes_left == 0, at_w=False))
                if self.two_point:
                    self._reflect_through_snapshot(perturbed)
                    restore_rng(rng)  # dropout masks repeat, so the pair stays antithetic
                    passes_left -= 1
                    losses.append(self._run_pass(closure, sync=passes_left == 0, at_w=False))
            self._restore_snapshot(perturbed)
            self._stds = []
            self._scale_grads(perturbed_weight)
            loss = torch.stack(losses).mean()
            self._stats["perturbed_loss"] = loss
        else:
            loss = clean_loss
        self.step_count += 1
        self._apply(grad_scaler, max_grad_norm, perturbed=True)
        return loss

    def _plain_step(self, closure, grad_scaler, max_grad_norm) -> torch.Tensor:
        """A base-optimizer step from one pass at w (outside --nso-every / before --nso-start-step)."""
        self.zero_grad(set_to_none=True)
        loss = self._run_pass(closure, sync=True, at_w=True)
        self._stats = {"clean_loss": loss}
        self.step_count += 1
        self._apply(grad_scaler, max_grad_norm, perturbed=False)
        return loss
