"""`nsoclip-zeroshot` / `python -m nsoclip.zeroshot`: evaluate one checkpoint (ours or OpenCLIP's)
zero-shot and, with --val-data, on retrieval. Runs as a plain process, under torchrun or under
srun; every rank scores a share of the images and rank 0 prints and writes the JSON."""
import json
import logging
import os
import sys

import torch

from .distributed import LaunchError, init_distributed, shutdown
from .evaluate import evaluate
from .model import create_model_and_transforms
from .params import Parser, UsageError, add_data_args, add_distributed_args, add_eval_args, add_model_args
from .zero_shot import zero_shot_sets


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
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.train_data or args.dataset_type == "synthetic":
        raise UsageError("nsoclip-zeroshot does not train: --train-data and --dataset-type synthetic "
                         "have no meaning here (use --val-data for retrieval)")
    if not (args.val_data or any((args.imagenet_val, args.imagenet_v2, args.imagenet_a, args.imagenet_r,
                                  args.zeroshot_data))):
        raise UsageError("nothing to evaluate: give --imagenet-val, --imagenet-v2, --imagenet-a, "
                         "--imagenet-r, --zeroshot-data or --val-data")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    return args


def run(args, world) -> dict:
    sets = zero_shot_sets(args, world)
    if not args.pretrained:
        logging.warning("No --pretrained given: evaluating randomly initialised weights")
    torch.manual_seed(args.seed)
    model, preprocess_train, preprocess_val, tokenizer = create_model_and_transforms(args, world.device)
    val_data = None
    if args.val_data:
        from .data import get_data
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
    try:
        args = parse_args(argv)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        world = init_distributed(device, args.dist_backend, args.dist_url, args.dist_timeout,
                                 set_device_rank=not args.no_set_device_rank)
        logging.basicConfig(level=logging.INFO if world.is_master else logging.WARNING, force=True,
                            format="%(asctime)s | %(levelname)s | %(message)s", datefmt="%Y-%m-%d,%H:%M:%S")
        try:
            run(args, world)
        finally:
            shutdown()
    except (ValueError, LaunchError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
