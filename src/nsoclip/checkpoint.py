"""Checkpoints: atomic writes, safe loads, `module.` prefixes in both directions, and finding
the newest complete checkpoint for `--resume latest`.

A checkpoint is a plain dict of tensors and Python primitives so that it loads with
`torch.load(weights_only=True)` (no pickled code is ever executed) and in plain OpenCLIP
(`state_dict` holds the bare model's keys)."""
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from .distributed import broadcast_object
from .errors import NsoclipError


class CheckpointError(NsoclipError, ValueError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


def save_checkpoint(state: dict, path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at
    any moment leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        detail = (str(error).partition("WeightsUnpickler error:")[2].strip().splitlines() or ["unsafe content"])[0]
        if detail.startswith("Unsupported operand"):
            raise CheckpointError(f"checkpoint {path}: corrupt or truncated (not a torch.save file)") from None
        unsafe = re.match(r"Unsupported global: GLOBAL (\S+)", detail)
        what = f"it pickles {unsafe.group(1)}, which weights_only loading never runs" if unsafe else detail
        raise CheckpointError(f"checkpoint {path}: refused, it is not a plain tensor checkpoint ({what})") from None
    except Exception as error:  # whatever garbage makes the unpickler raise, the file is unusable
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path}: corrupt or truncated ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(checkpoint).__name__}")
    return checkpoint


