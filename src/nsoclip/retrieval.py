"""Retrieval validation with OpenCLIP's metrics, computed across ranks.

Each rank embeds its own share of the validation pairs. The features are gathered, but each rank
ranks only its own rows against all candidates, a chunk of rows at a time, so no rank ever holds
the N x N similarity matrix. A pair's rank is the number of candidates scoring strictly higher
than its true partner: on distinct scores this is OpenCLIP's argsort position, and unlike an
argsort it does not depend on the order in which the ranks' rows were gathered.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .distributed import World, all_gather_rows, all_reduce_sum
from .precision import autocast, input_dtype
from .errors import NsoclipError

# Rows of the similarity matrix ranked at once: chunk x N floats of memory per rank.
RANK_CHUNK_ROWS = 1024
RECALL_AT = (1, 5, 10)


class RetrievalError(NsoclipError, ValueError):
    """Validation data that gives nothing to evaluate."""


def batch_clip_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    """OpenCLIP's clip_val_loss of one batch: symmetric cross-entropy within the batch."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def match_ranks(queries: torch.Tensor, candidates: torch.Tensor, offset: int,
                chunk_size: int = RANK_CHUNK_ROWS) -> torch.Tensor:
    """0-based rank of each query's partner (candidate offset + i) among all candidates."""
    ranks = [torch.empty(0, dtype=torch.long, device=candidates.device)]
    for start in range(0, len(queries), chunk_size):
        scores = queries[start:start + chunk_size] @ candidates.T
        rows = torch.arange(len(scores), device=scores.device)
        partner = scores[rows, offset + start + rows]
        ranks.append((scores > partner[:, None]).sum(dim=1))
    return torch.cat(ranks)


def rank_metrics(direction: str, ranks: torch.Tensor) -> dict:
    """OpenCLIP's definitions: mean rank + 1, floor(median) + 1, recall at k."""
    ranks = ranks.cpu().numpy()
    metrics = {f"{direction}_mean_rank": float(ranks.mean() + 1),
               f"{direction}_median_rank": float(math.floor(np.median(ranks)) + 1)}
    for k in RECALL_AT:
        metrics[f"{direction}_R@{k}"] = float(np.mean(ranks < k))
    return metrics


def features_metrics(image_features: torch.Tensor, text_features: torch.Tensor, world: World,
                     chunk_size: int = RANK_CHUNK_ROWS) -> dict:
    """Retrieval metrics over all ranks' pairs, from this rank's normalized features (n x d,
    float32; a rank without pairs passes 0 x 0 tensors)."""
    all_images, counts = all_gather_rows(image_features)
    all_texts, _ = all_gather_rows(text_features)
    offset = sum(counts[:world.rank])
    image_to_text = match_ranks(image_features, all_texts, offset, chunk_size)
    text_to_image = match_ranks(text_features, all_images, offset, chunk_size)
    metrics = {}
    for direction, ranks in (("image_to_text", image_to_text), ("text_to_image", text_to_image)):
        metrics.update(rank_metrics(direction, all_gather_rows(ranks[:, None])[0][:, 0]))
    return metrics


def retrieval_metrics(model, val_data, args, world: World, chunk_size: int = RANK_CHUNK_ROWS,
                      progress: bool = False) -> dict:
    """clip_val_loss, R@1/5/10 and mean/median ranks in both directions, and num_samples, of
    `model` (in eval mode) on the pairs of every rank; the same dict on every rank."""
    image_parts, text_parts = [], []
    loss_sum = 0.0
    with torch.no_grad():
        for batch in tqdm(val_data.dataloader, desc="retrieval", unit="batch",
                          disable=not (progress and world.is_master)):
            if batch is None:  # a whole batch of unreadable images
                continue
            images, texts = batch
            images = images.to(world.device, dtype=input_dtype(args.precision), non_blocking=True)
            texts = texts.to(world.device, non_blocking=True)
            with autocast(args.precision, world.device):
                output = model(image=images, text=texts)
            image_features = output["image_features"].float()
            text_features = output["text_features"].float()
            loss_sum += float(batch_clip_loss(image_features, text_features, output["logit_scale"].float())) * len(images)
            image_parts.append(image_features)
            text_parts.append(text_features)
    totals = all_reduce_sum(torch.tensor([loss_sum, sum(len(p) for p in image_parts)],
                                         dtype=torch.float64, device=world.device))
    loss_sum, num_samples = float(totals[0]), int(totals[1])
    if num_samples == 0:
        raise RetrievalError(f"--val-data {args.val_data}: no validation samples to evaluate")
    empty = torch.empty(0, 0, device=world.device)
    image_features = torch.cat(image_parts) if image_parts else empty
    text_features = torch.cat(text_parts) if text_parts else empty
    metrics = features_metrics(image_features, text_features, world, chunk_size)
    metrics.update(clip_val_loss=loss_sum / num_samples, num_samples=num_samples)
    return metrics
