"""`nsoclip-zeroshot` / `python -m nsoclip.zeroshot`: evaluate one checkpoint (ours or OpenCLIP's)
zero-shot and, with --val-data, on retrieval. Runs as a plain process, under torchrun or under
srun; every rank scores a share of the images and rank 0 prints and writes the JSON."""
import json
import logging
import os
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from .checks import command_line
from .classification import zero_shot_sets
from .cli import run_command
from .data import get_data
from .distributed import init_distributed
from .evaluate import evaluate
from .logger import setup_console_logging
from .model import create_model_and_transforms
from .params import (Parser, UsageError, add_data_args, add_distributed_args, add_eval_args, add_model_args,
                     resolve_precision)
from .rng import seed_everything


def build_parser():
    parser = Parser(prog="nsoclip-zeroshot",
                    description="Zero-shot (ImageNet, -V2, -A, -R, any labelled folder) and retrieval "
                                "evaluation of one checkpoint, on one or many processes.")
    add_model_args(parser)
    add_eval_args(parser)
    add_data_args(parser)
    add_distributed_args(parser)
    parser.add_argument("--output", type=str, default=None, help="Write the metrics to this JSON file.")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(command_line(argv))
    resolve_precision(args)
    if args.train_data or args.dataset_type == "synthetic":
        raise UsageError("nsoclip-zeroshot does not train: --train-data and --dataset-type synthetic "
                         "have no meaning here (use --val-data for retrieval)")
    if not (args.val_data or any((args.imagenet_val, args.imagenet_v2, args.imagenet_a, args.imagenet_r,
                                  args.zeroshot_data))):
        raise UsageError("nothing to evaluate: give --imagenet-val, --imagenet-v2, --imagenet-a, "
                         "--imagenet-r, --zeroshot-data or --val-data")
    return args


def run(args, world) -> dict:
    sets = zero_shot_sets(args, world)
    if not args.pretrained:
        logging.warning("No --pretrained given: evaluating randomly initialised weights")
    seed_everything(args.seed)
    model, preprocess_train, preprocess_val, tokenizer = create_model_and_transforms(args, world.device)
    val_data = None
    if args.val_data:
        val_data = get_data(args, (preprocess_train, preprocess_val), tokenizer, world)["val"]
    metrics = evaluate(model, args, world, tokenizer, preprocess_val, val_data, sets=sets, progress=True)
    if world.is_master:
        print(json.dumps(metrics, indent=2))
        if args.output:
            write_json(metrics, args.output)
    return metrics


def write_json(metrics: dict, path: str) -> None:
    """Through a temporary file and a rename, so a killed job leaves no half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = command_line(argv)

    def body() -> int:
        args = parse_args(argv)
        world = init_distributed(args.device, args.dist_backend, args.dist_url, args.dist_timeout,
                                 set_device_rank=not args.no_set_device_rank)
        setup_console_logging(world.is_master)
        with logging_redirect_tqdm():  # log lines above the progress bars, not through them
            run(args, world)
        return 0

    return run_command(body, argv)


if __name__ == "__main__":
    sys.exit(main())
