"""`python -m nsoclip.bench fsdp`: what sharding buys and costs, on 2 gloo ranks.

For AdamW and NSO (k=1, two-point) under DDP and under FSDP2 (both gradient reductions, see
`--fsdp-grad-reduce`), on a CLIP of tens of millions of parameters:
- per-rank state bytes, measured from the tensors each rank holds: parameters, gradients (FSDP2's
  unsharded accumulated ones included), optimizer state and NSO's snapshot, at their peak over
  the step (sampled after every backward and after the update);
- collectives per step by kind with their bytes (this rank's input), counted at the c10d level
  (torch.distributed.tensor.debug.CommDebugMode sees DTensor's own all-reduces too);
- step times, all arms interleaved, and the NSO / AdamW step-time ratio per layout;
- NSO's noise per rank: the elements it holds, the elements its chunked streams draw (its shard
  plus at most two chunks per tensor) and the time of one perturbation's draw, DDP beside FSDP2.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.debug import CommDebugMode

from ..distributed import World
from ..launch import spawn_local_ranks
from ..model import resolve_model_name
from ..nso import NSO, noise_draw
from ..parallel import ShardingOptions, distribute, local_tensor
from ..rng import Streams
from ..update import take_step

# Wide enough that state dominates: 40 M parameters (19 M of them the 49,408-token table).
BENCH_CONFIG = {
    "embed_dim": 384,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 384, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 6},
}
KINDS = {  # c10d op -> collective kind; FSDP2 uses the *_base_ ops on torch 2.11 and 2.14 alike
    "_allgather_base_": "all_gather_into_tensor", "allgather_into_tensor_coalesced_": "all_gather_into_tensor",
    "all_gather_into_tensor": "all_gather_into_tensor", "all_gather_into_tensor_coalesced": "all_gather_into_tensor",
    "allgather_": "all_gather", "allgather_coalesced_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced_": "reduce_scatter_tensor",
    "reduce_scatter_tensor": "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced": "reduce_scatter_tensor",
    "reduce_scatter_": "reduce_scatter", "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "broadcast_": "broadcast",
    "scatter_": "scatter", "gather_": "gather", "alltoall_": "all_to_all", "alltoall_base_": "all_to_all",
    "all_to_all_single": "all_to_all", "barrier": "barrier",
}
INPUTS = ("input", "input_tensor", "input_tensors", "tensors")


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


class CollectiveCounter(CommDebugMode):
    """Every collective inside the context, eager c10d and functional ones alike, with the bytes
    of this rank's input (`summary()`: {kind: {"count", "bytes"}})."""

    def __enter__(self):
        self.events = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and func._opname in KINDS:
            values = dict(zip((a.name for a in func._schema.arguments), args), **(kwargs or {}))
            nbytes = sum(t.numel() * t.element_size() for name in INPUTS for t in tensors_in(values.get(name)))
            self.events.append((KINDS[func._opname], nbytes))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def summary(self) -> dict:
        out = {}
        for kind, nbytes in self.events:
            entry = out.setdefault(kind, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += nbytes
        return out


def own_params(unit: torch.nn.Module):
    """The parameters a unit shards itself (not those of units nested in it)."""
    nested = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDPModule) for p in m.parameters()}
    return [p for p in unit.parameters() if id(p) not in nested]


def unit_sizes(model: torch.nn.Module, world_size: int):
    """Per FSDP2 unit: bytes one rank sends in its all-gather (each parameter's shard padded to
    ceil(rows / N) rows) and the padded whole it reduce-scatters."""
    units = []
    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        shard = sum(math.ceil((p.shape[0] if p.ndim else 1) / world_size) * (p.numel() // max(p.shape[0], 1))
                    * p.element_size() for p in own_params(unit))
        units.append({"root": unit is model, "shard_bytes": shard, "padded_bytes": world_size * shard,
                      "whole_bytes": sum(p.numel() * p.element_size() for p in own_params(unit))})
    return units


def model_spec(model: str, directory: str) -> str:
    if model != "bench-fsdp":
        return model
    path = Path(directory) / "bench-fsdp.json"
    path.write_text(json.dumps(BENCH_CONFIG))
    return str(path)


def unsharded_grad_bytes(model) -> int:
    """Gradients FSDP2 accumulates whole between reduce-scatters (set_requires_gradient_sync
    False). Read from FSDP2's parameter records (private attributes: a measurement, not a use)."""
    total = 0
    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        for group in unit._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                for grad in (getattr(fsdp_param, "unsharded_accumulated_grad", None),
                             getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None)):
                    if grad is not None:
                        total += grad.numel() * grad.element_size()
    return total


