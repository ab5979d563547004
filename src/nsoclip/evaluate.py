"""Evaluation entry point shared by the training loop and `nsoclip-zeroshot`: zero-shot
classification on every set named on the command line, retrieval on --val-data, and the
results.jsonl / TensorBoard record.

Every rank calls `evaluate` (the work and the collectives are spread over all ranks) and gets
the same metrics back; only rank 0 writes them.
"""
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from .distributed import World
from .retrieval import retrieval_metrics
from .classification import ZeroShotSet, run_zero_shot, zero_shot_sets


def evaluate(model, args, world: World, tokenizer, preprocess_val, val_data=None, epoch: int = 0,
             sets: Optional[List[ZeroShotSet]] = None, progress: bool = False) -> Dict[str, float]:
    """Metrics with OpenCLIP's keys. `model` is the bare open_clip model (output_dict=True); it
    runs in eval mode and is put back in its previous mode. `sets` defaults to the zero-shot sets
    named on `args`; pass the result of `zero_shot_sets` to check the folders once, up front.
    `epoch` only labels the log line: it never decides what runs."""
    sets = zero_shot_sets(args, world) if sets is None else sets
    was_training = model.training
    model.eval()
    metrics = {}
    try:
        for zs in sets:
            metrics.update(run_zero_shot(model, zs, tokenizer, preprocess_val, args, world, progress))
        if val_data is not None:
            metrics.update(retrieval_metrics(model, val_data, args, world, progress=progress))
    finally:
        model.train(was_training)
    if metrics:
        logging.info("Eval epoch %d | %s", epoch, " ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    return metrics


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_results(metrics: Dict[str, float], run_dir, epoch: int, step: int, tb_writer=None,
                  compute: Optional[Dict[str, int]] = None) -> None:
    """Append {"epoch", "step", **metrics, **compute} as one line to run_dir/results.jsonl
    (OpenCLIP's file; `compute`: the cumulative training counters at this point, so accuracy can
    be read against FLOPs) and each metric as the TensorBoard scalar val/<key> at the global
    step; rank 0 only."""
    if not is_rank_zero():
        return
    record = {"epoch": epoch, "step": step, **metrics, **(compute or {})}
    with open(Path(run_dir) / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if tb_writer is not None:
        for key, value in metrics.items():
            tb_writer.add_scalar(f"val/{key}", value, step)
