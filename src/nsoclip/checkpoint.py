"""Checkpoints: atomic writes, safe loads, `module.` prefixes in both directions, and finding
the newest complete checkpoint for `--resume latest`.

A full checkpoint (`*.pt`) is a plain dict of tensors and Python primitives so that it loads with
`torch.load(weights_only=True)` (no pickled code is ever executed) and in plain OpenCLIP
(`state_dict` holds the bare model's keys). A sharded checkpoint (`step_N/`, `--fsdp-checkpoint
sharded`) is a torch.distributed.checkpoint folder, each rank writing its own shards, plus
`nsoclip.json` with the counters; it is written under a hidden temporary name and renamed into
place by rank 0 once every rank has written, so a `step_N/` folder is always complete. Both
kinds resume into any layout and world size: the layout (`nsoclip.parallel`) places each value."""
import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .distributed import barrier, broadcast_object
from .errors import NsoclipError

CHECKPOINT_KINDS = ("full", "sharded")  # --fsdp-checkpoint: how step checkpoints are written
SHARDED_META = "nsoclip.json"  # counters and optimizer settings beside DCP's files


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
    fsync_dir(path.parent)


def fsync_dir(path) -> None:
    """Make a rename in `path` durable."""
    directory = os.open(path, os.O_RDONLY)
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
    check_keys(own, {key: value.shape for key, value in state.items()}, where)
    state = {k: v.reshape(own[k].shape) for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def check_keys(own: dict, saved_shapes: dict, where: str) -> None:
    """One line naming missing, unexpected and mis-shaped keys (a shape with the same number of
    elements fits: logit_scale is 0-d in OpenCLIP, [1] under FSDP2)."""
    missing = sorted(set(own) - set(saved_shapes))
    unexpected = sorted(set(saved_shapes) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(saved_shapes)
                         if tuple(own[k].shape) != tuple(saved_shapes[k])
                         and own[k].numel() != torch.Size(saved_shapes[k]).numel())
    if missing or unexpected or wrong_shape:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"{where} does not match the model: {'; '.join(parts)}")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: this builds only DCP's metadata classes, sizes, dtypes and
    paths, so a planted file cannot run code (DCP then reads the file it checked)."""

    def find_class(self, module, name):
        allowed = (module.startswith("torch.distributed.checkpoint.")
                   or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                         ("collections", "OrderedDict")}
                   or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise CheckpointError(f"it pickles {module}.{name}, which is not checkpoint metadata")
        return super().find_class(module, name)


def sharded_metadata(path):
    """(nsoclip.json's dict, DCP's Metadata) of a sharded checkpoint folder, both checked."""
    path = Path(path)
    try:
        meta = json.loads((path / SHARDED_META).read_text())
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path}: not a complete sharded checkpoint "
                              f"({Path(error.filename).name} missing)") from None
    except CheckpointError as error:
        raise CheckpointError(f"checkpoint {path}: refused, {error}") from None
    except Exception as error:  # garbage in either file
        raise CheckpointError(f"checkpoint {path}: corrupt sharded checkpoint ({type(error).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not hasattr(metadata, "state_dict_metadata"):
        raise CheckpointError(f"checkpoint {path}: corrupt sharded checkpoint ({SHARDED_META} or .metadata)")
    return meta, metadata


def _dcp(operation, state, path):
    """dcp.save / dcp.load; on one process without a process group DCP warns that it assumes
    one process, which is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process")
        operation(state, checkpoint_id=path)


