"""Training and validation data: the synthetic and csv sources, and the dispatch to webdataset.

Every source returns a `loader.DataInfo` (equal batch counts on every rank, exact mid-epoch
resume through `set_position`).

Map-style sources (synthetic, csv) draw each epoch's order from (seed, epoch) alone and hand rank r
the r-th slice of every global batch, so the sequence of global batches does not depend on the
world size: 2 ranks x B/2 see exactly what 1 rank x B sees, and a run can resume on another world
size. Random augmentations are seeded per sample from (seed, epoch, index) for the same reason.
"""
import csv
import logging
import os
import random
from typing import Dict, Optional

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .distributed import World
from .errors import NsoclipError
from .loader import DataInfo, Loader, collate_readable
from .rng import derive_seed
from .wds import get_wds_dataset


class DataError(NsoclipError, ValueError):
    """Training or validation data that cannot be read as asked (file, column, flag)."""


class GlobalBatchSampler(Sampler):
    """Yields this rank's slice of each global batch as (index, augmentation seed) pairs.

    Training: a fresh permutation per epoch from (seed, epoch), partial global batches dropped.
    Validation: dataset order, ranks take contiguous blocks, the partial last batch is kept."""

    def __init__(self, num_samples: int, batch_size: int, world: World, seed: int, train: bool):
        self.num_samples, self.batch_size, self.world = num_samples, batch_size, world
        self.seed, self.train = seed, train
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        if self.train:
            return self.num_samples // (self.batch_size * self.world.world_size)
        return -(-len(self.rank_block()) // self.batch_size)

    def rank_block(self):
        per_rank, extra = divmod(self.num_samples, self.world.world_size)
        start = self.world.rank * per_rank + min(self.world.rank, extra)
        return range(start, start + per_rank + (self.world.rank < extra))

    def __iter__(self):
        if self.train:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
                derive_seed(self.seed, self.epoch, "order"))).tolist()
            global_batch = self.batch_size * self.world.world_size
            for b in range(self.start_batch, len(self)):
                first = b * global_batch + self.world.rank * self.batch_size
                yield [(i, derive_seed(self.seed, self.epoch, i)) for i in order[first:first + self.batch_size]]
        else:
            block = list(self.rank_block())
            for first in range(0, len(block), self.batch_size):
                yield [(i, 0) for i in block[first:first + self.batch_size]]
        self.start_batch = 0


