"""WebDataset streaming on the webdataset 1.x API: (image, caption) tar shards, local or `pipe:`.

What OpenCLIP's loader does not give and this one does:
- every rank yields exactly `num_batches` full batches (DDP needs equal counts), even when its
  shards are short or hold bad samples: a stream that runs out of shards wraps around its list;
- everything random (shard order, sample shuffle, augmentations) is a function of
  (seed, epoch, rank, stream, batch), so runs are reproducible and a step checkpoint resumes
  the non-resampled epoch exactly (`set_position`);
- bad samples are skipped and counted per reason; bad inputs fail with one line naming the shard,
  and a stream with no valid sample at all fails instead of spinning forever.

Streams: each rank runs `max(workers, 1)` streams, one per dataloader worker. The DataLoader takes
batches from its workers round-robin, so global batch b of an epoch is batch b // W of stream
b % W. Resuming at batch k, worker w plays stream (w + k) % W and skips the batches of that
stream that precede k: the round-robin then hands out batches k, k+1, ... in the original order.
"""
import contextlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
from urllib.parse import urlparse

import braceexpand
import torch
import webdataset as wds
from PIL import Image

from .errors import NsoclipError
from .loader import DataInfo, Loader
from .rng import derive_seed

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
BAD_REASONS = ("missing_image", "missing_caption", "corrupt_image", "bad_caption", "truncated_tar",
               "duplicate_member")
SHUFFLE_BUFFER = 5000  # raw (still encoded) samples per worker, as OpenCLIP
SHUFFLE_INITIAL = 1000

log = logging.getLogger(__name__)


class WebDatasetError(NsoclipError, ValueError):
    """Shards, patterns or flags that cannot give a training stream; one line names the culprit."""


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed torch's and Python's global RNGs (which the open_clip transforms draw from) for one
    batch, restoring them afterwards so a main-process loader leaves training randomness alone."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


# ---------------------------------------------------------------- shard lists and epoch sizes

def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_sources(spec: str, flag: str):
    """'a/{0..9}.tar::pipe:cat b/{0..3}.tar' -> one url list per source."""
    sources = [list(braceexpand.braceexpand(part.strip())) for part in spec.split("::")]
    if any(not urls or not urls[0] for urls in sources):
        raise WebDatasetError(f"{flag} {spec!r}: empty source (check the '::' separators)")
    return sources


def check_local_shards(sources, flag: str):
    """Fail before training on a local shard that is missing, unreadable or not a tar archive."""
    for urls in sources:
        paths = [local_path(url) for url in urls if is_local(url)]
        if paths and not any(os.path.exists(path) for path in paths):
            raise WebDatasetError(f"{flag}: pattern expands to {len(paths)} paths and none exists "
                                  f"(first: {paths[0]})")
        for path in paths:
            if not os.path.exists(path):
                raise WebDatasetError(f"{flag}: shard {path} does not exist")
            if not os.path.isfile(path):
                raise WebDatasetError(f"{flag}: shard {path} is not a regular file")
            try:
                is_tar = tarfile.is_tarfile(path)
            except OSError as error:
                raise WebDatasetError(f"{flag}: shard {path} is unreadable ({error.strerror or error})") from None
            if not is_tar:
                raise WebDatasetError(f"{flag}: shard {path} is not a tar archive")


def shard_sizes(urls):
    """{url: samples} from the sizes.json beside local shards (OpenCLIP's format); None without one."""
    if not all(is_local(url) for url in urls):
        return None
    sizes_file = os.path.join(os.path.dirname(local_path(urls[0])), "sizes.json")
    if not os.path.isfile(sizes_file):
        return None
    with open(sizes_file) as handle:
        sizes = json.load(handle)
    missing = [url for url in urls if os.path.basename(local_path(url)) not in sizes]
    if missing:
        raise WebDatasetError(f"{sizes_file} has no entry for shard {missing[0]}")
    return {url: int(sizes[os.path.basename(local_path(url))]) for url in urls}


