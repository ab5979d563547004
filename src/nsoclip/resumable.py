"""Partial state of a long evaluation on disk, so that the same command run again after a
preemption (SIGTERM, SIGKILL, a requeued SLURM job) continues where it stopped and ends with
exactly the numbers of an uninterrupted run.

An evaluation is a fixed sequence of named stages (trace, eigenvalues, density, ...), each a
resumable computation: `compute(state, checkpoint)` with the estimators' contract (spectral).
Every rank keeps its own files (its slices of the sharded vectors) in one folder:

    rank{r}.slot{n % 2}.pt        after checkpoint n: the settings, n, the finished stages and
                                  the running stage's state, its bases replaced by row counts
    rank{r}.{stage}.pt            a finished stage's result, written once
    rank{r}.{stage}.{basis}.rows  a Krylov basis or sketch (spectral's `basis_id`), appended
                                  row by row as raw values: a checkpoint writes only new rows

Each .pt file is written to a temporary name, fsynced and renamed (checkpoint.save_checkpoint),
and rows are appended before the state that counts them, so a process killed at any moment
leaves a consistent state. Ranks are at most one checkpoint apart (every block of products has
a collective, and a rank writes checkpoint n + 1 only after every rank has passed the collectives
that follow their checkpoint n), which is why two slots are kept: a restart resumes, on every
rank, from the newest checkpoint all ranks have. Resuming needs the same settings and world
size; anything else is refused with one line rather than mixed into the numbers."""
import os
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import NsoclipError


class ResumeError(NsoclipError, ValueError):
    """The partial state on disk belongs to another evaluation, or is incomplete."""


def _externalise(state, write_rows: Callable[[str, torch.Tensor], dict]):
    """The state with each (basis, basis_id) pair replaced by write_rows' reference to its rows."""
    if isinstance(state, dict):
        if "basis" in state and "basis_id" in state:
            rest = {key: value for key, value in state.items() if key != "basis"}
            return {**{k: _externalise(v, write_rows) for k, v in rest.items()},
                    "basis": write_rows(state["basis_id"], state["basis"])}
        return {key: _externalise(value, write_rows) for key, value in state.items()}
    if isinstance(state, list):
        return [_externalise(value, write_rows) for value in state]
    return state


def _references(state) -> set:
    if isinstance(state, dict):
        if isinstance(state.get("basis"), dict) and "rows_file" in state["basis"]:
            return {state["basis"]["rows_file"]}
        return set().union(*(_references(value) for value in state.values()))
    if isinstance(state, list):
        return set().union(*(_references(value) for value in state))
    return set()


