"""`make demo` / `python -m nsoclip.demo`: the whole product on real data, on 2 CPU ranks, offline.

The 1,797 handwritten digit scans that scikit-learn ships inside its package become a small CLIP
pretraining set: a fixed held-out test set goes into a class-folder tree for zero-shot evaluation
with prompts never seen in training, the rest into webdataset shards with captions in several
phrasings. The demo then trains the same tiny ViT CLIP under torchrun with AdamW and with NSO
(k=1 two-point perturbations, the same number of steps), each with two training seeds, and AdamW
with twice the steps (compute-matched to NSO) when asked; it measures each final checkpoint's
Hessian trace, top eigenvalue and noise stability, and writes the comparison report, whose seed
groups say which differences survive a change of seed. Every stage is a subprocess whose command
is printed and written into the report, so each can be rerun by hand.
"""
import argparse
import contextlib
import importlib.resources
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from .checks import command_line
from .errors import NsoclipError
from .launch import child_env, python_command
from .report import write_report

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training captions: {digit} is the numeral, {word} the English word.
TRAIN_PHRASINGS = (
    "a handwritten {digit}",
    "the digit {word}",
    "a scan of the number {digit}",
    "handwritten {word}",
    "the number {word}, written by hand",
    "a {digit} written by hand",
)
# Zero-shot prompts: none of these sentence shapes occurs in training.
ZEROSHOT_TEMPLATES = (
    "a photo of the number {}.",
    "an image of a {}.",
    "a small picture of {}.",
)
ZEROSHOT_SET = "digits"  # the folder name, hence the metric key digits-zeroshot-val-top1
MARKER = ".nsoclip-demo"
DEMO_CONFIG = "nsoclip-demo-vit.json"


class DemoError(NsoclipError, RuntimeError):
    """A stage failed; the message holds its command and the tail of its output (exit status 1)."""


class OutputFolderError(NsoclipError, ValueError):
    """--output cannot be used; printed as one line, exit status 2."""


@dataclass
class DemoData:
    train_pattern: str
    num_train: int
    zeroshot_dir: Path
    classnames: Path
    templates: Path


# ---------------------------------------------------------------------------------------------
# Data

def train_caption(label: int, rng: random.Random) -> str:
    return rng.choice(TRAIN_PHRASINGS).format(digit=label, word=DIGIT_WORDS[label])


def digit_image(pixels, size: int):
    """An 8x8 scan (values 0..16) as a size x size RGB image, contrast-stretched to 0..255."""
    import numpy as np
    from PIL import Image
    low, high = float(pixels.min()), float(pixels.max())
    stretched = (pixels - low) / max(high - low, 1e-6) * 255.0
    image = Image.fromarray(stretched.round().astype(np.uint8), mode="L")
    return image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def split_digits(test_size: int, seed: int):
    """(sklearn's digits, train indices, test indices): a stratified split fixed by the seed."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=test_size,
                                   stratify=digits.target, random_state=seed)
    return digits, train, test


def write_image_folders(output: Path, image_size: int, test_size: int, seed: int):
    """Train images with same-stem caption files (the input of `nsoclip.shards --images`) in a
    shuffled order, so that every shard holds every class; the test images in class folders 0..9
    with the class-name and template files of `--zeroshot-data`."""
    digits, train, test = split_digits(test_size, seed)
    rng = random.Random(seed)
    train_dir = output / "train-images"
    train_dir.mkdir(parents=True)
    order = list(train)
    rng.shuffle(order)
    for position, index in enumerate(order):
        label = int(digits.target[index])
        digit_image(digits.images[index], image_size).save(train_dir / f"{position:05d}.png")
        (train_dir / f"{position:05d}.txt").write_text(train_caption(label, rng) + "\n")
    zeroshot_dir = output / ZEROSHOT_SET
    for index in test:
        label = int(digits.target[index])
        (zeroshot_dir / str(label)).mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[index], image_size).save(zeroshot_dir / str(label) / f"{index:04d}.png")
    classnames = output / "classnames.txt"
    classnames.write_text("\n".join(DIGIT_WORDS) + "\n")
    templates = output / "templates.txt"
    templates.write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return train_dir, len(order), zeroshot_dir, classnames, templates


def shard_flags(train_dir: Path, shards: Path, num_train: int, num_shards: int) -> List[str]:
    """`nsoclip.shards` flags that spread the training pairs over num_shards equal shards."""
    return ["--images", str(train_dir), "--output", str(shards), "--maxcount", str(-(-num_train // num_shards))]


# ---------------------------------------------------------------------------------------------
# Subprocesses

def epoch_lines(run_dir: Path) -> List[str]:
    """The end-of-epoch training losses (metrics.jsonl), then the zero-shot accuracies
    (results.jsonl) of a run."""
    lines = []
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if record["batch"] == record["batches"]:
            lines.append(f"    epoch {record['epoch'] + 1}: step {record['step']}, training loss {record['loss']:.3f}")
    for record in read_jsonl(run_dir / "results.jsonl"):
        top1 = record.get(f"{ZEROSHOT_SET}-zeroshot-val-top1")
        if top1 is not None:
            lines.append(f"    zero-shot top-1 on held-out digits: {100 * top1:.1f}%")
    return lines


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def hessian_summary(summary: dict) -> str:
    """nsoclip.hessian's one-line JSON summary, shortened; a value it could not compute shows as n/a."""
    def shown(value, spec):
        return "n/a" if value is None else format(value, spec)
    eigenvalues = summary.get("top_eigenvalues") or [None]
    stability = summary.get("noise_stability") or []
    parts = [f"Hessian trace {shown(summary.get('trace'), '.4g')} ± {shown(summary.get('stderr'), '.2g')}",
             f"top eigenvalue {shown(eigenvalues[0], '.4g')}"]
    parts += [f"noise stability (sigma {entry['sigma']:g}) {shown(entry.get('mean'), '.3g')}" for entry in stability]
    if stability:
        parts.append(f"loss at the checkpoint {shown(stability[0].get('loss'), '.3f')}")
    return "    " + ", ".join(parts)


