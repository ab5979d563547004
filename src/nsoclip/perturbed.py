"""The base of the optimizers that form their gradient from passes at perturbed weights (NSO,
SAM): a `torch.optim` optimizer whose `step(closure)` runs the passes and ends in the shared
update, with `param_groups` and `state` shared with the base optimizer (davda54/sam's contract),
so LR schedules, `zero_grad` and checkpoints treat it like the base optimizer.

Where the weights live is `nsoclip.parallel`'s business: `ddp_model` (None, a DDP module, the
root of fully_shard, a `parallel.Layout`, or any object with a `no_sync()` context manager) gives
the `no_sync()` of the passes that only accumulate gradients and the local part of each parameter,
which is all these optimizers read and write (their snapshot holds the local parts only)."""
import torch

from .parallel import as_layout, local_tensor
from .update import apply_update


class PerturbedOptimizer(torch.optim.Optimizer):
    """A base optimizer's update from a gradient this optimizer assembles from its own passes
    at perturbed weights. Shares `param_groups` and `state` with the base optimizer, so LR
    schedulers, `zero_grad` and checkpoints treat it like the base optimizer."""

    runs_closure = True

    def __init__(self, params, base_optimizer, ddp_model, base_kwargs):
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise ValueError(f"{type(self).__name__}: base_optimizer must be an optimizer class such as "
                             f"torch.optim.AdamW (its arguments go as keywords), got {base_optimizer!r}")
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._share_base_state()
        self.ddp_model = ddp_model
        self.layout = as_layout(ddp_model)
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

    def _run_pass(self, closure, sync: bool) -> torch.Tensor:
        """One forward + backward; without `sync` it runs entirely (forward included) inside the
        layout's no_sync, so gradients only accumulate locally."""
        if sync:
            loss = closure()
        else:
            with self.layout.no_sync():
                loss = closure()
        return loss.detach()

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

    def _apply(self, grad_scaler, max_grad_norm):
        self.last_update = apply_update(self.base_optimizer, grad_scaler, max_grad_norm)