def held_bytes(model, optimizer) -> dict:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    size = lambda t: local_tensor(t).numel() * local_tensor(t).element_size()  # noqa: E731
    state = [v for entry in optimizer.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    return {
        "params": sum(size(p) for p in params),
        "grads": sum(size(p.grad) for p in params if p.grad is not None) + unsharded_grad_bytes(model),
        "optimizer": sum(size(v) for v in state),
        "snapshot": sum(s.numel() * s.element_size() for s in getattr(optimizer, "_snapshot", [])),
    }


def batch(model, rows: int, rank: int):
    generator = torch.Generator().manual_seed(1000 + rank)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    return (torch.randn(rows, 3, size, size, generator=generator),
            torch.randint(0, model.vocab_size, (rows, model.context_length), generator=generator))


class Arm:
    """One optimizer in one layout, with its own model copy, stepping on this rank's batch."""

    def __init__(self, name, spec, world, sharding, nso: bool, rows):
        torch.manual_seed(0)
        model = open_clip.create_model(resolve_model_name(spec), output_dict=True)
        self.name, self.images, self.texts = name, *batch(model, rows, world.rank)
        self.layout = distribute(model, world, sharding=sharding)
        params = [p for p in model.parameters()]
        adamw = dict(lr=1e-4, weight_decay=0.1)
        self.optimizer = NSO(params, torch.optim.AdamW, sigma=0.01, ddp_model=self.layout, **adamw) if nso \
            else torch.optim.AdamW(params, **adamw)
        self.loss = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=world.rank,
                                       world_size=world.world_size)
        self.times, self.peak, self.counts = [], {}, None

    def closure(self):
        loss = self.loss(**self.layout.forward_model(self.images, self.texts))
        loss.backward()
        self.sample()
        return loss

    def sample(self):
        held = held_bytes(self.layout.model, self.optimizer)
        if sum(held.values()) > sum(self.peak.values()):
            self.peak = held

    def step(self, timed=True, count=False):
        dist.barrier()
        start = time.perf_counter()
        if count:
            with CollectiveCounter() as counter:
                take_step(self.optimizer, self.closure)
            self.counts = counter.summary()
        else:
            take_step(self.optimizer, self.closure)
        self.sample()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank is done
        if timed:
            self.times.append(float(elapsed))


def noise_cost(layout, params, repeats: int = 3) -> dict:
    """One perturbation's noise for this rank's part of every parameter, as NSO draws it."""
    streams, draw = Streams(), noise_draw("normal", 0.01)
    views = layout.local_views(params)
    buffers = [torch.empty_like(view.tensor) for view in views]
    drawn = 0
    for view in views:
        chunk = streams.chunk_on(view.tensor.device)
        if view.tensor.numel():
            first, last = view.start // chunk, (view.start + view.tensor.numel() - 1) // chunk
            drawn += sum(min(chunk, view.numel - c * chunk) for c in range(first, last + 1))
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        for index, (view, buffer) in enumerate(zip(views, buffers)):
            streams.fill_(buffer, (0, repeat, 0, index), draw, view.start, view.numel)
        times.append(time.perf_counter() - start)
    return {"local_elements": sum(b.numel() for b in buffers), "drawn_elements": drawn,
            "draw_s": statistics.median(times[1:])}


