"""Randomness that every rank and every restart agrees on: one seed derivation for all streams
(sample order, augmentations, shard order, NSO noise, Hessian probes), the global seeds of a run,
and saving / restoring the global generators around passes that must see the same dropout."""
import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings: equal in every process and Python run
    (unlike hash()), and unrelated for neighbouring tuples, so skipping one stream never shifts
    another."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int, rank: int = 0) -> None:
    """OpenCLIP's seeding of torch, numpy and Python's global generators."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def capture_rng(cuda_devices):
    return torch.get_rng_state(), [(device, torch.cuda.get_rng_state(device)) for device in cuda_devices]


def restore_rng(state) -> None:
    cpu_state, cuda_states = state
    torch.set_rng_state(cpu_state)
    for device, device_state in cuda_states:
        torch.cuda.set_rng_state(device_state, device)