def run_stage(title: str, command: Sequence[str], log_path: Path, timeout: float) -> float:
    """Run one stage, its stdout and stderr into log_path, with progress lines on our stdout; returns
    its wall time. On failure or timeout: DemoError with the command, the last lines of its output and
    the one-line `error:` messages of our CLIs, which torchrun's own traceback would push out of view."""
    print(f"[demo] {title}", flush=True)
    print(f"    $ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    tail = deque(maxlen=40)
    errors = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=child_env(), start_new_session=True)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        with open(log_path, "w") as log:
            for line in process.stdout:
                log.write(line)
                tail.append(line.rstrip("\n").split("\r")[-1])
                if line.startswith("error: ") and line.rstrip() not in errors:
                    errors.append(line.rstrip())
                if line.startswith('{"trace"'):
                    print(hessian_summary(json.loads(line)), flush=True)
        returncode = process.wait()
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - start
    if timed_out.is_set() or returncode != 0:
        reason = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exited with status {returncode}"
        raise DemoError(f"{title} {reason}\ncommand: {shlex.join(command)}\n"
                        f"last lines of {log_path}:\n" + "\n".join([*tail, *errors]))
    print(f"    done in {elapsed:.0f} s", flush=True)
    return elapsed


# ---------------------------------------------------------------------------------------------
# The demo

def prepare_output(output: Path):
    """A fresh output folder; an earlier demo's folder (it carries the marker file) is replaced,
    anything else that is not empty is refused rather than deleted."""
    if output.exists():
        if not output.is_dir():
            raise OutputFolderError(f"--output {output}: exists and is not a folder")
        if (output / MARKER).is_file():
            shutil.rmtree(output)
        elif any(output.iterdir()):
            raise OutputFolderError(f"--output {output}: folder exists, is not empty and was not made by the demo")
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("made by python -m nsoclip.demo; replaced on the next run\n")
    (output / "logs").mkdir()


@dataclass
class Arm:
    """One setting of the comparison, trained once per training seed."""
    name: str
    optimizer: list
    epochs: int


def arms(args) -> List[Arm]:
    nso = ["--opt", "nso", "--nso-sigma", args.nso_sigma, "--nso-num-perturbs", 1, "--nso-two-point", "--nso-lam", 0]
    chosen = [Arm("adamw", [], args.epochs), Arm("nso", nso, args.epochs)]
    if args.compute_matched:  # k=1 two-point NSO makes two passes per step: AdamW with twice the steps
        chosen.append(Arm("adamw-2x-steps", [], 2 * args.epochs))
    return chosen


