"""How the model is laid out over the ranks: one process, or DDP (every rank holds the whole model
and gradients are all-reduced in backward), with BatchNorm synchronised over the ranks on request
(--use-bn-sync). The loop, the optimizers and the evaluators ask this layer for the module to call
and for the bare open_clip model; they never branch on the layout."""
import logging
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .distributed import World
from .errors import NsoclipError

# Where torch's SyncBatchNorm runs (its forward refuses CPU tensors).
SYNC_BATCHNORM_DEVICES = ("cuda", "xpu", "hpu")


class LayoutError(NsoclipError, ValueError):
    """The requested layout cannot run on this launch."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare open_clip model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_layout(world: World, sync_batchnorm: bool) -> None:
    """What can be known before the model exists: SyncBatchNorm needs GPUs when distributed."""
    if sync_batchnorm and world.distributed and world.device.type not in SYNC_BATCHNORM_DEVICES:
        raise LayoutError(f"--use-bn-sync: torch's SyncBatchNorm runs on GPUs only, not on {world.device.type} "
                          f"(drop the flag: each rank then normalises with its own batch's statistics)")


def distribute(model: torch.nn.Module, world: World, static_graph: bool = False,
               sync_batchnorm: bool = False) -> Optional[DistributedDataParallel]:
    """The DDP wrapper that reduces gradients over the ranks; None on one process. With
    `sync_batchnorm` the BatchNorm layers of `model` are replaced in place by SyncBatchNorm
    sharing their parameters and statistics (as OpenCLIP does, only when distributed: on one
    process both are the same)."""
    if not world.distributed:
        return None
    check_layout(world, sync_batchnorm)
    if sync_batchnorm:
        if not has_batchnorm(model):
            logging.info("--use-bn-sync: --model has no BatchNorm layers, nothing to synchronise")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same CLIP object, children replaced
    return DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None,
                                   static_graph=static_graph)
