"""The contrastive objective: OpenCLIP's ClipLoss or SigLipLoss, wired to this process's rank.

`loss_fn(model, batch)` is the one signature the training step, the Hessian evaluator and the
benchmarks share, so all of them measure exactly the loss that training minimises."""
import open_clip
import torch

from .distributed import World


def create_loss(args, world: World) -> torch.nn.Module:
    if args.siglip:
        return open_clip.SigLipLoss(rank=world.rank, world_size=world.world_size)
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
