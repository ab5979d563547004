"""Compute accounting: cumulative forward and backward passes, samples seen and training FLOPs.

Counted from the calls of the step's closure, so the loop learns what any optimizer spent
without knowing how it forms its gradient. A pass is one call: forward and backward over the
step's whole (accumulated) batch, or forward only (`closure(backward=False)`, e.g. NSO's
BatchNorm statistics pass). The FLOPs of each kind of call are measured once per batch shape,
during its first real call (no extra pass), with torch.utils.flop_counter.FlopCounterMode;
later calls of that kind add the same count. Every rank runs the same shapes, so the run's
FLOPs are one rank's times the number of ranks. The counters go into checkpoints: a resumed run
continues them exactly."""
from typing import Callable, Dict, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts the CUDA attention kernels but not the CPU one: the same formulas for it.
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(function: Callable, *args, **kwargs) -> Tuple[object, int]:
    """(function's result, the FLOPs it ran: matrix products, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        result = function(*args, **kwargs)
    return result, counter.get_total_flops()


class ComputeMeter:
    """The run's cumulative counters (`totals`) and the FLOPs measured per kind of closure call."""

    COUNTERS = ("forward_passes", "backward_passes", "samples_seen", "train_flops")

    def __init__(self):
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.flops_per_call: Dict[tuple, int] = {}

    def counting(self, closure: Callable, shapes: tuple, ranks: int) -> Callable:
        """`closure` counted: every call adds a forward pass, a backward pass unless it is
        `closure(backward=False)`, and its FLOPs on all `ranks`, measured on the first call of
        its kind for these batch `shapes`."""
        def counted(backward: bool = True):
            key = (backward, shapes)
            call = closure if backward else (lambda: closure(backward=False))
            if key in self.flops_per_call:
                loss = call()
            else:
                loss, flops = count_flops(call)
                self.flops_per_call[key] = flops * ranks
            self.counts["forward_passes"] += 1
            self.counts["backward_passes"] += int(backward)
            self.counts["train_flops"] += self.flops_per_call[key]
            return loss
        return counted

    def count_samples(self, samples: int) -> None:
        self.counts["samples_seen"] += samples

    def totals(self) -> dict:
        return dict(self.counts)

    def state_dict(self) -> dict:
        return dict(self.counts)

    def load_state_dict(self, state: dict) -> None:
        self.counts = {name: int(state.get(name, 0)) for name in self.COUNTERS}