def dataset_size(sources, num_samples_flag: str) -> int:
    """Samples in all sources from sizes.json, or _info.json's '__len__' for a whole folder."""
    total = 0
    for urls in sources:
        sizes = shard_sizes(urls)
        info_file = os.path.join(os.path.dirname(local_path(urls[0])), "_info.json")
        if sizes is not None:
            total += sum(sizes.values())
        elif is_local(urls[0]) and os.path.isfile(info_file):
            with open(info_file) as handle:
                total += int(json.load(handle).get("__len__", 0))
        else:
            raise WebDatasetError(f"{num_samples_flag} is required: no sizes.json or _info.json beside "
                                  f"{urls[0]} (write shards with nsoclip-shards, or pass {num_samples_flag} N)")
    return total


def shard_weights(factors: str, sources):
    """Per-shard sampling weights: every shard of source i weighs factor i (OpenCLIP's meaning of
    --train-data-upsampling-factors), so a source's share also grows with its shard count."""
    if not factors:
        return [1.0 for urls in sources for _ in urls]
    try:
        values = [float(value) for value in factors.split("::")]
    except ValueError:
        raise WebDatasetError(f"--train-data-upsampling-factors {factors!r}: expected numbers joined by '::'") from None
    if len(values) != len(sources):
        raise WebDatasetError(f"--train-data-upsampling-factors {factors!r}: {len(values)} factors for "
                              f"{len(sources)} '::' sources in --train-data")
    if any(not value > 0 for value in values):
        raise WebDatasetError(f"--train-data-upsampling-factors {factors!r}: factors must be > 0")
    return [value for value, urls in zip(values, sources) for _ in urls]


def abbreviate(urls, keep: int = 3) -> str:
    shown = ", ".join(urls[:keep])
    return shown if len(urls) <= keep else f"{shown}, ... ({len(urls)} shards)"


# ---------------------------------------------------------------- bad-sample accounting

class BadSampleCounter:
    """Counts per reason in shared memory, so every worker of a rank adds to the same totals;
    logs the 1st, 10th, 100th, ... occurrence of each reason per process."""

    def __init__(self):
        self.counts = multiprocessing.Array("q", len(BAD_REASONS))
        self.seen_here = dict.fromkeys(BAD_REASONS, 0)

    def add(self, reason: str, where: str, detail: str = ""):
        with self.counts.get_lock():
            self.counts[BAD_REASONS.index(reason)] += 1
        self.seen_here[reason] += 1
        seen = self.seen_here[reason]
        if seen == 10 ** int(math.log10(seen)):
            log.warning("skipped bad sample (%s, occurrence %d in this process): %s %s", reason, seen, where, detail)

    def snapshot(self):
        with self.counts.get_lock():
            return dict(zip(BAD_REASONS, self.counts[:]))


class DeadStreamCheck:
    """Raise when a stream has read every one of its shards without one valid sample.

    The reader works in passes (one pass visits every shard of the stream at least once) and the
    shuffle buffer delays samples, so the verdict waits until every sample of a finished pass has
    been judged; one valid sample anywhere ends the watch."""

    def __init__(self, describe):
        self.describe = describe
        self.emitted, self.judged, self.finished = {}, {}, set()
        self.found_valid = False

    def emit(self, pass_index: int):
        self.emitted[pass_index] = self.emitted.get(pass_index, 0) + 1

    def finish(self, pass_index: int):
        self.finished.add(pass_index)
        self.check(pass_index)

    def judge(self, pass_index: int, valid: bool):
        if self.found_valid:
            return
        self.found_valid = valid
        self.judged[pass_index] = self.judged.get(pass_index, 0) + 1
        self.check(pass_index)

    def check(self, pass_index: int):
        if not self.found_valid and pass_index in self.finished \
                and self.judged.get(pass_index, 0) == self.emitted.get(pass_index, 0):
            raise WebDatasetError(self.describe())


# ---------------------------------------------------------------- the stream

