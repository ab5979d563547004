"""How the model is laid out over the ranks, known in this module only: one process, DDP (every
rank holds the whole model, gradients are all-reduced in backward) or FSDP2 (`fully_shard`: every
rank holds 1/N of each parameter, gradient and optimizer state; each residual block gathers its
parameters for its forward and backward and reduce-scatters its gradients), with BatchNorm
synchronised over DDP's ranks on request (--use-bn-sync).

The loop, the optimizers, the checkpoints and the evaluators ask a `Layout` for what they need,
never branching on the layout: the module the closure calls, a `no_sync()` for passes that only
accumulate gradients, the local part of each parameter with its place in the full tensor (so
noise can be drawn for exactly the elements a rank holds), a norm over all ranks' shards, a
context for evaluation, and full or sharded state dicts for checkpoints."""
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from open_clip.modified_resnet import Bottleneck
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.parallel import DistributedDataParallel

from .distributed import World
from .errors import NsoclipError

# Where torch's SyncBatchNorm runs (its forward refuses CPU tensors).
SYNC_BATCHNORM_DEVICES = ("cuda", "xpu", "hpu")


class LayoutError(NsoclipError, ValueError):
    """The requested layout cannot run on this launch."""

# When FSDP2 reduce-scatters gradients: after every backward (each NSO/SAM pass, each
# --accum-freq micro-batch), keeping gradients sharded; or once per step, accumulating unsharded
# gradients (P per rank) in between, as DDP's no_sync does.
GRAD_REDUCES = ("pass", "step")
# --precision modes FSDP2 honours: fp16 loss scaling would need a found-inf agreed over shards,
# and OpenCLIP's bf16/fp16 modes mix dtypes within a block, which one all-gather cannot carry.
FSDP_PRECISIONS = ("fp32", "amp_bf16", "amp_bfloat16", "pure_bf16")
RESIDUAL_BLOCKS = (ResidualAttentionBlock, CustomResidualAttentionBlock, Bottleneck)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare open_clip model inside DDP's wrapper (`.module`) and torch.compile's (`_orig_mod`,
    which also prefixes parameter names), nested in either order; or the model itself (fully_shard
    and per-block compile keep it)."""
    while isinstance(model, (DistributedDataParallel, OptimizedModule)):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's elements of a tensor (a view of its storage: writing it writes the tensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor; for a sharded one a collective every rank must join."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class LocalView:
    """The elements of a parameter this rank holds: `tensor` (writable, a view of the parameter's
    storage) is elements [start, start + tensor.numel()) of the parameter flattened in row-major
    order, whose full size is `numel`."""
    tensor: torch.Tensor
    start: int
    numel: int


def local_rows(tensor: torch.Tensor):
    """[first, last) rows of dim 0 held here. DTensor's Shard(0) splits like torch.chunk
    (ceil(n / k) rows per rank, the last ranks fewer or none); nested Shard(0) placements (HSDP,
    2-D meshes) split the range again; Replicate keeps it."""
    rows = tensor.shape[0] if tensor.ndim else 1
    if not isinstance(tensor, DTensor):
        return 0, rows
    first, last = 0, rows
    coordinate = tensor.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if not (isinstance(placement, Shard) and placement.dim == 0):
            raise NotImplementedError(f"parameter placement {placement}: only Shard(0) and Replicate are laid out")
        size = last - first
        chunk = math.ceil(size / tensor.device_mesh.size(mesh_dim)) if size else 0
        start = min(coordinate[mesh_dim] * chunk, size)
        first, last = first + start, first + min(start + chunk, size)
    return first, last


def local_view(param: torch.Tensor) -> LocalView:
    first, _ = local_rows(param)
    row = math.prod(param.shape[1:]) if param.ndim else 1
    return LocalView(tensor=local_tensor(param.detach()), start=first * row, numel=param.numel())


class Layout:
    """One process or DDP: every rank holds every parameter whole. `no_sync` is DDP's (nothing on
    one process); `forward_model` is what the training closure calls."""

    sharded = False  # parameters are split over the ranks: a rank cannot evaluate weights of its own

    def __init__(self, model: Optional[torch.nn.Module], forward_model=None, no_sync=None):
        self.model = model
        self.forward_model = forward_model if forward_model is not None else model
        self._no_sync = no_sync

    def no_sync(self):
        """Gradients of the passes inside only accumulate; the next pass outside reduces them all."""
        return self._no_sync() if self._no_sync is not None else contextlib.nullcontext()

    def local_views(self, params: Sequence[torch.Tensor]) -> List[LocalView]:
        """What this rank holds of each parameter, ready to be written: the next forward sees the edits."""
        return [local_view(p) for p in params]

    def total_norm(self, local_norms: List[torch.Tensor]) -> torch.Tensor:
        """The 2-norm over all elements of all ranks from per-tensor norms of the local elements."""
        return torch.linalg.vector_norm(torch.stack(local_norms))

    def sum_over_shards(self, local_sums: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per tensor, the sum over every rank holding a part of it of per-rank partial sums."""
        return local_sums

    def evaluation(self):
        """Around forwards that ranks run in different numbers (each scores its own share)."""
        return contextlib.nullcontext()

    def model_state_dict(self) -> dict:
        """The bare model's state dict with OpenCLIP's keys and shapes; every rank calls it, rank 0's
        is the one to save."""
        return self.model.state_dict()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() with whole tensors in the bare parameters' shapes."""
        return optimizer.state_dict()

    def sharded_state_dicts(self, optimizer: torch.optim.Optimizer):
        """(model, optimizer) state dicts holding this rank's shards, for torch.distributed.checkpoint."""
        return self.model.state_dict(), optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        """Load whole (or already placed) optimizer state; a value with as many elements as its
        parameter takes the parameter's shape and placement (0-d logit_scale is [1] under FSDP2)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {index: {name: self.place(params[int(index)], value) if name != "step" else value
                         for name, value in entry.items()}
                 for index, entry in state_dict["state"].items()}
        optimizer.load_state_dict({**state_dict, "state": state})

    def place(self, param: torch.Tensor, value):
        """A whole state value laid out like `param` (torch.optim's rule: 'step' is never param-shaped)."""
        if not isinstance(value, torch.Tensor) or isinstance(value, DTensor) or value.numel() != param.numel():
            return value
        return value.reshape(param.shape)

    def empty_like_saved(self, param: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        """A target for loading a saved state value of `shape` belonging to `param`."""
        return torch.empty(tuple(shape), dtype=dtype, device=param.device if len(shape) else "cpu")


class Sharded(Layout):
    """FSDP2 over a 1-D device mesh of all ranks (`shard` builds it)."""

    sharded = True

    def __init__(self, model: torch.nn.Module, grad_reduce: str = "pass", scalar_names: Sequence[str] = (),
                 reshard_after_forward: bool = True):
        if not isinstance(model, FSDPModule):
            raise ValueError("Sharded: the model must be the root module fully_shard was applied to")
        if grad_reduce not in GRAD_REDUCES:
            raise ValueError(f"Sharded: grad_reduce {grad_reduce!r} (choose from {', '.join(GRAD_REDUCES)})")
        super().__init__(model)
        self.grad_reduce = grad_reduce
        self.scalar_names = set(scalar_names)
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self._reshard_after_forward = {id(unit): reshard_after_forward and unit is not model for unit in self.units}
        self._scalars = {id(p) for name, p in model.named_parameters() if name in self.scalar_names}
        self._group = next(p.device_mesh.get_group() for p in model.parameters() if isinstance(p, DTensor))
        self._no_sync_depth = 0

    @contextlib.contextmanager
    def no_sync(self):
        """grad_reduce 'step': FSDP2's set_requires_gradient_sync(False) (nestable); 'pass': nothing,
        every backward reduce-scatters and gradients stay sharded."""
        if self.grad_reduce == "pass":
            yield
            return
        self._no_sync_depth += 1
        if self._no_sync_depth == 1:
            self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._no_sync_depth -= 1
            if self._no_sync_depth == 0:
                self.model.set_requires_gradient_sync(True)

    def reshard(self) -> None:
        """Drop gathered parameters: the root keeps its own after a forward without backward, and
        edits of the shards would not reach the next forward until it is resharded."""
        for unit in self.units:
            unit.reshard()

    def local_views(self, params):
        self.reshard()
        return super().local_views(params)

    def total_norm(self, local_norms):
        squares = torch.stack(local_norms).square().sum()
        dist.all_reduce(squares, group=self._group)  # one scalar over the mesh the shards live on
        return squares.sqrt()

    def sum_over_shards(self, local_sums):
        sums = torch.stack(local_sums)
        dist.all_reduce(sums, group=self._group)  # one call for all tensors
        return list(sums.unbind())

    @contextlib.contextmanager
    def evaluation(self):
        """Every unit gathered once and kept: the evaluators' forwards then need no collective, so
        ranks scoring different numbers of batches cannot hang (memory: the whole model in the
        parameter dtype, as DDP holds it)."""
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in self.units:
                unit.set_reshard_after_forward(self._reshard_after_forward[id(unit)], recurse=False)
            self.reshard()

    def _export(self, name_or_param, value):
        """A whole CPU copy of a state value (a collective for shards), 0-d again where OpenCLIP's is."""
        if not isinstance(value, torch.Tensor):
            return value
        whole = full_tensor(value.detach())
        scalar = name_or_param in self.scalar_names if isinstance(name_or_param, str) else id(name_or_param) in self._scalars
        if scalar and whole.numel() == 1:
            whole = whole.reshape(())
        return whole.cpu() if dist.get_rank() == 0 else whole.new_empty(0)

    def model_state_dict(self):
        self.reshard()
        return {key: self._export(key, value) for key, value in self.model.state_dict().items()}

    def optimizer_state_dict(self, optimizer):
        saved = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {index: {name: self._export(params[index], value) for name, value in entry.items()}
                 for index, entry in saved["state"].items()}
        return {**saved, "state": state}

    def sharded_state_dicts(self, optimizer):
        self.reshard()
        return self.model.state_dict(), optimizer.state_dict()

    def place(self, param, value):
        if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or isinstance(value, DTensor) \
                or value.numel() != param.numel():
            return super().place(param, value)
        first, last = local_rows(param)
        local = local_tensor(param)
        rows = value.reshape(param.shape)[first:last]
        return DTensor.from_local(rows.to(dtype=local.dtype, device=local.device, copy=True), param.device_mesh,
                                  param.placements, run_check=False, shape=param.shape, stride=param.stride())

    def empty_like_saved(self, param, shape, dtype):
        if isinstance(param, DTensor) and tuple(shape) == tuple(param.shape):
            local = local_tensor(param)
            return DTensor.from_local(torch.empty(local.shape, dtype=dtype, device=local.device), param.device_mesh,
                                      param.placements, run_check=False, shape=param.shape, stride=param.stride())
        return super().empty_like_saved(param, shape, dtype)


def as_layout(ddp_model) -> Layout:
    """What the optimizers accept as `ddp_model`: None (one process), a DDP module, the root module
    of fully_shard, a Layout, or any object with a `no_sync()` context manager."""
    if isinstance(ddp_model, Layout):
        return ddp_model
    if ddp_model is None:
        return Layout(None)
    if isinstance(ddp_model, DistributedDataParallel):
        return Layout(ddp_model.module, ddp_model, ddp_model.no_sync)
    if isinstance(ddp_model, FSDPModule):
        return Sharded(ddp_model)
    if not callable(getattr(ddp_model, "no_sync", None)):
        raise ValueError(f"ddp_model {type(ddp_model).__name__}: expected None, a DDP or fully_shard module, "
                         "a nsoclip.parallel.Layout or an object with a no_sync() context manager")
    return Layout(None, ddp_model, ddp_model.no_sync)


@dataclass
class ShardingOptions:
    """The --fsdp-* flags."""
    precision: str = "fp32"
    offload_cpu: bool = False
    reshard_after_forward: bool = True
    grad_reduce: str = "pass"


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """--precision as FSDP2's policy. amp_bf16: bf16 all-gathers and compute (autocast still runs,
    as under DDP), fp32 sharded master weights and fp32 gradient reduction; pure_bf16: the weights
    are bf16 already, gradients are reduced in fp32; fp32: no casts."""
    if precision not in FSDP_PRECISIONS:
        raise ValueError(f"--precision {precision}: FSDP2 supports {', '.join(FSDP_PRECISIONS)}")
    if precision in ("amp_bf16", "amp_bfloat16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "pure_bf16":
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def vectorize_scalars(model: torch.nn.Module) -> List[str]:
    """fully_shard refuses 0-d parameters (logit_scale): make them [1] in place (same position in
    named_parameters, so optimizer indices and noise streams do not move); the names are returned
    so full state dicts can give them back OpenCLIP's shape."""
    names = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(module, name, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def shard(model: torch.nn.Module, world: World, options: ShardingOptions, compile: Optional[dict] = None) -> Sharded:
    """fully_shard over all ranks: one unit per residual block of each tower, then the root (the
    embeddings, norms, projections and logit_scale). The root keeps its parameters gathered from
    forward to backward (FSDP2's default for it); the blocks reshard after forward unless
    `options.reshard_after_forward` is off."""
    if not dist.is_initialized():
        # One process: a group of one, so the model is laid out (and checkpointed) as on N ranks.
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    mesh = init_device_mesh(world.device.type, (dist.get_world_size(),))
    scalar_names = vectorize_scalars(model)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if options.offload_cpu else OffloadPolicy()
    common = dict(mesh=mesh, mp_policy=mixed_precision(options.precision), offload_policy=offload)
    blocks = [m for m in model.modules() if isinstance(m, RESIDUAL_BLOCKS)]
    if not blocks:
        logging.warning("--fsdp: %s has no residual blocks to shard one by one; the whole model is one unit",
                        type(model).__name__)
    if compile is not None:
        logging.info("Compiling each of %d residual blocks (torch.compile, backend %s, mode %s)", len(blocks),
                     compile["backend"], compile.get("mode") or "default")
    for block in blocks:
        if compile is not None:
            block.compile(**compile)
        fully_shard(block, reshard_after_forward=options.reshard_after_forward, **common)
    fully_shard(model, reshard_after_forward=False, **common)
    # FSDP2 settles which unit is the root at the first forward through it; zero-shot calls
    # encode_text / encode_image, which enter the blocks first. Settle it now (what that forward
    # would do; no collective). Not registering them as forward methods is deliberate: a method
    # called inside the root's forward makes the root reshard after it, also during evaluation.
    model._get_fsdp_state()._lazy_init()
    return Sharded(model, options.grad_reduce, scalar_names, options.reshard_after_forward)


def compiled(module: torch.nn.Module, options: Optional[dict]) -> torch.nn.Module:
    """torch.compile(module, **options), or the module itself without options."""
    if options is None:
        return module
    if isinstance(module, DistributedDataParallel) and any(getattr(m, "grad_checkpointing", False)
                                                           for m in module.modules()):
        # As OpenCLIP, whose users saw compile + checkpointing break (OpenCLIP issue 726): no graph
        # split at DDP's buckets, which costs only the overlap of all-reduce and backward.
        torch._dynamo.config.optimize_ddp = False
    logging.info("Compiling %s (torch.compile, backend %s, mode %s)", type(module).__name__, options["backend"],
                 options.get("mode") or "default")
    return torch.compile(module, **options)


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_layout(world: World, sync_batchnorm: bool) -> None:
    """What can be known before the model exists: SyncBatchNorm needs GPUs when distributed."""
    if sync_batchnorm and world.distributed and world.device.type not in SYNC_BATCHNORM_DEVICES:
        raise LayoutError(f"--use-bn-sync: torch's SyncBatchNorm runs on GPUs only, not on {world.device.type} "
                          f"(drop the flag: each rank then normalises with its own batch's statistics)")


def distribute(model: torch.nn.Module, world: World, static_graph: bool = False, sync_batchnorm: bool = False,
               sharding: Optional[ShardingOptions] = None, scripted: Optional[torch.nn.Module] = None,
               compile: Optional[dict] = None) -> Layout:
    """The layout of `model` over the ranks: FSDP2 with `sharding`, else DDP when distributed,
    else one process. The training step calls `scripted` (--torchscript, the same parameters)
    when given; checkpoints, evaluation and the Hessian keep the eager, uncompiled `model`. With
    `sync_batchnorm` (DDP) the BatchNorm layers of `model` are replaced in place by SyncBatchNorm
    sharing their parameters and statistics (as OpenCLIP does, only when distributed: on one
    process both are the same).

    `compile` (torch.compile's keyword arguments, --torchcompile) compiles what the closure
    calls: the DDP wrapper, as OpenCLIP does (dynamo splits the graph at DDP's buckets, so the
    all-reduces overlap the backward), or the bare model on one process; under FSDP2 each
    residual block before it is sharded (FSDP2's hooks stay between the graphs)."""
    if sharding is not None:
        return shard(model, world, sharding, compile)
    forward = scripted if scripted is not None else model
    if not world.distributed:
        return Layout(model, compiled(forward, compile))
    check_layout(world, sync_batchnorm)
    if sync_batchnorm:
        if not has_batchnorm(model):
            logging.info("--use-bn-sync: --model has no BatchNorm layers, nothing to synchronise")
        forward = torch.nn.SyncBatchNorm.convert_sync_batchnorm(forward)  # the same CLIP object, children replaced
    ddp = DistributedDataParallel(forward, device_ids=[world.device] if world.device.type == "cuda" else None,
                                  static_graph=static_graph)
    return Layout(model, compiled(ddp, compile), ddp.no_sync)
