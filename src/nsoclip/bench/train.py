"""Our AdamW training loop against OpenCLIP's (`open_clip_train.train.train_one_epoch`, shipped in
the open_clip_torch wheel), side by side in one process: same model config and initial weights,
synthetic data through each project's own data pipeline, same batch, precision and optimizer.

The two loops run alternately, one short epoch of --steps optimizer steps each, for --rounds
rounds; the first round is warm-up. The figure is the median over rounds of the ratio of the two
epochs' wall times, so load that comes and goes on a shared machine hits both sides alike.

    python -m nsoclip.bench train [--model CONFIG.json] [--batch-size 32] [--steps 8] [--rounds 7]
"""
import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from ..data import get_data as nsoclip_data
from ..distributed import World
from ..loss import create_loss
from ..optim import create_optimizer, parameter_groups
from ..parallel import Layout
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


def nsoclip_epoch_runner(args, name, samples):
    flags = nsoclip_flags(shared_flags(args, name, samples))
    world = World(device=torch.device(args.device))
    model, preprocess_train, preprocess_val = build_model(name, world.device, args.precision)
    data = nsoclip_data(flags, (preprocess_train, preprocess_val), open_clip.get_tokenizer(name), world)["train"]
    optimizer = create_optimizer(flags, model)
    run = Run(args=flags, world=world, model=model, layout=Layout(model), loss=create_loss(flags, world, model),
              optimizer=optimizer, scaler=grad_scaler(args.precision, world.device),
              schedule=LRSchedule(optimizer, flags, data.num_batches), checkpoints=None, metrics=SilentMetrics())
    epochs = iter(range(10 ** 6))
    return lambda: nsoclip_epoch(run, data, next(epochs))


def open_clip_epoch_runner(args, name, samples):
    from open_clip_train.data import get_data
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    flags = parse_args(shared_flags(args, name, samples))
    # What open_clip_train.main.main derives from the flags before it trains.
    flags.distributed, flags.world_size, flags.rank, flags.local_rank = False, 1, 0, 0
    flags.distill, flags.wandb, flags.save_logs, flags.horovod = False, False, False, False
    model, preprocess_train, preprocess_val = build_model(name, torch.device(args.device), args.precision)
    data = get_data(flags, (preprocess_train, preprocess_val), epoch=0, tokenizer=open_clip.get_tokenizer(name))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench train")
    parser.add_argument("--model", default=None, help="Model-config JSON (default: a 4-layer ViT at 64 px).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per timed epoch.")
    parser.add_argument("--rounds", type=int, default=7, help="Alternating epoch pairs; the first is warm-up.")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(args.model) if args.model else Path(tmp) / "bench-vit.json"
        if not args.model:
            config.write_text(json.dumps(BENCH_MODEL))
        open_clip.add_model_config(config)
        samples = args.batch_size * args.steps
        ours = nsoclip_epoch_runner(args, config.stem, samples)
        theirs = open_clip_epoch_runner(args, config.stem, samples)
        times = {"nsoclip": [], "open_clip": []}
        for round_index in range(args.rounds):
            pair = [("nsoclip", ours), ("open_clip", theirs)]
            for label, run_epoch in (pair if round_index % 2 == 0 else pair[::-1]):
                times[label].append(timed(run_epoch, args.device) / args.steps)

    ratios = [o / n for n, o in zip(times["nsoclip"][1:], times["open_clip"][1:])]
    ours_step, theirs_step = statistics.median(times["nsoclip"][1:]), statistics.median(times["open_clip"][1:])
    print(json.dumps({
        "benchmark": "train",
        "model": str(args.model or "bench-vit (ViT 4x256 at 64 px, text 4x256)"),
        "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
        "workers": args.workers, "steps_per_epoch": args.steps, "timed_rounds": args.rounds - 1,
        "nsoclip_samples_per_s": args.batch_size / ours_step,
        "open_clip_samples_per_s": args.batch_size / theirs_step,
        "throughput_ratio_nsoclip_over_open_clip": statistics.median(ratios),
        "per_round_ratio": ratios,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
