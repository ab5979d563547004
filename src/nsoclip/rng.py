"""Randomness that every rank and every restart agrees on: one seed derivation for all streams
(sample order, augmentations, shard order, NSO noise, Hessian probes), streams of random tensors
that do not depend on how a tensor is split over ranks, the global seeds of a run, and saving /
restoring the global generators around passes that must see the same dropout."""
import hashlib
import random
from typing import Callable, Dict, Optional

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings: equal in every process and Python run
    (unlike hash()), and unrelated for neighbouring tuples, so skipping one stream never shifts
    another."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# Elements per chunk of a stream. Every chunk has its own generator seed, so a rank holding any
# slice of a tensor draws only the chunks its slice touches: at most two chunks more than its own
# elements per tensor. On a GPU a chunk costs a kernel launch and a seeding (~10 us, estimated)
# while an element costs ~0.01 ns: large chunks (ViT-bigG-14 whole: 3,165 chunks; one of 64 FSDP2
# shards: 1,297 chunks and 17x its elements, a few ms of draws). On a CPU an element costs ~7 ns and
# a seeding 5 us (measured): small chunks, so a shard (FSDP2 with --fsdp-offload-cpu) draws little
# beyond itself (bigG over 64 ranks: 1.7x its elements instead of 17x) while a whole model spends
# 1% seeding. Streams of different device types differ anyway (their generators do).
STREAM_CHUNK = 1 << 20
CPU_STREAM_CHUNK = 1 << 16

Draw = Callable[[torch.Tensor, torch.Generator], object]  # fills its tensor in place from the generator


class Streams:
    """Random tensors as pure functions of a key: element k of the stream `key` over a tensor of
    `numel` elements is the same whichever slice [start, start + n) of it a rank asks for, on any
    number of ranks, given the same device type. Chunk c of the stream is drawn whole, at its own
    size, by a generator seeded from (key, c): the values of a chunk never depend on the slice
    (torch draws some sizes by another path, so a chunk is never drawn partially)."""

    def __init__(self, chunk: Optional[int] = None):
        self.chunk = chunk  # None: CPU_STREAM_CHUNK on the CPU, STREAM_CHUNK elsewhere
        self._generators: Dict[torch.device, torch.Generator] = {}

    def chunk_on(self, device: torch.device) -> int:
        if self.chunk is not None:
            return self.chunk
        return CPU_STREAM_CHUNK if device.type == "cpu" else STREAM_CHUNK

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def fill_(self, out: torch.Tensor, key: tuple, draw: Draw, start: int = 0, numel=None) -> torch.Tensor:
        """Overwrite `out` (any shape, read as flat) with elements [start, start + out.numel()) of
        the stream `key` over a tensor of `numel` elements (default: out's own)."""
        flat = out.view(-1)
        numel = flat.numel() if numel is None else numel
        end = start + flat.numel()
        generator = self.generator(out.device)
        chunk = self.chunk_on(out.device)
        position = start
        while position < end:
            index = position // chunk
            first, last = index * chunk, min((index + 1) * chunk, numel)
            stop = min(end, last)
            generator.manual_seed(derive_seed(*key, index))
            if position == first and stop == last:
                draw(flat[first - start:last - start], generator)
            else:
                whole = torch.empty(last - first, dtype=out.dtype, device=out.device)
                draw(whole, generator)
                flat[position - start:stop - start].copy_(whole[position - first:stop - first])
            position = stop
        return out


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
