"""Process-group set-up for torchrun, SLURM srun and plain single-process runs, plus the few
collectives the training loop needs. Rank discovery follows OpenCLIP: torchrun's
LOCAL_RANK/RANK/WORLD_SIZE first, then SLURM_LOCALID/SLURM_PROCID/SLURM_NTASKS."""
import datetime
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .errors import NsoclipError


PEER_DIED = "another rank died (connection closed by peer)"
_timeout_minutes = 30.0  # --dist-timeout of the process group, for naming a timed-out collective


class LaunchError(NsoclipError, RuntimeError):
    """The launch environment is inconsistent (missing rendezvous address, bad device)."""


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def ranks_from_env(environ=os.environ):
    """(local_rank, rank, world_size) from torchrun or SLURM variables; (0, 0, 1) otherwise."""
    if "WORLD_SIZE" in environ and "RANK" in environ:
        return int(environ.get("LOCAL_RANK", 0)), int(environ["RANK"]), int(environ["WORLD_SIZE"])
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", 1)) > 1:
        return int(environ["SLURM_LOCALID"]), int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
    return 0, 0, 1


def default_device() -> str:
    """OpenCLIP's default: this rank's GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(requested: str, local_rank: int, set_device_rank: bool = True) -> torch.device:
    """`cuda` (OpenCLIP's default) means this rank's GPU; asking for a GPU on a machine
    without one is an error rather than a silent CPU run."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LaunchError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
        if requested == "cuda":
            index = local_rank if set_device_rank else 0
            device = torch.device("cuda", index)
        else:
            device = torch.device(requested)
        torch.cuda.set_device(device)
        return device
    raise LaunchError(f"--device {requested}: expected cpu, cuda or cuda:N")


def init_distributed(device: Optional[str] = None, backend=None, dist_url=None, timeout_minutes: float = 30,
                     set_device_rank: bool = True) -> World:
    if not timeout_minutes > 0:
        raise LaunchError(f"--dist-timeout {timeout_minutes}: must be > 0 minutes")
    local_rank, rank, world_size = ranks_from_env()
    world = World(rank=rank, local_rank=local_rank, world_size=world_size,
                  device=resolve_device(device or default_device(), local_rank, set_device_rank))
    if not world.distributed:
        return world
    using_slurm = "RANK" not in os.environ
    if using_slurm:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and not dist_url:
            raise LaunchError(f"SLURM launch with {world_size} tasks needs {' and '.join(missing)} exported "
                              "(see scripts/slurm_train.sh) or --dist-url tcp://HOST:PORT")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    backend = backend or ("nccl" if world.device.type == "cuda" else "gloo")
    global _timeout_minutes
    _timeout_minutes = timeout_minutes
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = None if dist_url else restart_attempt_store(timeout)
    dist.init_process_group(
        backend=backend,
        init_method=None if store else dist_url or "env://",
        store=store,
        world_size=world_size,
        rank=rank,
        timeout=timeout,
        device_id=world.device if backend == "nccl" else None,
    )
    return world


def restart_attempt_store(timeout: datetime.timedelta):
    """torchrun's agent keeps one store for all restarts of the worker group (torch 2.14, static
    and c10d rendezvous alike): a group restarted by --max-restarts would read the dead group's
    addresses under the same keys and fail to connect. Keys under a per-attempt prefix keep
    every attempt apart. None outside torchrun's agent store (env:// as usual)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"nsoclip/attempt_{attempt}", store)


def describe_collective_failure(error: BaseException) -> Optional[str]:
    """One line for a collective that failed because another rank hung past --dist-timeout or
    died, naming the operation and our function that called it; None for any other error.

    Gloo raises a bare RuntimeError from deep inside the collective, so the operation is read
    from the traceback: the torch.distributed call, DDP's gradient all-reduce in backward, or
    just "a collective" (functional collectives, such as open_clip's gather with gradient)."""
    message, timeout_minutes = str(error), _timeout_minutes
    if "Timed out" in message or "timeout" in message:
        what = (f"timed out after {timeout_minutes:g} min (--dist-timeout {timeout_minutes:g}): "
                "another rank is hung or too slow")
    elif "closed by peer" in message or "reset by peer" in message:
        what = f"failed: {PEER_DIED}"
    else:
        return None
    frames = [(frame.f_code.co_filename, frame.f_code.co_name) for frame, _ in traceback.walk_tb(error.__traceback__)]
    calls = [name for path, name in frames if path.endswith("distributed_c10d.py")]
    ours = [f"{Path(path).stem}.{name}" for path, name in frames
            if f"nsoclip{os.sep}" in path and not path.endswith(f"nsoclip{os.sep}distributed.py")]
    if calls:
        operation = f"collective {calls[0]}"
    elif any(path.endswith(os.path.join("autograd", "graph.py")) for path, _ in frames):
        operation = "DDP gradient all-reduce in backward"
    else:
        operation = "a collective"
    caller = f" (in {ours[-1]})" if ours else ""
    return f"{operation}{caller} {what}"


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks; a no-op on one process."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


# torch 2.14 renamed the single-tensor collectives (the old names warn); 2.11 has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(output: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """Every rank's `piece` (same size everywhere) concatenated in rank order into `output`."""
    if is_distributed():
        _all_gather_single(output, piece)
    else:
        output.copy_(piece.reshape(output.shape))
    return output


def reduce_scatter_sum(output: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Rank r's `output` becomes the r-th of world-size equal chunks of the sum of `values` over ranks."""
    if is_distributed():
        _reduce_scatter_single(output, values)
    else:
        output.copy_(values.reshape(output.shape))
    return output


def all_gather_rows(rows: torch.Tensor):
    """(every rank's rows concatenated in rank order, each rank's row count). Ranks may hold
    different numbers of rows, or none: an empty rank may pass a 0 x 0 tensor, the width is
    taken from the others. Rows must share a dtype across ranks."""
    if not is_distributed():
        return rows, [rows.shape[0]]
    world_size = dist.get_world_size()
    shape = torch.tensor([rows.shape[0], rows.shape[1] if rows.shape[0] else -1], device=rows.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    if width < 0:
        return rows, counts
    padded = torch.zeros(max(counts), width, dtype=rows.dtype, device=rows.device)
    if len(rows):
        padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]), counts


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier():
    if is_distributed():
        dist.barrier()
