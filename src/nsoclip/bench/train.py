"""Our training loop timed side by side in one process, in one of two comparisons:

- default: our AdamW loop against OpenCLIP's (`open_clip_train.train.train_one_epoch`, shipped in
  the open_clip_torch wheel): same model config and initial weights, synthetic data through each
  project's own data pipeline, same batch, precision and optimizer;
- `--compile`: our loop eager against our loop under --torchcompile, for AdamW and for NSO (k=1,
  two-point, lam=0), four arms on the same initial weights and synthetic data.

The arms run in turn, one short epoch of --steps optimizer steps each, for --rounds rounds (the
order rotates every round); the first round is warm-up (and, compiled, the compilation). Each
figure is the median over rounds of the ratio of two arms' epoch times, so load that comes and
goes on a shared machine hits both sides alike.

`--replay-batches N` times the loops without their data pipelines: each arm's pipeline builds N
batches once, which every epoch replays from the device. On a GPU, 224-px synthetic images
decoded and augmented on the CPU cannot keep up with a ViT-B-32 step, and a figure of the
pipelines would hide the loops (and any compile speed-up).

    python -m nsoclip.bench train [--model CONFIG.json|NAME] [--batch-size 32] [--steps 8] [--rounds 7]
    python -m nsoclip.bench train --compile [--compile-backend inductor] [--compile-mode MODE]
"""
import argparse
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from torch._dynamo.utils import counters

from ..data import get_data as nsoclip_data
from ..distributed import World
from ..loader import DataInfo
from ..loss import create_loss
from ..model import DEFAULT_COMPILE_BACKEND, compile_options, resolve_model_name
from ..optim import create_optimizer, parameter_groups
from ..parallel import distribute
from ..params import parse_args as nsoclip_flags
from ..precision import grad_scaler
from ..scheduler import LRSchedule
from ..train import Run, train_one_epoch as nsoclip_epoch

BENCH_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def shared_flags(args, model_name, samples):
    return ["--dataset-type", "synthetic", "--train-num-samples", str(samples), "--model", model_name,
            "--batch-size", str(args.batch_size), "--epochs", "1000", "--workers", str(args.workers),
            "--precision", args.precision, "--lr", "1e-4", "--warmup", "10", "--log-every-n-steps",
            str(10 ** 6), "--seed", "0", "--device", args.device]


def build_model(name, device, precision):
    torch.manual_seed(0)
    return open_clip.create_model_and_transforms(name, precision=precision, device=device, output_dict=True)


class SilentMetrics:
    writer = None

    def log_train(self, *args, **kwargs):
        pass


class Replay:
    """A few batches of a data pipeline, built once and moved to the device, replayed as every
    epoch's `args.steps` batches; it has the attributes both projects' loops read."""

    def __init__(self, loader, args):
        device = torch.device(args.device)
        self.batches = [tuple(t.to(device) for t in batch) for batch in itertools.islice(loader, args.replay_batches)]
        self.num_batches, self.num_samples = args.steps, args.steps * args.batch_size

    def __iter__(self):
        return itertools.islice(itertools.cycle(self.batches), self.num_batches)


def nsoclip_epoch_runner(args, name, samples, extra=()):
    flags = nsoclip_flags(shared_flags(args, name, samples) + list(extra))
    world = World(device=torch.device(args.device))
    model, preprocess_train, preprocess_val = build_model(name, world.device, args.precision)
    data = nsoclip_data(flags, (preprocess_train, preprocess_val), open_clip.get_tokenizer(name), world)["train"]
    if args.replay_batches:
        data = DataInfo(dataloader=Replay(data.dataloader, args), num_batches=args.steps, num_samples=samples)
    layout = distribute(model, world, compile=compile_options(flags))
    optimizer = create_optimizer(flags, model, layout)
    run = Run(args=flags, world=world, model=model, layout=layout, loss=create_loss(flags, world, model),
              optimizer=optimizer, scaler=grad_scaler(args.precision, world.device),
              schedule=LRSchedule(optimizer, flags, data.num_batches), checkpoints=None, metrics=SilentMetrics())
    epochs = iter(range(10 ** 6))
    return lambda: nsoclip_epoch(run, data, next(epochs))


def open_clip_epoch_runner(args, name, samples):
    from open_clip_train.data import DataInfo as OpenClipDataInfo, get_data
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    flags = parse_args(shared_flags(args, name, samples))
    # What open_clip_train.main.main derives from the flags before it trains.
    flags.distributed, flags.world_size, flags.rank, flags.local_rank = False, 1, 0, 0
    flags.distill, flags.wandb, flags.save_logs, flags.horovod = False, False, False, False
    model, preprocess_train, preprocess_val = build_model(name, torch.device(args.device), args.precision)
    data = get_data(flags, (preprocess_train, preprocess_val), epoch=0, tokenizer=open_clip.get_tokenizer(name))
    if args.replay_batches:
        data["train"] = OpenClipDataInfo(dataloader=Replay(data["train"].dataloader, args))
    optimizer = torch.optim.AdamW(parameter_groups(model, flags.wd), lr=flags.lr,
                                  betas=(flags.beta1, flags.beta2), eps=flags.eps)
    scaler = torch.amp.GradScaler(args.device) if args.precision == "amp" else None
    scheduler = cosine_lr(optimizer, flags.lr, flags.warmup, data["train"].dataloader.num_batches * flags.epochs)
    loss = open_clip.ClipLoss()
    epochs = iter(range(10 ** 6))
    return lambda: train_one_epoch(model, data, loss, next(epochs), optimizer, scaler, scheduler, None, flags)


