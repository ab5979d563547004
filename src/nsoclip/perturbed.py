"""The base of the optimizers that form their gradient from passes at perturbed weights (NSO,
SAM): a `torch.optim` optimizer whose `step(closure)` runs the passes and ends in the shared
update, with `param_groups` and `state` shared with the base optimizer (davda54/sam's contract),
so LR schedules, `zero_grad` and checkpoints treat it like the base optimizer.

Where the weights live is `nsoclip.parallel`'s business: `ddp_model` (None, a DDP module, the
root of fully_shard, a `parallel.Layout`, or any object with a `no_sync()` context manager) gives
the `no_sync()` of the passes that only accumulate gradients and the local part of each parameter,
which is all these optimizers read and write (their snapshot holds the local parts only).

BatchNorm: the running statistics stay those of w. Passes at perturbed weights run with
BatchNorm in training mode (normalising with their own batch statistics, as any training pass)
but leave the running statistics exactly as they were; only passes at w update them: a clean
pass, SAM's ascent pass, a plain step, or, when a step has no pass at w (NSO with lam = 0), a
forward-only pass at w, `closure(backward=False)`."""
import contextlib
import dataclasses
from typing import List, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .parallel import as_layout, local_tensor
from .update import apply_update


def tracked_batch_norms(model: Optional[torch.nn.Module]) -> List[_BatchNorm]:
    """The BatchNorm layers whose next training-mode forward would update running statistics."""
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


@contextlib.contextmanager
def running_statistics_kept(batch_norms: List[_BatchNorm]):
    """Passes inside leave running_mean, running_var and num_batches_tracked bit for bit as they
    were (also when a pass raises, or its batch statistics are NaN)."""
    buffers = [b for m in batch_norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)
               if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class PerturbedOptimizer(torch.optim.Optimizer):
    """A base optimizer's update from a gradient this optimizer assembles from its own passes
    at perturbed weights. Shares `param_groups` and `state` with the base optimizer, so LR
    schedulers, `zero_grad` and checkpoints treat it like the base optimizer. `model` (default:
    `ddp_model`) is the module whose BatchNorm statistics are kept those of w (module docstring)."""

    runs_closure = True

    def __init__(self, params, base_optimizer, ddp_model, base_kwargs, model=None):
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise ValueError(f"{type(self).__name__}: base_optimizer must be an optimizer class such as "
                             f"torch.optim.AdamW (its arguments go as keywords), got {base_optimizer!r}")
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._share_base_state()
        self.ddp_model = ddp_model
        self.layout = as_layout(ddp_model)
        self.model = model if model is not None else self.layout.model
        self.last_update = None
        self._stats = {}
        self._snapshot = []

    def _share_base_state(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    def add_param_group(self, param_group) -> None:
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)  # the shared list grows for both
        else:
            super().add_param_group(param_group)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base_state()  # torch rebuilds param_groups and state on load

    @property
    def step_stats(self) -> dict:
        """This step's statistics as they are: losses stay tensors on the device (no sync), so
        the training loop can average them over its log window and the ranks like the loss."""
        return dict(self._stats)

    @property
    def last_stats(self) -> dict:
        """Floats for logging, converted only when asked (each conversion syncs a GPU)."""
        stats = {name: float(value) for name, value in self._stats.items()}
        if self.last_update is not None:
            stats["grad_norm"] = float(self.last_update.grad_norm)
        return stats

    def _trainable(self):
        """(index, param) for every trainable tensor; the index counts all tensors in the groups,
        so freezing or excluding one never renumbers the others."""
        params = (p for group in self.param_groups for p in group["params"])
        return [(index, p) for index, p in enumerate(params) if p.requires_grad]

    def _tracked_batch_norms(self) -> List[_BatchNorm]:
        return tracked_batch_norms(self.model)

    def _run_pass(self, closure, sync: bool, at_w: bool) -> torch.Tensor:
        """One forward + backward; without `sync` it runs entirely (forward included) inside the
        layout's no_sync, so gradients only accumulate locally. A pass away from w leaves the
        BatchNorm running statistics untouched."""
        frozen = contextlib.nullcontext() if at_w else running_statistics_kept(self._tracked_batch_norms())
        with frozen, (contextlib.nullcontext() if sync else self.layout.no_sync()):
            loss = closure()
        return loss.detach()

    def _run_statistics_pass(self, closure) -> torch.Tensor:
        """A forward at w without gradient, for the BatchNorm statistics of a step that has no
        other pass at w; returns the loss at w."""
        return closure(backward=False).detach()

    @torch.no_grad()
    def _take_snapshot(self, params) -> None:
        """Copy w (the local parts `params`) into the one extra buffer, reused from step to step."""
        if [(p.shape, p.dtype, p.device) for p in params] != [(s.shape, s.dtype, s.device) for s in self._snapshot]:
            self._snapshot = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        if params:
            torch._foreach_copy_(self._snapshot, params)

    @torch.no_grad()
    def _restore_snapshot(self, params) -> None:
        if params:
            torch._foreach_copy_(params, self._snapshot)

    @torch.no_grad()
    def _scale_grads(self, factor: float) -> None:
        grads = [local_tensor(p.grad) for _, p in self._trainable() if p.grad is not None]
        if grads and factor != 1.0:
            torch._foreach_mul_(grads, factor)

    @staticmethod
    def _cuda_devices(params):
        """Devices whose RNG the passes draw from: the parameters', and the current GPU (where the
        forward runs when FSDP2 keeps the shards on the CPU)."""
        devices = {p.device for p in params if p.device.type == "cuda"}
        if torch.cuda.is_initialized():
            devices.add(torch.device("cuda", torch.cuda.current_device()))
        return sorted(devices, key=str)

    def _apply(self, grad_scaler, max_grad_norm, perturbed: bool):
        self.last_update = dataclasses.replace(apply_update(self.base_optimizer, grad_scaler, max_grad_norm),
                                               perturbed=perturbed)