def seeded(transform, seed: int, image):
    """Apply a torchvision transform with its randomness fixed by `seed`. Torchvision draws from
    the CPU default generator; seeding only that one (not every device, as torch.manual_seed
    does) keeps this cheap, and restoring it leaves the caller's random stream untouched."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


class SyntheticDataset(Dataset):
    """Deterministic random images and captions: no files, for smoke tests and benchmarks."""

    def __init__(self, transform, tokenizer, image_size: int, num_samples: int):
        self.transform, self.tokenizer = transform, tokenizer
        self.image_size, self.num_samples = image_size, num_samples

    def __len__(self):
        return self.num_samples

    def __getitem__(self, item):
        index, seed = item
        rng = random.Random(index)
        pixels = rng.randbytes(3 * self.image_size * self.image_size)
        image = Image.frombytes("RGB", (self.image_size, self.image_size), pixels)
        caption = f"synthetic sample {index} of shade {rng.randrange(256)}"
        return seeded(self.transform, seed, image), self.tokenizer([caption])[0]


SEPARATORS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}


def separator_hint(columns, separator: str) -> str:
    """For a csv header the separator did not split: which separator it seems to use, as the
    --csv-separator to pass (OpenCLIP's default is a tab)."""
    if len(columns or []) != 1:
        return ""
    for candidate, name in SEPARATORS.items():
        if candidate != separator and candidate in columns[0]:
            shown = "$'\\t'" if candidate == "\t" else repr(candidate)
            return f"; the header looks {name}-separated: pass --csv-separator {shown}"
    return ""


class CsvDataset(Dataset):
    """OpenCLIP's csv format: one row per sample, an image path column and a caption column."""

    def __init__(self, path: str, transform, tokenizer, img_key: str, caption_key: str, sep: str,
                 skip_unreadable: bool = False):
        if not os.path.isfile(path):
            raise DataError(f"csv {path}: file not found")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
                if key not in columns:
                    raise DataError(f"csv {path}: no column {key!r} ({flag}); columns are {columns} "
                                    f"(separator {sep!r}, --csv-separator){separator_hint(columns, sep)}")
            rows = [(row[img_key], row[caption_key]) for row in reader]
        if not rows:
            raise DataError(f"csv {path}: no samples")
        root = os.path.dirname(os.path.abspath(path))
        self.samples = [(p if os.path.isabs(p) or os.path.exists(p) else os.path.join(root, p), c) for p, c in rows]
        self.path, self.transform, self.tokenizer = path, transform, tokenizer
        self.skip_unreadable = skip_unreadable

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item
        image_path, caption = self.samples[index]
        try:
            image = Image.open(image_path)
            image.load()
        except (OSError, ValueError) as error:
            message = f"csv {self.path}: row {index}: cannot read image {image_path} ({error})"
            if self.skip_unreadable:  # validation: scored without it (retrieval reports num_samples)
                logging.warning("%s: skipped", message)
                return None
            raise DataError(message) from None
        return seeded(self.transform, seed, image), self.tokenizer([caption])[0]


def image_size_of(preprocess) -> int:
    for transform in getattr(preprocess, "transforms", []):
        size = getattr(transform, "size", None)
        if size is not None:
            return size if isinstance(size, int) else size[0]
    raise DataError("cannot find the image size in the preprocessing transform")


def map_style_data(dataset, args, world: World, train: bool) -> DataInfo:
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, world, args.seed, train)
    if train and len(sampler) == 0:
        raise DataError(f"{len(dataset)} training samples make no full global batch of "
                        f"{args.batch_size} x {world.world_size} ranks: lower --batch-size")
    loader = Loader(dataset, batch_sampler=sampler, workers=args.workers, device=world.device,
                    collate_fn=None if train else collate_readable)
    return DataInfo(loader, num_batches=len(sampler), num_samples=len(dataset), set_position=sampler.set_position)


def dataset_type(args, path: Optional[str], train: bool) -> str:
    """--dataset-type, with `auto` read from the path. `synthetic` stands for the training data:
    a --val-data path given beside it is read as what it is."""
    if args.dataset_type == "synthetic" and (train or not path):
        return "synthetic"
    if args.dataset_type not in ("auto", "synthetic"):
        return args.dataset_type
    stem = path.split("::")[0]
    if stem.endswith((".csv", ".tsv")):
        return "csv"
    if ".tar" in stem:
        return "webdataset"
    raise DataError(f"cannot infer the dataset type of {path!r}: pass --dataset-type csv|webdataset")


def get_dataset(args, path: Optional[str], preprocess, tokenizer, world: World, train: bool, epoch: int) -> DataInfo:
    kind = dataset_type(args, path, train)
    if kind == "webdataset":
        return get_wds_dataset(args, preprocess, tokenizer, is_train=train, epoch=epoch, world=world)
    if kind == "synthetic":
        num_samples = args.train_num_samples if train else (args.val_num_samples or args.batch_size * world.world_size)
        dataset = SyntheticDataset(preprocess, tokenizer, image_size_of(preprocess), num_samples)
    else:
        dataset = CsvDataset(path, preprocess, tokenizer, args.csv_img_key, args.csv_caption_key, args.csv_separator,
                             skip_unreadable=not train)
    return map_style_data(dataset, args, world, train)


def get_data(args, preprocess_fns, tokenizer, world: World, epoch: int = 0) -> Dict[str, DataInfo]:
    """{"train": DataInfo, "val": DataInfo}, each present when its data was asked for."""
    preprocess_train, preprocess_val = preprocess_fns
    data = {}
    if args.train_data or args.dataset_type == "synthetic":
        data["train"] = get_dataset(args, args.train_data, preprocess_train, tokenizer, world, True, epoch)
    if args.val_data:
        data["val"] = get_dataset(args, args.val_data, preprocess_val, tokenizer, world, False, epoch)
    return data
