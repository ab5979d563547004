"""What every data source hands the training loop and the evaluators, and the one way nsoclip
makes dataloaders: workers that survive a preemption signal, iterators that can all be stopped
from one place on any exit path, batches onto the device, unreadable samples dropped.

`DataInfo` is the contract of every source: every rank gets exactly `num_batches` batches per
epoch (DDP and FSDP need equal counts), and `set_position(epoch, start_batch)` makes the next
iteration resume an epoch mid-way exactly where an uninterrupted run would be."""
import atexit
import logging
import os
import signal
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.utils.data import DataLoader, default_collate
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter  # private: the only handle on workers

from .precision import input_dtype

_ITERATORS = weakref.WeakSet()

# torch warns on every dataloader iterator (training, validation, each zero-shot set, every rank)
# when one loader's workers exceed the cores; check_worker_count says it once per run instead,
# counting the workers of all ranks on the node.
warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


def check_worker_count(workers: int) -> None:
    """One warning when the dataloader workers of this node's ranks outnumber its CPU cores."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if workers * ranks > (cores or 1):
        logging.warning("--workers %d x %d rank(s) on this node = %d dataloader processes for %d CPU cores: "
                        "data loading may be faster with fewer workers", workers, ranks, workers * ranks, cores)


@dataclass
class DataInfo:
    dataloader: Iterable
    num_batches: int
    num_samples: int
    set_position: Callable[[int, int], None] = field(default=lambda epoch, start_batch: None)
    bad_sample_counts: Optional[Callable[[], Dict[str, int]]] = None


def worker_init(worker_id: int) -> None:
    """Dataloader workers leave SIGTERM to the main process: SLURM signals every process of the
    job step, and a worker that died on it would crash the run before its preemption checkpoint
    is written. Because they ignore it, `stop_workers` (not SIGTERM) is what ends them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader(DataLoader):
    """torch's DataLoader with our worker set-up, whose iterators are tracked so that
    `stop_workers` can end their workers however the process leaves."""

    def __init__(self, dataset, *, workers: int, device: torch.device, persistent: bool = True, **kwargs):
        super().__init__(dataset, num_workers=workers, worker_init_fn=worker_init,
                         persistent_workers=persistent and workers > 0, pin_memory=device.type == "cuda", **kwargs)

    def _get_iterator(self):
        iterator = WorkerIterator(self) if self.num_workers > 0 else super()._get_iterator()
        _ITERATORS.add(iterator)
        return iterator


class WorkerIterator(_MultiProcessingDataLoaderIter):
    """torch's multi-process iterator whose shutdown ends every worker. torch's last resort for a
    worker that did not stop in time is SIGTERM, which ours ignore: a worker left so would outlive
    the iterator and hang Python's exit, which joins it. Killing it only after torch's shutdown
    has unregistered the workers keeps torch's SIGCHLD handler from reporting it as a crash."""

    def _shutdown_workers(self):
        super()._shutdown_workers()
        for worker in self._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)


def stop_workers() -> None:
    """End the workers of every live dataloader iterator. Called on every exit path of the CLIs:
    without it, an error leaves persistent workers waiting for indices, and Python's exit joins
    them forever (they ignore the SIGTERM multiprocessing would send)."""
    for iterator in list(_ITERATORS):
        shutdown = getattr(iterator, "_shutdown_workers", None)  # none for a single-process iterator
        if shutdown is not None:
            try:
                shutdown()
            except Exception as error:  # a broken queue must not keep the others alive
                logging.debug("dataloader shutdown: %s", error)
        _ITERATORS.discard(iterator)


# Also at interpreter exit, for loaders made outside the CLIs (tests, notebooks): registered
# after multiprocessing's exit hook, so it runs first, before that hook joins the workers.
atexit.register(stop_workers)


def collate_readable(samples):
    """Batch the samples a dataset could read; an unreadable one arrives as None (its dataset
    logged which file it was). None when no sample of the batch was readable."""
    readable = [sample for sample in samples if sample is not None]
    return default_collate(readable) if readable else None


def to_device(batch, device: torch.device, precision: str):
    """(images, texts) on the device, images in the precision's input dtype."""
    images, texts = batch
    images = images.to(device=device, dtype=input_dtype(precision), non_blocking=True)
    return images, texts.to(device=device, non_blocking=True)


def first_batches(info: DataInfo, count: int, device: torch.device, precision: str) -> List:
    """The first `count` batches of the epoch-0 order, on the device (for the Hessian evaluator)."""
    info.set_position(0, 0)
    batches = []
    for batch in info.dataloader:
        batches.append(to_device(batch, device, precision))
        if len(batches) == count:
            break
    return batches
