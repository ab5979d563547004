"""Shared test fixtures: tiny OpenCLIP model configs and launching multi-process jobs on CPU."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsoclip.distributed import free_port, spawn_local_ranks as run_ranks  # noqa: F401 (shared with tests)

CONFIGS = Path(__file__).parent / "configs"
REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_logging():
    """CLIs called in-process set up logging on streams pytest closes after the test: put the
    root logger back so later tests log to live streams."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def tiny_config() -> str:
    """A 2-layer ViT CLIP with OpenCLIP's tokenizer vocabulary: trains in seconds on CPU."""
    return str(CONFIGS / "tiny-vit.json")


@pytest.fixture
def micro_config() -> str:
    """A CLIP small enough (a few hundred parameters) for exact Hessians."""
    return str(CONFIGS / "micro-vit.json")


def cpu_env(**extra) -> dict:
    """Environment for child processes: one thread each (2-core CI), no launcher variables leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args, *, nproc: int = 1, timeout: float = 240, env=None, check: bool = True,
            module: str = "nsoclip.main") -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS` plainly (nproc == 1) or under torchrun with nproc CPU ranks.

    torchrun's own `--logs-specs` makes `--logs` ambiguous to its parser: the `--` keeps our flags
    away from it (the README shows the same)."""
    if nproc == 1:
        command = [sys.executable, "-m", module, *map(str, args)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", "-m", module, "--", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=env or cpu_env(), cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


@pytest.fixture
def cli():
    return run_cli

