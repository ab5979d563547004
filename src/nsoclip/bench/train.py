"""Our AdamW training loop against OpenCLIP's `open_clip_train.main`, same model, synthetic data,
batch and precision, run alternately in one invocation.

Each run is a fresh process (as a user would launch it) training for --steps steps; the figure is
the median per-step time each loop logs after --skip warm-up steps, so process start-up and model
construction do not count for either side. The two loops log differently (OpenCLIP: `Batch (t):
0.123`; ours: `step_time: 0.123`), and both times cover data loading, forward, backward and the
optimizer step.

    python -m nsoclip.bench train [--model CONFIG.json] [--batch-size 32] [--steps 30] [--rounds 3]
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}

OPEN_CLIP_LAUNCHER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                      "from open_clip_train.main import main; main(sys.argv[2:])")


def common_flags(args, model_name, logs, name):
    return ["--dataset-type", "synthetic", "--train-num-samples", str(args.batch_size * args.steps),
            "--model", model_name, "--batch-size", str(args.batch_size), "--epochs", "1",
            "--workers", str(args.workers), "--precision", args.precision, "--lr", "1e-4",
            "--warmup", "10", "--log-every-n-steps", "1", "--logs", str(logs), "--name", name,
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--seed", "0",
            "--device", args.device]


def step_times(output: str, pattern: str, skip: int):
    times = [float(t) for t in re.findall(pattern, output)]
    if len(times) <= skip:
        raise RuntimeError(f"too few logged steps ({len(times)}) in output:\n{output[-3000:]}")
    return times[skip:]


def run_ours(args, config: Path, logs: Path, name: str):
    command = [sys.executable, "-m", "nsoclip.main", *common_flags(args, str(config), logs, name)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return step_times(output, r"step_time: ([0-9.e-]+)", args.skip)


def run_open_clip(args, config: Path, logs: Path, name: str):
    command = [sys.executable, "-c", OPEN_CLIP_LAUNCHER, str(config),
               *common_flags(args, config.stem, logs, name)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return step_times(result.stdout + result.stderr, r"Batch \(t\): ([0-9.]+)", args.skip)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench train")
    parser.add_argument("--model", default=None, help="Model-config JSON (default: a 4-layer ViT at 64 px).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="Warm-up steps left out of the median.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = Path(args.model) if args.model else tmp / "bench-vit.json"
        if not args.model:
            config.write_text(json.dumps(BENCH_MODEL))
        ours, theirs = [], []
        for round_index in range(args.rounds):
            ours.append(statistics.median(run_ours(args, config, tmp / "ours", f"r{round_index}")))
            theirs.append(statistics.median(run_open_clip(args, config, tmp / "openclip", f"r{round_index}")))
    ours_step, theirs_step = statistics.median(ours), statistics.median(theirs)
    result = {
        "benchmark": "train",
        "model": str(args.model or "bench-vit (4-layer ViT-256, 64 px, text 4x256)"),
        "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
        "steps_per_run": args.steps, "rounds": args.rounds,
        "nsoclip_step_s": ours_step, "open_clip_step_s": theirs_step,
        "nsoclip_samples_per_s": args.batch_size / ours_step,
        "open_clip_samples_per_s": args.batch_size / theirs_step,
        "throughput_ratio_nsoclip_over_open_clip": theirs_step / ours_step,
        "per_round_step_s": {"nsoclip": ours, "open_clip": theirs},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
