"""The training objective: OpenCLIP's ClipLoss, SigLipLoss or (for CoCa models) its captioning
plus contrastive loss, wired to this process's rank.

`loss_fn(model, batch)` is the one signature the training step, the Hessian evaluator and the
benchmarks share, so all of them measure exactly the loss that training minimises. Every loss
here returns one scalar."""
import warnings

import open_clip
import torch
from open_clip.loss import CoCaLoss, SigLipLoss

from .distributed import World
from .errors import NsoclipError

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip's SigLipLoss(dist_impl=...)

# open_clip's ClipLoss gathers features with torch.distributed.nn.all_gather, which torch 2.14
# marks deprecated: four warnings per rank about open_clip's code, nothing a user can change.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)


class LossError(NsoclipError, ValueError):
    """The model's outputs do not fit the loss the flags ask for."""


class CoCaObjective(torch.nn.Module):
    """OpenCLIP's CoCa loss, --coca-contrastive-loss-weight x contrastive + --coca-caption-loss-weight
    x captioning, as one scalar: the sum OpenCLIP backpropagates."""

    def __init__(self, **coca_loss_kwargs):
        super().__init__()
        self.parts = CoCaLoss(**coca_loss_kwargs)

    def forward(self, **outputs):
        return sum(self.parts(**outputs, output_dict=True).values())


def create_loss(args, world: World, model: torch.nn.Module) -> torch.nn.Module:
    """The loss for `model` (the bare open_clip model) and the loss flags on `args`; a model
    whose outputs that loss cannot take is refused here, before anything runs."""
    is_coca = isinstance(model, open_clip.CoCa)
    if is_coca:
        if args.siglip:
            raise LossError(f"--siglip: --model {args.model} is a CoCa model, which trains with its own "
                            "captioning + contrastive loss (drop --siglip)")
        return CoCaObjective(caption_loss_weight=args.coca_caption_loss_weight,
                             clip_loss_weight=args.coca_contrastive_loss_weight, local_loss=args.local_loss,
                             gather_with_grad=args.gather_with_grad, cache_labels=True, rank=world.rank,
                             world_size=world.world_size)
    if args.siglip:
        return SigLipLoss(rank=world.rank, world_size=world.world_size, dist_impl=args.loss_dist_impl)
    if getattr(model, "logit_bias", None) is not None:
        raise LossError(f"--model {args.model} has a logit_bias (a SigLIP model), which the CLIP loss has no "
                        "place for: add --siglip")
    return open_clip.ClipLoss(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=world.rank,
        world_size=world.world_size,
    )


def contrastive_loss_fn(loss: torch.nn.Module):
    """(model, (images, texts)) -> scalar loss, for any model built with output_dict=True."""

    def loss_fn(model, batch):
        images, texts = batch
        return loss(**model(images, texts))

    return loss_fn
