"""Logging: out.log and the console on rank 0, and the training metrics to TensorBoard.

Metric names follow OpenCLIP's (`train/loss`, `train/lr`, `train/scale`, ...), so dashboards
built for OpenCLIP runs keep working."""
import logging
import sys
from pathlib import Path


def setup_logging(log_file, is_master: bool, debug: bool = False):
    level = logging.DEBUG if debug else logging.INFO
    if not is_master:
        level = logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and is_master:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s | %(levelname)s | %(message)s", datefmt="%Y-%m-%d,%H:%M:%S")


class MetricsLogger:
    """Rank 0 writes; other ranks only take part in the collectives that produce the numbers."""

    def __init__(self, run_dir: Path, is_master: bool, tensorboard: bool):
        self.is_master = is_master
        self.writer = None
        if is_master and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log_train(self, metrics: dict, *, step: int, epoch: int, progress):
        if not self.is_master:
            return
        done, total = progress
        shown = " ".join(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())
        logging.info("Train epoch %d [%d/%d] step %d | %s", epoch, done, total, step, shown)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
