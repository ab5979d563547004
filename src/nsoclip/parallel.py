"""How the model is laid out over the ranks: one process, or DDP (every rank holds the whole model
and gradients are all-reduced in backward). The loop, the optimizers and the evaluators ask this
layer for the module to call and for the bare open_clip model; they never branch on the layout."""
from typing import Optional

import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from .distributed import World


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare open_clip model inside DDP's wrapper (`.module`) and torch.compile's (`_orig_mod`,
    which also prefixes parameter names), nested in either order; or the model itself."""
    while isinstance(model, (DistributedDataParallel, OptimizedModule)):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def distribute(model: torch.nn.Module, world: World, static_graph: bool = False) -> Optional[DistributedDataParallel]:
    """The DDP wrapper that reduces gradients over the ranks; None on one process."""
    if not world.distributed:
        return None
    return DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None,
                                   static_graph=static_graph)