class ShardStream(torch.utils.data.IterableDataset):
    """Batches of (images, tokens) from tar shards; one instance per rank, iterated by each worker."""

    def __init__(self, urls, *, preprocess, tokenizer, batch_size, seed, rank, world_size, train,
                 num_batches=0, resampled=False, weights=None, position=None, counter=None):
        self.urls, self.weights = urls, weights
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.train, self.resampled, self.num_batches = train, resampled, num_batches
        self.position = position
        self.counter = counter

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.train:
            epoch, start_batch = self.position[:]
            return self.train_batches(epoch, start_batch, worker, workers)
        return self.val_batches(worker, workers)

    # -- reading

    def shard_members(self, url):
        """Tar members of one shard, then webdataset's end-of-shard marker. A shard that cannot be
        opened or is no tar at all is an error; one that breaks off mid-way is a counted skip."""
        try:
            stream = wds.gopen(url, "rb")
        except OSError as error:
            raise WebDatasetError(f"rank {self.rank}: cannot open shard {url} ({error.strerror or error})") from None
        try:
            try:
                archive = tarfile.open(fileobj=stream, mode="r|*")
            except (tarfile.TarError, OSError) as error:  # OSError: e.g. a pipe: command that failed
                raise WebDatasetError(f"rank {self.rank}: cannot read shard {url} as a tar archive ({error})") from None
            try:
                for member in archive:
                    if member.isreg():
                        yield dict(fname=member.name, data=archive.extractfile(member).read(), __url__=url)
                    archive.members = []
            except (tarfile.TarError, OSError, EOFError) as error:
                self.counter.add("truncated_tar", url, str(error))
        finally:
            with contextlib.suppress(OSError):
                stream.close()
        yield {}

    def shard_samples(self, url):
        def duplicate(error):
            self.counter.add("duplicate_member", url, str(error))
            return True
        return wds.tariterators.group_by_keys(self.shard_members(url), handler=duplicate)

    def complete(self, samples, check=None):
        """Drop samples lacking an image or a caption member."""
        for sample in samples:
            reason = None
            if not any(key in sample for key in IMAGE_KEYS):
                reason = "missing_image"
            elif CAPTION_KEY not in sample:
                reason = "missing_caption"
            if reason:
                self.counter.add(reason, sample["__url__"], sample["__key__"])
                if check:
                    check.judge(sample["__pass__"], False)
            else:
                yield sample

    def decoded(self, samples, check=None):
        """(PIL image, caption) pairs; undecodable ones are counted and dropped."""
        for sample in samples:
            pair = self.decode(sample)
            if check:
                check.judge(sample["__pass__"], pair is not None)
            if pair is not None:
                yield pair

    def decode(self, sample):
        where = f"{sample['__url__']} {sample['__key__']}"
        try:
            caption = sample[CAPTION_KEY].decode("utf-8")
        except UnicodeDecodeError:
            self.counter.add("bad_caption", where)
            return None
        if not caption.strip():
            self.counter.add("missing_caption", where, "(empty caption)")
            return None
        data = next(sample[key] for key in IMAGE_KEYS if key in sample)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB"), caption
        except Exception as error:  # PIL raises many types on corrupt input; all mean the same here
            self.counter.add("corrupt_image", where, f"({type(error).__name__}: {error})")
            return None

    def collate(self, pairs, augment_seed=None):
        with seeded_rngs(augment_seed) if augment_seed is not None else contextlib.nullcontext():
            images = [self.preprocess(image) for image, _ in pairs]
        # default_collate stacks straight into shared memory inside a worker, saving the copy
        # torch would otherwise make to pass the batch to the main process.
        return torch.utils.data.default_collate(images), self.tokenizer([caption for _, caption in pairs])

    # -- training

    def passes(self, shards, rng):
        """(pass, urls) forever; a pass reads every shard of the stream at least once.
        Non-resampled: the stream's shards in order, again and again. Resampled: shards drawn
        with replacement by weight until each was drawn."""
        for pass_index in itertools.count():
            yield pass_index, (self.draw_until_all_seen(shards, rng) if self.resampled else shards)

    def draw_until_all_seen(self, shards, rng):
        remaining = set(shards)
        while remaining:
            url = rng.choices(self.urls, weights=self.weights)[0]
            remaining.discard(url)
            yield url

    def raw_samples(self, pass_index, urls, check):
        for url in urls:
            for sample in self.shard_samples(url):
                sample["__pass__"] = pass_index
                check.emit(pass_index)
                yield sample
        check.finish(pass_index)

    def train_batches(self, epoch, start_batch, worker, workers):
        stream = (worker + start_batch) % workers
        already_done = len(range(stream, start_batch, workers))
        to_yield = len(range(stream, self.num_batches, workers)) - already_done
        if to_yield <= 0:
            return
        if self.resampled:
            # No exact resume: a resumed epoch draws from a fresh stream seeded by its start batch.
            stream_seed = derive_seed(self.seed, epoch, start_batch, self.rank, stream)
            shards = self.urls
            skip_batches = 0
        else:
            stream_seed = derive_seed(self.seed, epoch, self.rank, stream)
            order = random.Random(derive_seed(self.seed, epoch, "shards")).sample(self.urls, len(self.urls))
            shards = order[self.rank::self.world_size][stream::workers]
            skip_batches = already_done
        check = DeadStreamCheck(lambda: (
            f"rank {self.rank} (dataloader worker {worker}) found no valid sample in its shards "
            f"{abbreviate(shards)}; bad samples: {self.counter.snapshot()}"))
        pass_rng, shuffle_rng = random.Random(stream_seed), random.Random(stream_seed + 1)
        # Each pass is shuffled on its own, so a wrapped-around stream never repeats a sample
        # before it has yielded all the others.
        pairs = itertools.chain.from_iterable(
            self.decoded(wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, rng=shuffle_rng)(
                self.complete(self.raw_samples(pass_index, urls, check), check)), check)
            for pass_index, urls in self.passes(shards, pass_rng))
        # Skipped samples are decoded all the same: whether a sample is valid is only known then,
        # and the resumed stream must count valid samples exactly as the first run did.
        for _ in itertools.islice(pairs, skip_batches * self.batch_size):
            pass
        for index in range(already_done, already_done + to_yield):
            batch = list(itertools.islice(pairs, self.batch_size))
            yield self.collate(batch, derive_seed(stream_seed, index, "augment"))

    # -- validation

    def val_batches(self, worker, workers):
        """Shards in the given order, split across workers; samples split across ranks inside each
        shard, so evaluation is distributed even with fewer shards than ranks. No shuffle; the
        last, partial batch of each worker is kept."""
        def owned_samples():
            for index, url in enumerate(self.urls):
                if index % workers != worker:
                    continue
                for position, sample in enumerate(self.shard_samples(url)):
                    if (index + position) % self.world_size == self.rank:
                        yield sample
        pairs = self.decoded(self.complete(owned_samples()))
        while batch := list(itertools.islice(pairs, self.batch_size)):
            yield self.collate(batch)


