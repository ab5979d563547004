"""Checkpoints: atomic writes, safe loads, `module.` prefixes in both directions, and finding
the newest complete checkpoint for `--resume latest`.

A checkpoint is a plain dict of tensors and Python primitives so that it loads with
`torch.load(weights_only=True)` (no pickled code is ever executed) and in plain OpenCLIP
(`state_dict` holds the bare model's keys)."""
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch


class CheckpointError(ValueError):
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
        reason = str(error).splitlines()[0] if str(error) else "unsafe content"
        raise CheckpointError(f"checkpoint {path}: refused, it is not a plain tensor checkpoint "
                              f"(weights_only load failed: {reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: corrupt or truncated ({str(error).splitlines()[0]})") from None
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