def worker(rank, world_size, port, spec, steps, rows, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=10))
    world = World(rank=rank, world_size=world_size)
    fsdp = ShardingOptions(grad_reduce="pass")
    arms = [Arm("ddp_adamw", spec, world, None, False, rows), Arm("ddp_nso", spec, world, None, True, rows),
            Arm("fsdp_adamw", spec, world, fsdp, False, rows), Arm("fsdp_nso", spec, world, fsdp, True, rows),
            Arm("fsdp_nso_grad_reduce_step", spec, world, ShardingOptions(grad_reduce="step"), True, rows)]
    for arm in arms:
        arm.step(timed=False)
        arm.step(timed=False, count=True)
    for repeat in range(steps):
        for arm in (arms if repeat % 2 == 0 else arms[::-1]):
            arm.step()
    params = sum(p.numel() for p in arms[0].layout.model.parameters())
    fsdp_units = unit_sizes(arms[2].layout.model, world_size)
    noise = {arm.name: noise_cost(arm.layout, [p for g in arm.optimizer.param_groups for p in g["params"]])
             for arm in (arms[1], arms[3])}
    record = {
        "noise": noise,
        "rank": rank,
        "state_bytes_peak": {arm.name: arm.peak for arm in arms},
        "collectives_per_step": {arm.name: arm.counts for arm in arms},
        "median_step_s": {arm.name: statistics.median(arm.times) for arm in arms},
        "params": params,
        "largest_unit_gathered_bytes": max(u["padded_bytes"] for u in fsdp_units),
    }
    gathered = [None] * world_size
    dist.all_gather_object(gathered, record)
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def summarize(ranks) -> dict:
    first = ranks[0]
    world_size = len(ranks)
    param_bytes = first["params"] * 4
    share = param_bytes / world_size
    peak = {name: max(sum(r["state_bytes_peak"][name].values()) for r in ranks) for name in first["state_bytes_peak"]}
    extra = {name: max(sum(r["state_bytes_peak"][name].values()) - sum(r["state_bytes_peak"][adamw].values())
                       for r in ranks)
             for name, adamw in (("ddp_nso", "ddp_adamw"), ("fsdp_nso", "fsdp_adamw"),
                                 ("fsdp_nso_grad_reduce_step", "fsdp_adamw"))}
    times = first["median_step_s"]
    return {
        "params": first["params"],
        "param_bytes": param_bytes,
        "per_rank_state_bytes_peak": peak,
        "per_rank_state_in_P_over_N": {name: value / share for name, value in peak.items()},
        "nso_extra_state_in_P_over_N": {name: value / share for name, value in extra.items()},
        "fsdp_adamw_state_target_bytes": 1.05 * 4 * share + first["largest_unit_gathered_bytes"],
        "largest_unit_gathered_bytes": first["largest_unit_gathered_bytes"],
        "noise_per_rank": [r["noise"] for r in ranks],
        "per_rank_state_bytes_by_kind_rank0": first["state_bytes_peak"],
        "collectives_per_step_rank0": first["collectives_per_step"],
        "median_step_s": times,
        "step_time_ratio_nso_over_adamw": {
            "ddp": times["ddp_nso"] / times["ddp_adamw"],
            "fsdp": times["fsdp_nso"] / times["fsdp_adamw"],
            "fsdp_grad_reduce_step": times["fsdp_nso_grad_reduce_step"] / times["fsdp_adamw"],
        },
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench fsdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-fsdp",
                        help="OpenCLIP model name or config JSON; 'bench-fsdp' is the 40 M-parameter ViT defined here.")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows per rank.")
    parser.add_argument("--steps", type=int, default=3, help="Timed repeats (each: one step of every arm).")
    return parser.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        spec = model_spec(args.model, directory)
        out = os.path.join(directory, "fsdp.json")
        spawn_local_ranks(worker, 2, spec, args.steps, args.batch_size, out, timeout=3600)
        ranks = json.loads(Path(out).read_text())
    result = {"benchmark": "fsdp", "model": args.model, "world_size": 2, "backend": "gloo", "device": "cpu",
              "batch_size_per_rank": args.batch_size, "steps": args.steps, "threads_per_rank": 1,
              "nso": {"num_perturbs": 1, "two_point": True, "lam": 0.0, "sigma": 0.01}, **summarize(ranks)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
