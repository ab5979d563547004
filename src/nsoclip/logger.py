"""Logging: out.log and the console on rank 0 (and out-RANK.log on every rank with --log-local),
and the training metrics as data: metrics.jsonl in the run folder (one record per logged window,
read by the demo, the report and the tests), TensorBoard and wandb.

Metric names follow OpenCLIP's (`train/loss`, `train/lr`, `train/scale`, ...), so dashboards
built for OpenCLIP runs keep working."""
import importlib.util
import json
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter

from .errors import NsoclipError

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"
DATE_FORMAT = "%Y-%m-%d,%H:%M:%S"
REPORT_TARGETS = ("tensorboard", "wandb")


class ReportToError(NsoclipError, ValueError):
    """--report-to names a target we do not know."""


def report_targets(report_to: str) -> set:
    """OpenCLIP's --report-to: '', 'tensorboard', 'wandb', 'wandb,tensorboard' or 'all'."""
    names = {name.strip() for name in (report_to or "").split(",") if name.strip()}
    unknown = sorted(names - set(REPORT_TARGETS) - {"all"})
    if unknown:
        raise ReportToError(f"--report-to {report_to}: unknown target {unknown[0]!r} "
                            f"(choose from {', '.join(REPORT_TARGETS)}, all, or both joined by ',')")
    return set(REPORT_TARGETS) if "all" in names else names


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


class LibraryChatter(logging.Filter):
    """open_clip logs every step of model and tokenizer creation at INFO on the root logger
    ("Parsing model identifier ...", "Loaded built-in ... config"); those lines say nothing the
    user chose, so they are dropped. Its warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def install_library_filter() -> None:
    root = logging.getLogger()
    if not any(isinstance(f, LibraryChatter) for f in root.filters):
        root.addFilter(LibraryChatter())


def setup_logging(log_file: Optional[Path], is_master: bool, debug: bool = False, rank_file: Optional[Path] = None,
                  hold: bool = True):
    """Console on rank 0 (warnings only elsewhere), and out.log once the run folder exists. The
    run folder is made only after the inputs are checked, so what is logged before it exists is
    held (`hold`; off when there will be no run folder) and written into out.log first.
    `rank_file` (--log-local): this rank's own log, at the run's level whatever the rank, with
    the held records too."""
    level = logging.DEBUG if debug else logging.INFO
    held = [record for handler in logging.getLogger().handlers
            if isinstance(handler, logging.handlers.BufferingHandler) for record in handler.buffer]
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level if is_master else logging.WARNING)
    handlers = [console]
    files = []
    if log_file is None:
        if hold:
            handlers.append(logging.handlers.BufferingHandler(capacity=10 ** 6))
    else:
        if is_master:
            files.append(logging.FileHandler(log_file))
        if rank_file is not None:
            files.append(logging.FileHandler(rank_file))
    handlers += files
    logging.basicConfig(level=level, handlers=handlers, force=True, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    install_library_filter()
    for handler in files:
        for record in held:
            handler.handle(record)


def setup_console_logging(is_master: bool) -> None:
    """The evaluation CLIs: log lines on stderr (stdout carries their JSON), INFO on rank 0,
    warnings elsewhere."""
    logging.basicConfig(level=logging.INFO if is_master else logging.WARNING, force=True, stream=sys.stderr,
                        format=LOG_FORMAT, datefmt=DATE_FORMAT)
    install_library_filter()


class MetricsLogger:
    """Rank 0 writes; other ranks only take part in the collectives that produce the numbers.
    `run_dir` None (--logs none): the console only. `wandb_init`: wandb.init's keywords, or None."""

    def __init__(self, run_dir: Optional[Path], is_master: bool, tensorboard: bool, wandb_init: Optional[dict] = None):
        self.is_master = is_master
        self.jsonl = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.writer = None
        self.wandb = None
        if is_master and tensorboard and run_dir is not None:
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if is_master and wandb_init is not None:
            import wandb  # an optional dependency (nsoclip[wandb]); params.validate checked it is there
            try:
                self.wandb = wandb.init(**wandb_init)
            except wandb.errors.Error as error:  # no API key, no network, a bad project name, ...
                self.close()
                raise ReportToError(f"--report-to wandb: wandb could not start ({error}); run `wandb login`, "
                                    "or set WANDB_MODE=offline and `wandb sync` later") from None

    def log_train(self, metrics: dict, *, step: int, epoch: int, progress):
        if not self.is_master:
            return
        done, total = progress
        shown = " ".join(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())
        logging.info("Train epoch %d [%d/%d] step %d | %s", epoch, done, total, step, shown)
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"epoch": epoch, "step": step, "batch": done, "batches": total, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({**{f"train/{k}": v for k, v in metrics.items()}, "step": step}, step=step)

    def log_eval(self, metrics: dict, *, step: int, epoch: int):
        """wandb's copy of the evaluation metrics (results.jsonl and TensorBoard: evaluate.write_results)."""
        if self.wandb is not None:
            self.wandb.log({**{f"val/{k}": v for k, v in metrics.items()}, "epoch": epoch}, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
