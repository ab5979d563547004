"""Starting processes on one machine: local gloo ranks for tests and benchmarks, torchrun command
lines and the environment of child jobs (the demo, the tests, the GPU check pack)."""
import os
import socket
import sys
import time
from typing import List, Optional, Sequence

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    """One thread per process (2 ranks share 2 cores), no GPU, and no launcher variables of a
    surrounding job leaking into a child's own torchrun."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def python_command(module: str, flags: Sequence, nproc: int = 1, torchrun_flags: Optional[Sequence[str]] = None,
                   ) -> List[str]:
    """`python -m MODULE FLAGS`, or under torchrun with nproc local ranks (on a free port unless
    torchrun_flags say otherwise). The `--` keeps our flags away from torchrun's parser, whose
    --logs-specs would otherwise swallow --logs."""
    if nproc == 1:
        return [sys.executable, "-m", module, *map(str, flags)]
    launcher = [f"--master_port={free_port()}"] if torchrun_flags is None else list(torchrun_flags)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launcher,
            "-m", module, "--", *map(str, flags)]


def spawn_local_ranks(worker, world_size: int, *args, timeout: float = 180):
    """worker(rank, world_size, port, *args) in `world_size` spawned processes that meet on
    127.0.0.1:port (benchmarks and tests of collective behaviour); a failure in any of them
    raises here, and nothing can hang past `timeout` seconds."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(world_size, free_port(), *args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
