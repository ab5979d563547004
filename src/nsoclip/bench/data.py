"""Webdataset loader throughput against its bound: W workers should reach W times what one process
does when it only reads, decodes, augments, tokenises and stacks the same tar members.

    python -m nsoclip.bench data [--workers 1 2] [--samples 1024] [--repeats 3]

Shards of synthetic JPEGs are written to a temporary folder. The bare loop and the loaders run in
turns (bare, W=1, W=2, bare, ...) so load from other processes hits all of them alike; each
repeat's ratio is loader samples/s / (W x bare samples/s) of the same repeat. On a machine with
fewer free cores than W that bound cannot be reached by anything, so the benchmark also runs W
bare loops side by side (forked processes, the shards split between them) and reports the
loader against that: the pipeline's own overhead under the same contention. Least sensitive to
load is CPU time per sample (the loader's: main process plus its workers, read from /proc, so
Linux only): `cpu_ratio` = bare CPU/sample over loader CPU/sample, 1.0 when the pipeline costs
nothing beyond the work itself."""
import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import statistics
import tarfile
import tempfile
import time
import types

import numpy as np
import open_clip
import torch
from PIL import Image

from ..distributed import World
from ..shards import write_shards
from ..wds import IMAGE_KEYS, get_wds_dataset


def synthetic_jpegs(count: int, size: int, seed: int = 0):
    """Smooth gradients plus noise: JPEGs that cost about what photos of that size cost to decode."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for index in range(count):
        base = (ramp[None, :, None] * rng.uniform(0.2, 1.0, 3) + ramp[:, None, None] * rng.uniform(0.0, 0.5, 3))
        pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        yield buffer.getvalue(), f"synthetic photo number {index} with a {['red', 'green', 'blue'][index % 3]} tint"


def children_cpu_seconds() -> float:
    """CPU time used so far by this process's live children (the dataloader workers)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as handle:
            pids.update(handle.read().split())
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def bare_loop(shards, preprocess, tokenizer, batch_size: int):
    """(samples, samples/s, CPU s/sample) of one process doing the loader's work with no
    pipeline around it."""
    start, cpu_start, done, batch = time.perf_counter(), time.process_time(), 0, []
    for shard in shards:
        with tarfile.open(shard, mode="r|") as tar:
            sample = {}
            for member in tar:
                key, extension = member.name.split(".", 1)
                sample[extension] = tar.extractfile(member).read()
                if "txt" in sample and any(k in sample for k in IMAGE_KEYS):
                    data = next(sample[k] for k in IMAGE_KEYS if k in sample)
                    with Image.open(io.BytesIO(data)) as image:
                        batch.append((image.convert("RGB"), sample["txt"].decode("utf-8")))
                    sample = {}
                if len(batch) == batch_size:
                    torch.stack([preprocess(image) for image, _ in batch]), tokenizer([c for _, c in batch])
                    done, batch = done + len(batch), []
    return done, done / (time.perf_counter() - start), (time.process_time() - cpu_start) / done


def parallel_bare_loops(shards, preprocess, tokenizer, batch_size: int, processes: int) -> float:
    """Samples/s of `processes` bare loops at once, each on its share of the shards."""
    context = multiprocessing.get_context("fork")
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        runs = [pool.submit(bare_loop, shards[i::processes], preprocess, tokenizer, batch_size)
                for i in range(processes)]
        done = sum(run.result()[0] for run in runs)
    return done / (time.perf_counter() - start)


def loader_epoch(info, epoch: int):
    """(samples/s, CPU s/sample of the main process and all workers) over one epoch."""
    info.set_position(epoch, 0)
    start, cpu_start, workers_start, done = time.perf_counter(), time.process_time(), children_cpu_seconds(), 0
    for images, _ in info.dataloader:
        done += len(images)
    cpu = time.process_time() - cpu_start + children_cpu_seconds() - workers_start
    return done / (time.perf_counter() - start), cpu / done


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench data")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=1024, help="Samples per measurement.")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="Model input (RandomResizedCrop) size.")
    parser.add_argument("--source-size", type=int, default=256, help="Stored JPEG size.")
    parser.add_argument("--repeats", type=int, default=3)
    flags = parser.parse_args(argv)
    torch.set_num_threads(1)
    preprocess = open_clip.image_transform(flags.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    with tempfile.TemporaryDirectory() as folder:
        write_shards(synthetic_jpegs(flags.samples, flags.source_size), folder,
                     maxcount=-(-flags.samples // flags.shards))
        shards = sorted(f"{folder}/{name}" for name in json.load(open(f"{folder}/sizes.json")))
        pattern = f"{folder}/shard-{{000000..{len(shards) - 1:06d}}}.tar"
        loaders = {}
        for workers in flags.workers:
            args = types.SimpleNamespace(train_data=pattern, train_num_samples=flags.samples,
                                         batch_size=flags.batch_size, workers=workers, seed=0,
                                         dataset_resampled=False, train_data_upsampling_factors=None)
            loaders[workers] = get_wds_dataset(args, preprocess, tokenizer, is_train=True, epoch=0, world=World())
            loader_epoch(loaders[workers], 0)  # starts the persistent workers
        bare, bare_cpu, rates, cpu = [], [], {w: [] for w in flags.workers}, {w: [] for w in flags.workers}
        side_by_side = {workers: [] for workers in flags.workers}
        for repeat in range(flags.repeats):
            _, rate, cpu_per_sample = bare_loop(shards, preprocess, tokenizer, flags.batch_size)
            bare.append(rate)
            bare_cpu.append(cpu_per_sample)
            for workers, info in loaders.items():
                rate, cpu_per_sample = loader_epoch(info, repeat + 1)
                rates[workers].append(rate)
                cpu[workers].append(cpu_per_sample)
                side_by_side[workers].append(
                    parallel_bare_loops(shards, preprocess, tokenizer, flags.batch_size, workers))

    result = {"benchmark": "data", "samples": flags.samples, "batch_size": flags.batch_size,
              "image_size": flags.image_size, "source_size": flags.source_size, "repeats": flags.repeats,
              "bare_samples_per_s": [round(rate, 1) for rate in bare],
              "bare_cpu_ms_per_sample": [round(1000 * c, 2) for c in bare_cpu], "loader": {}}
    for workers, measured in rates.items():
        ratios = [rate / (workers * base) for rate, base in zip(measured, bare)]
        fair = [rate / base for rate, base in zip(measured, side_by_side[workers])]
        result["loader"][str(workers)] = {
            "samples_per_s": [round(rate, 1) for rate in measured],
            "ratio_to_bound": [round(ratio, 3) for ratio in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
            "side_by_side_bare_samples_per_s": [round(rate, 1) for rate in side_by_side[workers]],
            "ratio_to_side_by_side": [round(ratio, 3) for ratio in fair],
            "ratio_to_side_by_side_median": round(statistics.median(fair), 3),
            "cpu_ms_per_sample": [round(1000 * c, 2) for c in cpu[workers]],
            "cpu_ratio_median": round(statistics.median(b / c for b, c in zip(bare_cpu, cpu[workers])), 3)}
    print(json.dumps(result))
    return 0