def training_seeds(text: str) -> List[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be comma-separated integers") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is given twice")
    return seeds


def common_flags(args, data: DemoData, config: str, seed: int) -> list:
    return ["--model", config, "--dataset-type", "webdataset", "--train-data", data.train_pattern,
            "--train-num-samples", data.num_train, "--batch-size", args.batch_size, "--workers", args.workers,
            "--device", "cpu", "--seed", seed]


def train_flags(args, data: DemoData, config: str, runs: Path, name: str, arm: Arm, seed: int) -> list:
    return [*common_flags(args, data, config, seed), "--precision", "fp32", "--local-loss", "--gather-with-grad",
            "--epochs", arm.epochs, "--lr", args.lr, "--wd", args.wd, "--warmup", args.warmup,
            "--zeroshot-data", data.zeroshot_dir, "--zeroshot-classnames", data.classnames,
            "--zeroshot-templates", data.templates, "--zeroshot-frequency", 1,
            "--report-to", "tensorboard", "--log-every-n-steps", 1, "--save-frequency", arm.epochs,
            "--logs", runs, "--name", name, *arm.optimizer]


def hessian_flags(args, data: DemoData, config: str, run_dir: Path, epochs: int) -> list:
    """Every run's Hessian on the same batches: those of the data seed's epoch-0 order."""
    return [*common_flags(args, data, config, args.seed), "--resume", run_dir / "checkpoints" / f"epoch_{epochs}.pt",
            "--hessian-num-batches", args.hessian_batches, "--hessian-probes", args.hessian_probes,
            "--hessian-top-k", 1, "--hessian-max-iter", args.hessian_max_iter,
            "--noise-stability-sigmas", args.noise_sigmas, "--noise-stability-draws", args.noise_draws,
            "--hessian-output", run_dir / "hessian.json"]


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m nsoclip.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo-out", help="Folder for data, runs and the report "
                        "(replaced when an earlier demo made it).")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks per torchrun job.")
    parser.add_argument("--epochs", type=int, default=12, help="Training epochs of each run (the compute-matched "
                        "AdamW arm: twice as many).")
    parser.add_argument("--batch-size", type=int, default=64, help="Batch size per rank.")
    parser.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate (every run).")
    parser.add_argument("--wd", type=float, default=0.1, help="Weight decay (every run).")
    parser.add_argument("--warmup", type=int, default=20, help="Warmup steps.")
    parser.add_argument("--nso-sigma", type=float, default=0.005,
                        help="NSO perturbation std (scaled down from the reference 0.01 for this tiny model).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split, the captions and the Hessian batches.")
    parser.add_argument("--seeds", type=training_seeds, default=[0, 1],
                        help="Training seeds, comma-separated: each arm is trained once per seed (initial weights, "
                             "sample order, NSO noise).")
    parser.add_argument("--compute-matched", action=argparse.BooleanOptionalAction, default=False,
                        help="Also train AdamW with twice the epochs: the compute of NSO's two passes per step.")
    parser.add_argument("--image-size", type=int, default=32, help="Pixels the 8x8 scans are upscaled to.")
    parser.add_argument("--test-size", type=int, default=300, help="Held-out digits for zero-shot evaluation.")
    parser.add_argument("--num-shards", type=int, default=4, help="Training shards (>= ranks x workers).")
    parser.add_argument("--workers", type=int, default=1, help="Dataloader workers per rank.")
    parser.add_argument("--hessian-batches", type=int, default=2, help="Batches per rank in the Hessian loss.")
    parser.add_argument("--hessian-probes", type=int, default=16, help="Hutchinson probes for the trace.")
    parser.add_argument("--hessian-max-iter", type=int, default=20, help="Lanczos iterations for the top eigenvalue.")
    parser.add_argument("--noise-sigmas", default="0.005,0.01", help="Two sigmas for noise stability.")
    parser.add_argument("--noise-draws", type=int, default=4, help="Antithetic pairs per sigma.")
    parser.add_argument("--stage-timeout", type=float, default=900, help="Seconds before a stage is killed.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(command_line(argv))
    started = time.perf_counter()
    output = Path(args.output).resolve()
    try:
        prepare_output(output)
    except OutputFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with importlib.resources.as_file(importlib.resources.files("nsoclip") / "model_configs" / DEMO_CONFIG) as path:
            return run_demo(args, output, str(path), started)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run_demo(args, output: Path, config: str, started: float) -> int:
    logs = output / "logs"
    print(f"[demo] writing the digits data set to {output}", flush=True)
    train_dir, num_train, zeroshot_dir, classnames, templates = write_image_folders(
        output, args.image_size, args.test_size, args.seed)
    shards = output / "shards"
    shard_command = [sys.executable, "-m", "nsoclip.shards", *shard_flags(train_dir, shards, num_train, args.num_shards)]
    stage_times = {"shards": run_stage(f"packing {num_train} training pairs into webdataset shards",
                                       shard_command, logs / "shards.log", args.stage_timeout)}
    num_shards = len(json.loads((shards / "sizes.json").read_text()))
    data = DemoData(train_pattern=str(shards / f"shard-{{000000..{num_shards - 1:06d}}}.tar"),
                    num_train=num_train, zeroshot_dir=zeroshot_dir,
                    classnames=classnames, templates=templates)

    runs = output / "runs"
    steps_per_epoch = num_train // (args.batch_size * args.nproc)
    chosen = arms(args)
    names = {(arm.name, seed): f"{arm.name}-seed{seed}" for arm in chosen for seed in args.seeds}
    commands = {"shards": shard_command}
    for arm in chosen:
        for seed in args.seeds:
            name = names[arm.name, seed]
            flags = train_flags(args, data, config, runs, name, arm, seed)
            command = commands[f"train {name}"] = python_command("nsoclip.main", flags, args.nproc)
            stage_times[f"train {name}"] = run_stage(
                f"training {name} on {args.nproc} CPU ranks: {arm.epochs} epoch(s), "
                f"{arm.epochs * steps_per_epoch} steps", command, logs / f"train-{name}.log", args.stage_timeout)
            print("\n".join(epoch_lines(runs / name)), flush=True)
    for arm in chosen:
        for seed in args.seeds:
            name = names[arm.name, seed]
            command = python_command("nsoclip.hessian", hessian_flags(args, data, config, runs / name, arm.epochs),
                                     args.nproc)
            commands[f"hessian {name}"] = command
            stage_times[f"hessian {name}"] = run_stage(
                f"Hessian trace, top eigenvalue and noise stability of {name}'s final checkpoint",
                command, logs / f"hessian-{name}.log", args.stage_timeout)

    settings = {
        "data": f"sklearn digits: {num_train} train / {args.test_size} held-out test, "
                f"{args.image_size}x{args.image_size} px, {num_shards} shards",
        "training captions": " | ".join(TRAIN_PHRASINGS),
        "zero-shot templates": " | ".join(ZEROSHOT_TEMPLATES),
        "zero-shot class names": ", ".join(DIGIT_WORDS),
        "model": f"{DEMO_CONFIG} (nsoclip/model_configs)",
        "ranks": f"{args.nproc} CPU processes (gloo), fp32, --local-loss --gather-with-grad",
        "optimizer steps per run": ", ".join(f"{arm.name} {arm.epochs * steps_per_epoch}" for arm in chosen),
        "training seeds": ", ".join(map(str, args.seeds)) + " (initial weights, sample order, NSO noise; the data "
                          f"split, captions and Hessian batches use seed {args.seed})",
        "NSO": f"sigma {args.nso_sigma}, k=1, two-point, lam=0; its training loss is the mean loss at the "
               "perturbed weights w ± e (the Hessian stage reports the loss at w itself)",
        "Hessian": f"{args.hessian_probes} Hutchinson probes, top eigenvalue by Lanczos (<= {args.hessian_max_iter} "
                   f"iterations), noise stability at sigma {args.noise_sigmas} with {args.noise_draws} "
                   f"antithetic pairs, on {args.hessian_batches} training batches per rank",
        "stage wall times": ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stage_times.items())
                            + " (the runs take turns on a possibly shared machine: step times are not interleaved)",
    }
    print("[demo] writing the comparison report", flush=True)
    report = write_report([runs / name for name in names.values()], output / "report", commands=commands,
                          settings=settings)
    print(f"[demo] finished in {time.perf_counter() - started:.0f} s", flush=True)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