# ---------------------------------------------------------------- the DataInfo

class WebLoader:
    """The DataLoader as the training loop sees it: a length, and one-line errors from workers."""

    def __init__(self, loader, num_batches, num_samples):
        self.loader, self.num_batches, self.num_samples = loader, num_batches, num_samples

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        try:
            yield from self.loader
        except WebDatasetError as error:
            # A worker's exception arrives wrapped in its traceback; keep the one line that matters.
            line = str(error).strip().splitlines()[-1]
            raise WebDatasetError(line.split("WebDatasetError: ", 1)[-1]) from None


def val_batch_count(sizes, urls, batch_size, rank, world_size, workers) -> int:
    """Batches this rank's validation stream yields when no sample is bad (see val_batches)."""
    per_worker = [0] * workers
    for index, url in enumerate(urls):
        per_worker[index % workers] += len(range((rank - index) % world_size, sizes[url], world_size))
    return sum(math.ceil(count / batch_size) for count in per_worker)


def fit_to_reader(args, world, num_batches: int) -> None:
    """Settings on `args` for a reader of only the first `num_batches` batches per rank (the
    Hessian evaluator): without an epoch size (no --train/val-num-samples, no sizes.json) the
    epoch is those batches, and a rank gets no more dataloader workers than it has shards (with
    fewer shards than ranks, shards are drawn with replacement). Which samples come first does
    not depend on the epoch size; other data sources need nothing."""
    needed = num_batches * args.batch_size * world.world_size
    for path, count in (("train_data", "train_num_samples"), ("val_data", "val_num_samples")):
        spec = getattr(args, path)
        if not spec or args.dataset_type not in ("webdataset", "auto") or ".tar" not in spec.split("::")[0]:
            continue
        sources = expand_sources(spec, f"--{path.replace('_', '-')}")
        if getattr(args, count) is None:
            try:
                dataset_size(sources, f"--{count.replace('_', '-')}")
            except WebDatasetError:
                setattr(args, count, needed)
                log.info("--%s: reading %d batches per rank, an epoch of %d samples", count.replace("_", "-"),
                         num_batches, needed)
        if path == "train_data" and not args.dataset_resampled:
            shards_per_rank = sum(len(urls) for urls in sources) // world.world_size
            if shards_per_rank == 0:
                args.dataset_resampled = True
                log.info("--train-data: fewer shards than ranks, shards drawn with replacement")
            elif args.workers > shards_per_rank:
                log.info("--workers %d: %d per rank, one per shard of this rank", args.workers, shards_per_rank)
                args.workers = shards_per_rank