class PartialState:
    """The partial state of this rank in `directory`, for an evaluation described by `settings`
    (a dict of plain values: whatever changes the numbers, the world size included). `load()`
    (collective) picks up what a previous run left; `stage(name, compute)` returns a finished
    stage's result or runs it, checkpointing; `finish()` (collective) removes the folder."""

    def __init__(self, directory, settings: dict, rank: int = 0, world_size: int = 1, device="cpu"):
        self.directory = Path(directory)
        self.settings = dict(settings, world_size=world_size)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.seq = -1
        self.done = []
        self.ongoing: Optional[dict] = None
        self._slot_references: Dict[int, set] = {0: set(), 1: set()}
        self._rows_on_disk: Dict[str, int] = {}

    def _path(self, name: str) -> Path:
        return self.directory / f"rank{self.rank}.{name}"

    def _agree(self, values, op) -> list:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if distributed.is_distributed():
            dist.all_reduce(tensor, op=op)
        return [int(value) for value in tensor.tolist()]

    def load(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".rank{self.rank}.*.tmp-*"):
            stale.unlink()
        slots = {}
        for slot in (0, 1):
            path = self._path(f"slot{slot}.pt")
            if path.exists():
                state = load_checkpoint(path)
                slots[state["seq"]] = state
        differing = sorted({key for state in slots.values() for key in set(state["settings"]) | set(self.settings)
                            if state["settings"].get(key) != self.settings.get(key)})
        newest = max(slots, default=-1)
        agreed, mismatch = self._agree([newest, -len(differing)], dist.ReduceOp.MIN)
        if mismatch:
            what = (f"{differing[0]} was {next(iter(slots.values()))['settings'].get(differing[0])!r}, "
                    f"now {self.settings.get(differing[0])!r}") if differing else "on another rank"
            raise ResumeError(f"{self.directory}: partial state of another evaluation ({what}); run the same "
                              "command again, or delete the folder to start over")
        missing = self._agree([agreed >= 0 and agreed not in slots], dist.ReduceOp.MAX)[0]
        if missing:
            raise ResumeError(f"{self.directory}: the ranks' partial states do not meet at a common checkpoint "
                              f"({agreed}); delete the folder to start over")
        if agreed < 0:
            for path in self.directory.glob(f"rank{self.rank}.*"):
                path.unlink()
            return self
        for seq in [seq for seq in slots if seq > agreed]:  # a checkpoint other ranks never reached
            self._path(f"slot{seq % 2}.pt").unlink()
            del slots[seq]
        for seq, state in slots.items():
            self._slot_references[seq % 2] = _references(state["ongoing"])
        state = slots[agreed]
        self.seq, self.done = agreed, list(state["done"])
        self.ongoing = self._restore(state["ongoing"]) if state["ongoing"] else None
        return self

    def _restore(self, state):
        """The saved state with its bases read back (and their files cut to what it counts)."""
        if isinstance(state, dict):
            if isinstance(state.get("basis"), dict) and "rows_file" in state["basis"]:
                reference = state["basis"]
                path = self.directory / reference["rows_file"]
                dtype = getattr(torch, reference["dtype"].removeprefix("torch."))
                count, width = reference["rows"], reference["width"]
                nbytes = count * width * torch.empty((), dtype=dtype).element_size()
                with open(path, "r+b") as handle:
                    handle.truncate(nbytes)
                rows = torch.from_file(str(path), size=count * width, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
                self._rows_on_disk[reference["rows_file"]] = count
                return {**{k: self._restore(v) for k, v in state.items() if k != "basis"},
                        "basis": rows.reshape(count, width)}
            return {key: self._restore(value) for key, value in state.items()}
        if isinstance(state, list):
            return [self._restore(value) for value in state]
        return state

    def _write_rows(self, stage: str):
        def write(basis_id: str, rows: torch.Tensor) -> dict:
            name = f"rank{self.rank}.{stage}.{basis_id}.rows"
            written = self._rows_on_disk.get(name, 0)
            data = rows[written:].detach().contiguous().cpu()
            with open(self.directory / name, "ab" if written else "wb") as handle:
                handle.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
                handle.flush()
                os.fsync(handle.fileno())
            self._rows_on_disk[name] = len(rows)
            return {"rows_file": name, "rows": len(rows), "width": rows.shape[1], "dtype": str(rows.dtype)}
        return write

    def save(self, stage: Optional[str], state: Optional[dict]):
        """Checkpoint seq + 1: `state` of the running `stage` (None between stages)."""
        ongoing = None if stage is None else {"stage": stage, "state": _externalise(state, self._write_rows(stage))}
        seq = self.seq + 1
        save_checkpoint({"settings": self.settings, "seq": seq, "done": list(self.done), "ongoing": ongoing},
                        self._path(f"slot{seq % 2}.pt"))
        self.seq = seq
        self._slot_references[seq % 2] = _references(ongoing)
        kept = self._slot_references[0] | self._slot_references[1]
        for path in self.directory.glob(f"rank{self.rank}.*.rows"):
            if path.name not in kept:
                path.unlink()
                self._rows_on_disk.pop(path.name, None)

    def stage(self, name: str, compute: Callable[[Optional[dict], Callable[[dict], None]], object]):
        """`compute(state, checkpoint)`'s result: read back when the stage finished before, else
        computed (from the saved state when it was running) with a checkpoint after each block."""
        if name in self.done:
            return load_checkpoint(self._path(f"{name}.pt"))["result"]
        state = self.ongoing["state"] if self.ongoing and self.ongoing["stage"] == name else None
        result = compute(state, lambda progress: self.save(name, progress))
        save_checkpoint({"result": result}, self._path(f"{name}.pt"))
        self.done.append(name)
        self.ongoing = None
        self.save(None, None)
        return result

    def finish(self):
        """Remove every rank's files and the folder (after the output is written)."""
        distributed.barrier()
        for path in self.directory.glob(f"rank{self.rank}.*"):
            path.unlink()
        distributed.barrier()
        if self.rank == 0:
            self.directory.rmdir()
