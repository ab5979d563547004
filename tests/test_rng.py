"""Random streams that do not depend on how a tensor is split: any slice equals the same slice of
the whole draw, for every distribution NSO uses, across chunk boundaries and for tiny tensors."""
import pytest
import torch

from nsoclip.nso import noise_draw
from nsoclip.rng import Streams, derive_seed


@pytest.mark.parametrize("distribution", ["normal", "laplace", "uniform"])
@pytest.mark.parametrize("numel", [5, 37, 1000])
def test_any_slice_equals_the_slice_of_the_whole_draw(distribution, numel):
    streams = Streams(chunk=16)
    draw = noise_draw(distribution, 0.5)
    whole = streams.fill_(torch.empty(numel), (7, "key"), draw)
    for start, stop in ((0, numel), (0, 1), (3, min(numel, 19)), (numel // 2, numel), (numel - 1, numel)):
        part = streams.fill_(torch.empty(stop - start), (7, "key"), draw, start=start, numel=numel)
        assert torch.equal(part, whole[start:stop]), (start, stop)
    assert not torch.equal(whole, streams.fill_(torch.empty(numel), (8, "key"), draw))


def test_chunks_are_independent_streams():
    """A tensor's chunks come from unrelated seeds, so no two chunks repeat each other."""
    values = Streams(chunk=64).fill_(torch.empty(256), (0,), noise_draw("normal", 1.0)).view(4, 64)
    assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i + 1, 4))
    assert abs(values.std().item() - 1.0) < 0.15


def test_seeds_are_stable_and_distinct():
    assert derive_seed(5, 0, 0, 1) == derive_seed(5, 0, 0, 1)
    assert len({derive_seed(5, a, b) for a in range(10) for b in range(10)}) == 100
    assert 0 <= derive_seed("x") < 2 ** 63