def timed(run_epoch, device):
    start = time.perf_counter()
    run_epoch()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(arms, rounds, device, steps, first_round=0) -> dict:
    """Per-step seconds of every arm in every round; the order rotates each round."""
    names = list(arms)
    times = {name: [] for name in names}
    for round_index in range(first_round, first_round + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(arms[name], device) / steps)
    return times


def median_ratio(times, slow: str, fast: str) -> float:
    """Median over the timed rounds of time(slow) / time(fast): > 1 when `fast` is faster."""
    return statistics.median(s / f for s, f in zip(times[slow][1:], times[fast][1:]))


def compile_comparison(args, name, samples) -> dict:
    compiled = ["--torchcompile", "--torchcompile-backend", args.compile_backend]
    if args.compile_mode:
        compiled += ["--torchcompile-mode", args.compile_mode]
    arms = {label: nsoclip_epoch_runner(args, name, samples, ["--opt", opt] + (compiled if on else []))
            for label, opt, on in (("adamw", "adamw", False), ("adamw_compiled", "adamw", True),
                                   ("nso", "nso", False), ("nso_compiled", "nso", True))}
    times = interleaved(arms, 1, args.device, args.steps)  # warm-up: compiles
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    for label, values in interleaved(arms, args.rounds - 1, args.device, args.steps, first_round=1).items():
        times[label] += values
    return {
        "compile_backend": args.compile_backend, "compile_mode": args.compile_mode or "default",
        "samples_per_s": {label: args.batch_size / statistics.median(values[1:]) for label, values in times.items()},
        "speedup_compiled_over_eager": {opt: median_ratio(times, opt, f"{opt}_compiled") for opt in ("adamw", "nso")},
        "warmup_epoch_s": {label: values[0] * args.steps for label, values in times.items()},
        "graphs_after_warmup": graphs_after_warmup,
        "recompiles_after_warmup": counters["stats"]["unique_graphs"] - graphs_after_warmup,
        "per_round_step_s": times,
    }


def open_clip_comparison(args, name, samples) -> dict:
    arms = {"nsoclip": nsoclip_epoch_runner(args, name, samples),
            "open_clip": open_clip_epoch_runner(args, name, samples)}
    times = interleaved(arms, args.rounds, args.device, args.steps)
    ratios = [o / n for n, o in zip(times["nsoclip"][1:], times["open_clip"][1:])]
    return {
        "nsoclip_samples_per_s": args.batch_size / statistics.median(times["nsoclip"][1:]),
        "open_clip_samples_per_s": args.batch_size / statistics.median(times["open_clip"][1:]),
        "throughput_ratio_nsoclip_over_open_clip": statistics.median(ratios),
        "per_round_ratio": ratios,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench train")
    parser.add_argument("--model", default=None,
                        help="OpenCLIP model name or model-config JSON (default: a 4-layer ViT at 64 px).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per timed epoch.")
    parser.add_argument("--rounds", type=int, default=7, help="Rounds of one epoch per arm; the first is warm-up.")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--replay-batches", type=int, default=0,
                        help="Replay this many batches built once per arm, from the device (0: the pipelines).")
    parser.add_argument("--compile", action="store_true",
                        help="Compare eager and --torchcompile for AdamW and NSO instead of ours and OpenCLIP's.")
    parser.add_argument("--compile-backend", default=DEFAULT_COMPILE_BACKEND, help="torch.compile backend (--compile).")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of inductor (--compile).")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first is warm-up)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.disable(logging.WARNING)
    if args.device.startswith("cuda"):
        # What both projects' main() set on a GPU before training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model
        if spec is None:
            spec = str(Path(tmp) / "bench-vit.json")
            Path(spec).write_text(json.dumps(BENCH_MODEL))
        name = resolve_model_name(spec)
        samples = args.batch_size * args.steps
        result = (compile_comparison if args.compile else open_clip_comparison)(args, name, samples)

    print(json.dumps({
        "benchmark": "train-compile" if args.compile else "train",
        "model": str(args.model or "bench-vit (ViT 4x256 at 64 px, text 4x256)"),
        "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "workers": args.workers, "steps_per_epoch": args.steps, "timed_rounds": args.rounds - 1,
        "data": f"{args.replay_batches} batches replayed from the device" if args.replay_batches else "pipelines",
        **result,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