def model_state_dict(checkpoint: dict) -> dict:
    """The model weights of an OpenCLIP-style checkpoint or of a bare state dict."""
    state = checkpoint.get("state_dict", checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint holds no model state_dict")
    return state


def match_prefix(state_dict: dict, expected_keys) -> dict:
    """Add or strip DDP's `module.` prefix so the keys match the module that will load them."""
    expected_keys = list(expected_keys)
    wants_prefix = bool(expected_keys) and expected_keys[0].startswith("module.")
    result = {}
    for key, value in state_dict.items():
        bare = key[len("module."):] if key.startswith("module.") else key
        result[f"module.{bare}" if wants_prefix else bare] = value
    return result


def load_model_weights(model: torch.nn.Module, source, label: str = "checkpoint") -> None:
    """Load weights (a path or a checkpoint dict) into `model`; on any mismatch raise one line
    naming the mismatched keys and leave the model untouched."""
    checkpoint = load_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    where = f"{label} {source}" if isinstance(source, (str, os.PathLike)) else label
    try:
        state = model_state_dict(checkpoint)
    except CheckpointError as error:
        raise CheckpointError(f"{where}: {error}") from None
    own = model.state_dict()
    state = match_prefix(state, own.keys())
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state)
                         if tuple(own[k].shape) != tuple(state[k].shape) and own[k].numel() != state[k].numel())
    if missing or unexpected or wrong_shape:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"{where} does not match the model: {'; '.join(parts)}")
    state = {k: v.reshape(own[k].shape) for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def checkpoint_position(path) -> Optional[int]:
    """The global step a checkpoint was written at, or None when the file is unusable. Uses
    mmap so no tensor data is read."""
    try:
        checkpoint = load_checkpoint(path, mmap=True)
    except CheckpointError as error:
        logging.warning("Ignoring %s", error)
        return None
    step = checkpoint.get("step")
    return step if isinstance(step, int) else None


def latest_checkpoint(checkpoint_dir) -> Optional[Path]:
    """The complete checkpoint with the highest global step (later file wins a tie)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    best, best_key = None, None
    for path in checkpoint_dir.glob("*.pt"):
        step = checkpoint_position(path)
        if step is None:
            continue
        key = (step, path.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


class Checkpointer:
    """The run's checkpoint folder: epoch checkpoints as OpenCLIP names them, step checkpoints
    inside epochs, and restoring a run from any of them.

    Rank 0 writes; every rank calls the save methods and learns whether the write succeeded, so a
    failed write (full disk, lost mount) stops all ranks at once with one line instead of leaving
    the others waiting in their next collective. A checkpoint records where the data stream
    stands (`epoch` = completed epochs, `batch` = batches consumed in the current one), so a
    resumed run continues exactly. `checkpoint_dir` None (--logs none): nothing is saved."""

    def __init__(self, checkpoint_dir, args, world):
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.args = args
        self.world = world

    def remove_partial_writes(self):
        """A writer killed mid-save leaves its temporary file (never a `*.pt`, so never resumed
        from); rank 0 of the next start removes them, as no other process writes here."""
        if self.world.is_master and self.dir is not None:
            for leftover in self.dir.glob(".*.pt.tmp-*"):
                logging.warning("Removing %s, left by a checkpoint write that was interrupted", leftover)
                leftover.unlink(missing_ok=True)

    def state(self, run, epoch: int, batch: int) -> dict:
        return {
            "epoch": epoch,
            "batch": batch,
            "step": run.step,
            "name": self.args.name,
            "state_dict": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "nonfinite_total": run.nonfinite_total,
            "world_size": self.world.world_size,
            "global_batch_size": self.global_batch_size(),
        }

    def global_batch_size(self) -> int:
        return self.args.batch_size * self.world.world_size

    def agreed(self, write) -> None:
        """Run `write()` on rank 0 and raise the same CheckpointError on every rank if it failed."""
        failure = None
        if self.world.is_master:
            try:
                write()
            except OSError as error:
                where = error.filename2 or error.filename or self.dir
                failure = f"cannot write checkpoint {where}: {error.strerror or error}"
        failure = broadcast_object(failure)
        if failure is not None:
            raise CheckpointError(failure)

    def save_step(self, run, epoch: int, batch: int):
        if self.dir is None:
            logging.warning("No step checkpoint at step %d: --logs none keeps no checkpoints", run.step)
            return
        path = self.dir / f"step_{run.step}.pt"

        def write():
            save_checkpoint(self.state(run, epoch, batch), path)
            logging.info("Saved step checkpoint %s", path)
            self.remove_step_checkpoints(keep=path)
        self.agreed(write)

    def save_epoch(self, run, completed_epochs: int):
        """epoch_N.pt every --save-frequency epochs and after the final one (also with
        --save-frequency 0, as OpenCLIP); --delete-previous-checkpoint then removes every older
        epoch_N.pt, only once the new one is on disk."""
        args = self.args
        if self.dir is None:
            return

        def write():
            state = self.state(run, completed_epochs, 0)
            final = completed_epochs == args.epochs
            if final or (args.save_frequency > 0 and completed_epochs % args.save_frequency == 0):
                path = self.dir / f"epoch_{completed_epochs}.pt"
                save_checkpoint(state, path)
                logging.info("Saved %s", path)
                if args.delete_previous_checkpoint:
                    for old in self.dir.glob("epoch_*.pt"):
                        if old != path and old.stem.split("_")[1].isdigit():
                            old.unlink()
            if args.save_most_recent:
                save_checkpoint(state, self.dir / "epoch_latest.pt")
            self.remove_step_checkpoints(keep=None)
        self.agreed(write)

    def remove_step_checkpoints(self, keep):
        """Step checkpoints are for recovery only: once a newer checkpoint is safely on disk, the
        older ones go."""
        for old in self.dir.glob("step_*.pt"):
            if old != keep:
                old.unlink(missing_ok=True)

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """`latest` is the newest complete checkpoint of this run, or None for a first start."""
        if not resume:
            return None
        if resume == "latest":
            return latest_checkpoint(self.dir) if self.dir is not None else None
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: file not found")
        return path

    def load(self, path: Path, model: torch.nn.Module) -> dict:
        """Read a checkpoint to resume from and load its weights into the bare model, checking
        everything that can be checked before the run folder is touched."""
        checkpoint = load_checkpoint(path)
        saved_batch_size = checkpoint.get("global_batch_size")
        if int(checkpoint.get("batch", 0)) and saved_batch_size not in (None, self.global_batch_size()):
            raise CheckpointError(
                f"--resume {path}: stopped mid-epoch with a global batch of {saved_batch_size}, now "
                f"{self.global_batch_size()} (--batch-size {self.args.batch_size} x {self.world.world_size} "
                "ranks); resume with the same global batch, or from an epoch checkpoint")
        load_model_weights(model, checkpoint, label=f"--resume {path}")
        return checkpoint

    def restore(self, run, path: Path, checkpoint: dict, steps_per_epoch: int):
        """Optimizer, scaler and counters from a checkpoint `load` read; returns (epoch, batch)
        to continue from."""
        epoch = int(checkpoint.get("epoch", 0))
        if "optimizer" in checkpoint:
            try:
                run.optimizer.load_state_dict(checkpoint["optimizer"])
            except (KeyError, ValueError, RuntimeError) as error:
                raise CheckpointError(f"--resume {path}: optimizer state does not fit --opt {self.args.opt} "
                                      f"({str(error).splitlines()[0]})") from None
        if run.scaler is not None and checkpoint.get("scaler"):
            run.scaler.load_state_dict(checkpoint["scaler"])
        run.step = int(checkpoint.get("step", epoch * steps_per_epoch))
        run.nonfinite_total = int(checkpoint.get("nonfinite_total", 0))
        return epoch, int(checkpoint.get("batch", 0))
