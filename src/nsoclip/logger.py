"""Logging: out.log and the console on rank 0, and the training metrics as data: metrics.jsonl in
the run folder (one record per logged window, read by the demo, the report and the tests) and
TensorBoard.

Metric names follow OpenCLIP's (`train/loss`, `train/lr`, `train/scale`, ...), so dashboards
built for OpenCLIP runs keep working."""
import json
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"
DATE_FORMAT = "%Y-%m-%d,%H:%M:%S"


def setup_logging(log_file: Optional[Path], is_master: bool, debug: bool = False):
    """Console on rank 0 (warnings only elsewhere), and out.log once the run folder exists. The
    run folder is made only after the inputs are checked, so what is logged before it exists is
    held and written into out.log first."""
    level = logging.DEBUG if debug else logging.INFO
    if not is_master:
        level = logging.WARNING
    held = [record for handler in logging.getLogger().handlers
            if isinstance(handler, logging.handlers.BufferingHandler) for record in handler.buffer]
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file is None:
        handlers.append(logging.handlers.BufferingHandler(capacity=10 ** 6))
    elif is_master:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, handlers=handlers, force=True, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    if log_file is not None and is_master:
        for record in held:
            handlers[-1].handle(record)


class MetricsLogger:
    """Rank 0 writes; other ranks only take part in the collectives that produce the numbers."""

    def __init__(self, run_dir: Path, is_master: bool, tensorboard: bool):
        self.is_master = is_master
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if is_master and tensorboard:
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log_train(self, metrics: dict, *, step: int, epoch: int, progress):
        if not self.is_master:
            return
        done, total = progress
        shown = " ".join(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())
        logging.info("Train epoch %d [%d/%d] step %d | %s", epoch, done, total, step, shown)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "batch": done, "batches": total, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