def get_wds_dataset(args, preprocess, tokenizer, *, is_train: bool, epoch: int, world) -> DataInfo:
    """The training (or validation) stream of this rank over --train-data (or --val-data)."""
    flag = "--train-data" if is_train else "--val-data"
    count_flag = "--train-num-samples" if is_train else "--val-num-samples"
    sources = expand_sources(args.train_data if is_train else args.val_data, flag)
    check_local_shards(sources, flag)
    urls = [url for source in sources for url in source]
    streams_per_rank = max(args.workers, 1)
    num_samples = (args.train_num_samples if is_train else args.val_num_samples) or dataset_size(sources, count_flag)
    counter = BadSampleCounter()
    common = dict(preprocess=preprocess, tokenizer=tokenizer, batch_size=args.batch_size, seed=args.seed,
                  rank=world.rank, world_size=world.world_size, counter=counter)
    extra = {}
    if is_train:
        resampled = args.dataset_resampled
        if not resampled and len(urls) < world.world_size * streams_per_rank:
            raise WebDatasetError(
                f"{flag}: {len(urls)} shards for {world.world_size} ranks x {streams_per_rank} workers; "
                "every worker needs a shard: add --dataset-resampled or use fewer --workers")
        global_batch = args.batch_size * world.world_size
        num_batches = num_samples // global_batch
        if num_batches == 0:
            raise WebDatasetError(f"{count_flag} {num_samples}: fewer samples than one global batch "
                                  f"({args.batch_size} x {world.world_size} ranks)")
        num_samples = num_batches * global_batch
        position = multiprocessing.Array("q", [epoch, 0])
        weights = shard_weights(args.train_data_upsampling_factors, sources) if resampled else None
        dataset = ShardStream(urls, train=True, num_batches=num_batches, resampled=resampled, weights=weights,
                              position=position, **common)

        def set_position(epoch: int, start_batch: int = 0):
            if not 0 <= start_batch <= num_batches:
                raise WebDatasetError(f"resume position {start_batch} outside the epoch's {num_batches} batches")
            position[:] = [epoch, start_batch]
        extra["set_position"] = set_position
    else:
        sizes = {}
        for source in sources:
            sizes.update(shard_sizes(source) or {})
        if all(url in sizes for url in urls):
            num_batches = val_batch_count(sizes, urls, args.batch_size, world.rank, world.world_size,
                                          streams_per_rank)
        else:
            num_batches = math.ceil(num_samples / world.world_size / args.batch_size)
        dataset = ShardStream(urls, train=False, **common)

    loader = Loader(dataset, batch_size=None, shuffle=False, workers=args.workers, device=world.device)
    return DataInfo(dataloader=WebLoader(loader, num_batches, num_samples), num_batches=num_batches,
                    num_samples=num_samples, bad_sample_counts=counter.snapshot, **extra)