def load_sharded_model(path, model: torch.nn.Module, label: str) -> None:
    """The model of a sharded checkpoint into a bare model, every rank reading the whole of it
    (it holds the whole model until fully_shard anyway); mismatches fail as load_model_weights'."""
    _, metadata = sharded_metadata(path)
    saved = {key[len("model."):]: item for key, item in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    own = model.state_dict()
    check_keys(own, {key: item.size for key, item in saved.items()}, f"{label} {path}")
    targets = {key: value if tuple(value.shape) == tuple(saved[key].size)
               else torch.empty(saved[key].size, dtype=saved[key].properties.dtype) for key, value in own.items()}
    _dcp(dcp.load, {"model": targets}, path)
    with torch.no_grad():
        for key, value in own.items():
            if targets[key] is not value:
                value.copy_(targets[key].reshape(value.shape))


def load_sharded_optimizer(path, optimizer: torch.optim.Optimizer, layout, meta: dict) -> None:
    """Optimizer state of a sharded checkpoint, each rank reading what its layout holds of it."""
    _, metadata = sharded_metadata(path)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    targets = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            if not (index.isdigit() and int(index) < len(params)) or not isinstance(item, TensorStorageMetadata):
                raise CheckpointError(f"optimizer state entry {key} fits none of the {len(params)} parameters")
            targets.setdefault(index, {})[name] = layout.empty_like_saved(params[int(index)], item.size,
                                                                          item.properties.dtype)
    _dcp(dcp.load, {"optimizer": targets}, path)
    # JSON has no tuples: what the optimizer holds as one (AdamW's betas) becomes one again.
    groups = meta["param_groups"]
    if len(groups) == len(optimizer.param_groups):  # else torch's load names the mismatch
        groups = [{key: tuple(value) if isinstance(live.get(key), tuple) else value for key, value in saved.items()}
                  for saved, live in zip(groups, optimizer.param_groups)]
    layout.load_optimizer_state_dict(optimizer, {"state": {int(i): entry for i, entry in targets.items()},
                                                 "param_groups": groups, **meta["optimizer_extras"]})


def checkpoint_position(path) -> Optional[int]:
    """The global step a checkpoint was written at, or None when it is unusable. Reads no
    tensor data (mmap for files, the metadata for sharded folders)."""
    try:
        checkpoint = sharded_metadata(path)[0] if Path(path).is_dir() else load_checkpoint(path, mmap=True)
    except CheckpointError as error:
        logging.warning("Ignoring %s", error)
        return None
    step = checkpoint.get("step")
    return step if isinstance(step, int) else None


SHARDED_NAME = re.compile(r"step_\d+")


def checkpoint_paths(checkpoint_dir):
    """Every checkpoint a run folder holds: `*.pt` files and sharded `step_N/` folders (a
    temporary folder of an unfinished sharded write is hidden, so never listed)."""
    checkpoint_dir = Path(checkpoint_dir)
    return [path for path in checkpoint_dir.glob("*.pt") if path.is_file()] + \
        [path for path in checkpoint_dir.glob("step_*") if path.is_dir() and SHARDED_NAME.fullmatch(path.name)]


def latest_checkpoint(checkpoint_dir) -> Optional[Path]:
    """The complete checkpoint with the highest global step (later file wins a tie)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    best, best_key = None, None
    for path in checkpoint_paths(checkpoint_dir):
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

    Rank 0 writes full checkpoints; every rank calls the save methods (under FSDP2 they gather
    the shards first) and learns whether the write succeeded, so a failed write (full disk, lost
    mount) stops all ranks at once with one line instead of leaving the others waiting in their
    next collective. A checkpoint records where the data stream stands (`epoch` = completed
    epochs, `batch` = batches consumed in the current one), so a resumed run continues exactly.
    Step checkpoints are full files, or sharded folders with `--fsdp-checkpoint sharded`; epoch
    checkpoints are always full files, loadable in plain OpenCLIP. `checkpoint_dir` None (--logs
    none): nothing is saved."""

    def __init__(self, checkpoint_dir, args, world):
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.args = args
        self.world = world

    @property
    def sharded_steps(self) -> bool:
        return getattr(self.args, "fsdp_checkpoint", "full") == "sharded"

    def remove_partial_writes(self):
        """A writer killed mid-save leaves its temporary file or folder (never a `*.pt` nor a
        `step_N/`, so never resumed from); rank 0 of the next start removes them, as no other
        process writes here."""
        if self.world.is_master and self.dir is not None:
            for leftover in [*self.dir.glob(".*.pt.tmp-*"), *self.dir.glob(".step_*.tmp-*")]:
                logging.warning("Removing %s, left by a checkpoint write that was interrupted", leftover)
                remove(leftover)

    def counters(self, run, epoch: int, batch: int) -> dict:
        return {
            "epoch": epoch,
            "batch": batch,
            "step": run.step,
            "name": self.args.name,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "nonfinite_total": run.nonfinite_total,
            "compute": run.compute.state_dict(),
            "world_size": self.world.world_size,
            "global_batch_size": self.global_batch_size(),
        }

    def state(self, run, epoch: int, batch: int) -> dict:
        """The full checkpoint; every rank calls it (a gather of the shards under FSDP2), rank 0's
        is the one written."""
        return {**self.counters(run, epoch, batch), "state_dict": run.layout.model_state_dict(),
                "optimizer": run.layout.optimizer_state_dict(run.optimizer)}

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
        if self.sharded_steps:
            return self.save_sharded_step(run, epoch, batch)
        path = self.dir / f"step_{run.step}.pt"
        state = self.state(run, epoch, batch)

        def write():
            save_checkpoint(state, path)
            logging.info("Saved step checkpoint %s", path)
            self.remove_step_checkpoints(keep=path)
        self.agreed(write)

    def save_sharded_step(self, run, epoch: int, batch: int):
        """Every rank writes its shards into a hidden folder in parallel; once all have (DCP ends
        in a collective, then a barrier), rank 0 adds nsoclip.json and renames the folder."""
        final = self.dir / f"step_{run.step}"
        tmp = self.dir / broadcast_object(f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}")
        model_state, optimizer_state = run.layout.sharded_state_dicts(run.optimizer)
        meta = {**self.counters(run, epoch, batch), "param_groups": optimizer_state["param_groups"],
                "optimizer_extras": {k: v for k, v in optimizer_state.items() if k not in ("state", "param_groups")}}
        try:
            _dcp(dcp.save, {"model": model_state,
                            "optimizer": {str(i): entry for i, entry in optimizer_state["state"].items()}}, tmp)
        except CheckpointException as error:
            raise CheckpointError(f"cannot write checkpoint {tmp}: {str(error).strip().splitlines()[0]}") from None
        barrier()

        def write():
            with open(tmp / SHARDED_META, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # the same step written again (a run resumed at it): replace it whole
                os.rename(final, self.dir / f".{final.name}.tmp-old-{time.time_ns()}")
            os.rename(tmp, final)
            fsync_dir(self.dir)
            logging.info("Saved sharded step checkpoint %s", final)
            self.remove_step_checkpoints(keep=final)
            for old in self.dir.glob(f".{final.name}.tmp-old-*"):
                remove(old)
        self.agreed(write)

    def save_epoch(self, run, completed_epochs: int):
        """epoch_N.pt every --save-frequency epochs and after the final one (also with
        --save-frequency 0, as OpenCLIP); --delete-previous-checkpoint then removes every older
        epoch_N.pt, only once the new one is on disk."""
        args = self.args
        if self.dir is None:
            return
        state = self.state(run, completed_epochs, 0)

        def write():
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
        older ones go (files and sharded folders alike)."""
        for old in self.dir.glob("step_*"):
            if old != keep:
                remove(old)

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """`latest` is the newest complete checkpoint of this run, or None for a first start."""
        if not resume:
            return None
        if resume == "latest":
            return latest_checkpoint(self.dir) if self.dir is not None else None
        path = Path(resume)
        if not (path.is_file() or path.is_dir()):
            raise CheckpointError(f"--resume {resume}: file not found")
        return path

    def load(self, path: Path, model: torch.nn.Module) -> dict:
        """Read a checkpoint to resume from and load its weights into the bare model (before it is
        laid out over the ranks), checking everything that can be checked before the run folder
        is touched. For a sharded checkpoint the counters are returned; its optimizer state is
        read by `restore`, once the optimizer exists in its layout."""
        if path.is_dir():
            try:
                checkpoint = {**sharded_metadata(path)[0], "sharded": True}
            except CheckpointError as error:
                raise CheckpointError(f"--resume {error}") from None
        else:
            # Under FSDP2 every rank reads the file: mmap lets them share the page cache.
            checkpoint = load_checkpoint(path, mmap=bool(getattr(self.args, "fsdp", False)))
        saved_batch_size = checkpoint.get("global_batch_size")
        if int(checkpoint.get("batch", 0)) and saved_batch_size not in (None, self.global_batch_size()):
            raise CheckpointError(
                f"--resume {path}: stopped mid-epoch with a global batch of {saved_batch_size}, now "
                f"{self.global_batch_size()} (--batch-size {self.args.batch_size} x {self.world.world_size} "
                "ranks); resume with the same global batch, or from an epoch checkpoint")
        if checkpoint.get("sharded"):
            load_sharded_model(path, model, label="--resume")
        else:
            load_model_weights(model, checkpoint, label=f"--resume {path}")
        return checkpoint

    def restore(self, run, path: Path, checkpoint: dict, steps_per_epoch: int):
        """Optimizer, scaler and counters from a checkpoint `load` read; returns (epoch, batch)
        to continue from."""
        epoch = int(checkpoint.get("epoch", 0))
        if "optimizer" in checkpoint or checkpoint.get("sharded"):
            try:
                if checkpoint.get("sharded"):
                    load_sharded_optimizer(path, run.optimizer, run.layout, checkpoint)
                else:
                    run.layout.load_optimizer_state_dict(run.optimizer, checkpoint["optimizer"])
            except (KeyError, ValueError, RuntimeError, CheckpointException) as error:
                raise CheckpointError(f"--resume {path}: optimizer state does not fit --opt {self.args.opt} "
                                      f"({str(error).strip().splitlines()[0]})") from None
        if run.scaler is not None and checkpoint.get("scaler"):
            run.scaler.load_state_dict(checkpoint["scaler"])
        run.step = int(checkpoint.get("step", epoch * steps_per_epoch))
        run.nonfinite_total = int(checkpoint.get("nonfinite_total", 0))
        if "compute" in checkpoint:
            run.compute.load_state_dict(checkpoint["compute"])
        else:
            logging.warning("--resume %s: the checkpoint has no compute counters; passes, samples and FLOPs "
                            "count from this start", path)
        return epoch, int(checkpoint.get("batch", 0))


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
