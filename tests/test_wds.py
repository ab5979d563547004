"""The webdataset pipeline: shard splitting, epoch sizes, upsampling, resume, bad data, errors.

Samples carry their identity: the caption is "<source> <index>" and the image's first pixel
encodes the index, so stand-in transforms turn every batch into ids (and prove pairs stay paired)."""
import gc
import io
import math
import multiprocessing
import tarfile
import time
from collections import Counter

import open_clip
import pytest
import torch
from PIL import Image

from helpers import run_cli
from nsoclip.distributed import World
from nsoclip.model import resolve_model_name
from nsoclip.params import parse_args
from nsoclip.wds import WebDatasetError, get_wds_dataset


# ---------------------------------------------------------------- fixtures and helpers

def png(index: int, source: str = "a") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (index % 256, index // 256, ord(source))).save(buffer, format="PNG")
    return buffer.getvalue()


def members_of(index: int, source: str = "a", image=True, caption=True):
    members = []
    if image:
        members.append((f"{index:06d}.png", png(index, source)))
    if caption:
        members.append((f"{index:06d}.txt", f"{source} {index}".encode()))
    return members


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_source(folder, counts, source="a", sizes=True):
    """Shards of good samples with consecutive indices; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard, count in enumerate(counts):
        write_tar(folder / f"{shard:04d}.tar",
                  [m for i in range(index, index + count) for m in members_of(i, source)])
        index += count
    if sizes:
        (folder / "sizes.json").write_text(str({f"{s:04d}.tar": c for s, c in enumerate(counts)}).replace("'", '"'))
    return str(folder / f"{{0000..{len(counts) - 1:04d}}}.tar")


def first_pixel(image):
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


def caption_ids(captions):
    return torch.tensor([[ord(c.split()[0]), int(c.split()[1])] for c in captions])


def args_for(**flags):
    argv = ["--dataset-type", "webdataset"]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parse_args(argv)


def loader(args, rank=0, world_size=1, epoch=0, is_train=True, preprocess=first_pixel, tokenizer=caption_ids):
    return get_wds_dataset(args, preprocess, tokenizer, is_train=is_train, epoch=epoch,
                           world=World(rank=rank, world_size=world_size))


def epoch_ids(info, epoch=0, start_batch=0):
    """[(source, index), ...] per batch, checking every image still goes with its caption."""
    info.set_position(epoch, start_batch)
    batches = []
    for images, texts in info.dataloader:
        assert torch.equal(images[:, 0] + 256 * images[:, 1], texts[:, 1].float()), "image/caption pairs mixed up"
        batches.append([(chr(s), i) for s, i in texts.tolist()])
    return batches


@pytest.fixture(scope="module")
def tiny_transforms():
    name = resolve_model_name("tests/configs/tiny-vit.json")
    _, preprocess_train, _ = open_clip.create_model_and_transforms(name)
    return preprocess_train, open_clip.get_tokenizer(name)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("factors", ["1::1", "1::2"])
def test_upsampling_factors_set_source_frequencies(tmp_path, factors):
    a = write_source(tmp_path / "a", [4], "a")
    b = write_source(tmp_path / "b", [4], "b")
    args = args_for(train_data=f"{a}::{b}", train_data_upsampling_factors=factors, dataset_resampled=True,
                    train_num_samples=2400, batch_size=8, workers=0)
    sources = Counter(s for batch in epoch_ids(loader(args)) for s, _ in batch)
    weight_a, weight_b = map(float, factors.split("::"))
    expected = weight_b / (weight_a + weight_b)
    shard_draws = 2400 / 4  # whole shards are drawn, so the noise is that of 600 Bernoulli draws
    bound = 4.5 * math.sqrt(expected * (1 - expected) / shard_draws)
    assert sum(sources.values()) == 2400
    assert abs(sources["b"] / 2400 - expected) < bound, (sources, expected, bound)


def test_non_resampled_ranks_are_disjoint_and_cover_each_sample_once(tmp_path):
    a = write_source(tmp_path / "a", [6, 6, 6, 6], "a")
    b = write_source(tmp_path / "b", [6, 6, 6, 6], "b")
    args = args_for(train_data=f"{a}::{b}", batch_size=3, workers=2)  # epoch size from sizes.json
    per_rank = []
    for rank in range(2):
        info = loader(args, rank=rank, world_size=2)
        assert info.num_batches == 8 and info.num_samples == 48
        batches = epoch_ids(info)
        assert len(batches) == 8 and all(len(batch) == 3 for batch in batches)
        per_rank.append([sample for batch in batches for sample in batch])
    assert not set(per_rank[0]) & set(per_rank[1])
    everything = Counter(per_rank[0] + per_rank[1])
    assert everything == Counter([("a", i) for i in range(24)] + [("b", i) for i in range(24)])


def test_every_rank_yields_the_same_number_of_full_batches_with_unequal_shards(tmp_path):
    spec = write_source(tmp_path / "a", [1, 2, 9, 3, 11, 4], "a")
    args = args_for(train_data=spec, train_num_samples=40, batch_size=4, workers=2)
    for epoch in range(2):
        for rank in range(2):
            info = loader(args, rank=rank, world_size=2)
            batches = epoch_ids(info, epoch)
            assert info.num_batches == 5
            assert [len(batch) for batch in batches] == [4] * 5


def test_same_seed_same_order_new_epoch_or_seed_new_order(tmp_path):
    spec = write_source(tmp_path / "a", [8, 8, 8, 8], "a")
    args = args_for(train_data=spec, batch_size=4, workers=2, seed=3)
    first = epoch_ids(loader(args))
    assert epoch_ids(loader(args)) == first
    assert epoch_ids(loader(args), epoch=1) != first
    assert sorted(map(sorted, epoch_ids(loader(args), epoch=1))) != sorted(map(sorted, first))
    assert epoch_ids(loader(args_for(train_data=spec, batch_size=4, workers=2, seed=4))) != first


# ---------------------------------------------------------------- resuming

def test_resume_mid_epoch_yields_exactly_the_remaining_batches(tmp_path, tiny_transforms):
    """Augmentations included: the resumed run sees the very same tensors."""
    preprocess, tokenizer = tiny_transforms
    spec = write_source(tmp_path / "a", [7, 5, 6, 8], "a")
    args = args_for(train_data=spec, batch_size=2, workers=2, seed=1)
    info = loader(args, epoch=1, preprocess=preprocess, tokenizer=tokenizer)
    info.set_position(1, 0)
    full = list(info.dataloader)
    assert len(full) == info.num_batches == 13
    for start in (3, 8):
        resumed = loader(args, epoch=1, preprocess=preprocess, tokenizer=tokenizer)  # a fresh process's view
        resumed.set_position(1, start)
        rest = list(resumed.dataloader)
        assert len(rest) == len(full) - start
        for (images, texts), (want_images, want_texts) in zip(rest, full[start:]):
            assert torch.equal(texts, want_texts) and torch.equal(images, want_images)


def test_resampled_resume_reseeds_instead_of_replaying(tmp_path):
    spec = write_source(tmp_path / "a", [16, 16], "a")
    args = args_for(train_data=spec, dataset_resampled=True, train_num_samples=64, batch_size=4, workers=0)
    full = epoch_ids(loader(args), epoch=2)
    rest = epoch_ids(loader(args), epoch=2, start_batch=6)
    assert len(rest) == len(full) - 6 == 10
    assert rest != full[:10] and rest != full[6:]


# ---------------------------------------------------------------- bad data

def bad_shards(folder):
    """Two shards, each with 4 good samples and each kind of bad one."""
    folder.mkdir()
    first = members_of(0) + [("000001.png", b"not an image"), ("000001.txt", b"a 1")] \
        + members_of(2) + members_of(3, caption=False) + members_of(4) + members_of(5)
    second = members_of(10) + members_of(11, image=False) + members_of(12) + members_of(13) \
        + [("000014.txt", b"a 14"), ("000014.png", b"\xff" * 9)] + members_of(15) + members_of(16)
    write_tar(folder / "0000.tar", first)
    path = write_tar(folder / "0001.tar", second)
    data = open(path, "rb").read()
    cut = data.index(b"000016.png") + 512 + 40  # inside the last image's data
    open(path, "wb").write(data[:cut])
    return str(folder / "{0000..0001}.tar"), [0, 2, 4, 5, 10, 12, 13, 15]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    spec, good = bad_shards(tmp_path / "shards")
    val = loader(args_for(val_data=spec, val_num_samples=8, batch_size=3, workers=2), is_train=False)
    seen = [i for batch in epoch_ids(val) for _, i in batch]
    assert sorted(seen) == good
    assert val.bad_sample_counts() == {"missing_image": 1, "missing_caption": 1, "corrupt_image": 2,
                                       "bad_caption": 0, "truncated_tar": 1, "duplicate_member": 0}
    train = loader(args_for(train_data=spec, train_num_samples=32, batch_size=4, workers=2))
    seen = [i for batch in epoch_ids(train) for _, i in batch]
    assert len(seen) == 32 and set(seen) == set(good)  # each stream wraps around its shard 4 times
    counts = train.bad_sample_counts()
    assert counts["truncated_tar"] >= 3 and counts["missing_image"] >= 3 and counts["missing_caption"] >= 3
    assert counts["corrupt_image"] >= 6


def test_rank_without_valid_samples_fails_fast_naming_rank_and_shards(tmp_path):
    folder = tmp_path / "shards"
    write_source(folder, [4, 4], "a")
    write_tar(folder / "0001.tar", [(f"{i:06d}.png", b"garbage") for i in range(4)]
              + [(f"{i:06d}.txt", b"a 1") for i in range(4)])
    args = args_for(train_data=str(folder / "{0000..0001}.tar"), train_num_samples=16, batch_size=2, workers=1)
    failures = []
    start = time.monotonic()
    for rank in range(2):
        info = loader(args, rank=rank, world_size=2)
        try:
            assert len(epoch_ids(info)) == info.num_batches
        except WebDatasetError as error:
            failures.append((rank, str(error)))
    assert time.monotonic() - start < 60
    assert len(failures) == 1, failures
    rank, message = failures[0]
    assert f"rank {rank}" in message and "0001.tar" in message and "no valid sample" in message
    assert "\n" not in message  # the worker's traceback is stripped to the one line
    del info
    gc.collect()  # the failed iterator is garbage in a cycle: its shutdown must end its worker
    assert multiprocessing.active_children() == [], "a worker outlived its iterator (Python's exit would hang)"


def test_resampled_stream_of_only_bad_shards_fails(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(3):
        write_tar(folder / f"{shard}.tar", members_of(0, image=False) + members_of(1, caption=False))
    args = args_for(train_data=str(folder / "{0..2}.tar"), dataset_resampled=True, train_num_samples=8,
                    batch_size=2, workers=0)
    with pytest.raises(WebDatasetError, match=r"rank 0 .*no valid sample"):
        epoch_ids(loader(args))


# ---------------------------------------------------------------- bad inputs: one line before training

def bad_input_cases(tmp_path):
    good = write_source(tmp_path / "good", [4, 4], "a")
    (tmp_path / "text.tar").write_text("this is not a tar archive\n" * 40)
    (tmp_path / "folder.tar").mkdir()
    nosizes = write_source(tmp_path / "nosizes", [4], "a", sizes=False)
    return {
        "no file": (dict(train_data=str(tmp_path / "missing/{0..3}.tar"), train_num_samples=8),
                    "none exists"),
        "one missing": (dict(train_data=str(tmp_path / "good/{0000..0002}.tar"), train_num_samples=8),
                        "0002.tar does not exist"),
        "not a tar": (dict(train_data=f"{good}::{tmp_path / 'text.tar'}", train_num_samples=8),
                      "text.tar is not a tar"),
        "unreadable": (dict(train_data=str(tmp_path / "folder.tar"), train_num_samples=8, workers=1),
                       "folder.tar is not a regular file"),
        "few shards": (dict(train_data=good, workers=2, world_size=2), "--dataset-resampled"),
        "no sizes": (dict(train_data=nosizes), "--train-num-samples is required"),
        "factors": (dict(train_data=good, dataset_resampled=True, train_data_upsampling_factors="1::2"),
                    "2 factors for 1"),
        "tiny epoch": (dict(train_data=good, train_num_samples=3, batch_size=4), "fewer samples than one global batch"),
    }


@pytest.mark.parametrize("case", ["no file", "one missing", "not a tar", "unreadable", "few shards", "no sizes",
                                  "factors", "tiny epoch"])
def test_bad_inputs_fail_before_training_with_one_line(tmp_path, case):
    flags, expected = bad_input_cases(tmp_path)[case]
    world_size = flags.pop("world_size", 1)
    flags.setdefault("workers", 0)
    flags.setdefault("batch_size", 2)
    with pytest.raises(WebDatasetError) as raised:
        loader(args_for(**flags), world_size=world_size)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_pipe_urls_stream_and_a_failing_pipe_names_the_shard(tmp_path):
    spec = write_source(tmp_path / "a", [4, 4], "a")
    args = args_for(train_data=f"pipe:cat {spec}", train_num_samples=8, batch_size=2, workers=0)
    seen = sorted(i for batch in epoch_ids(loader(args)) for _, i in batch)
    assert seen == list(range(8))
    broken = args_for(train_data=f"pipe:cat {tmp_path}/nothing.tar", train_num_samples=8, batch_size=2, workers=0)
    with pytest.raises(WebDatasetError, match="cannot read shard pipe:cat .*nothing.tar"):
        epoch_ids(loader(broken))


def test_info_json_gives_the_epoch_size(tmp_path):
    spec = write_source(tmp_path / "a", [4, 4, 4], "a", sizes=False)
    (tmp_path / "a" / "_info.json").write_text('{"__len__": 12}')
    info = loader(args_for(train_data=spec, batch_size=2, workers=0))
    assert info.num_samples == 12 and info.num_batches == 6


# ---------------------------------------------------------------- validation

def test_validation_splits_samples_across_ranks_keeps_partial_batches(tmp_path):
    spec = write_source(tmp_path / "v", [5, 5, 5], "v")
    args = args_for(val_data=spec, batch_size=4, workers=2)
    seen = []
    for rank in range(2):
        info = loader(args, rank=rank, world_size=2, is_train=False)
        batches = epoch_ids(info)
        assert len(batches) == info.num_batches
        assert any(len(batch) < 4 for batch in batches)
        seen.append([i for batch in batches for _, i in batch])
        assert epoch_ids(info) == batches  # no shuffle: the same order every time
    assert abs(len(seen[0]) - len(seen[1])) <= 3
    assert sorted(seen[0] + seen[1]) == list(range(15))


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_train_two_ranks_on_shards(tmp_path, tiny_config):
    spec = write_source(tmp_path / "shards", [8, 8, 8, 8], "a")
    run_cli(["--dataset-type", "webdataset", "--train-data", spec, "--train-num-samples", 32,
             "--model", tiny_config, "--batch-size", 4, "--epochs", 1, "--workers", 1, "--device", "cpu",
             "--precision", "fp32", "--local-loss", "--gather-with-grad", "--logs", tmp_path / "logs",
             "--name", "run", "--warmup", 1], nproc=2)
    assert (tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt").is_file()
