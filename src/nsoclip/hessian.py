"""`nsoclip-hessian` / `python -m nsoclip.hessian`: the Hessian of the training loss at one
checkpoint (trace with per-block and per-tower traces, top eigenvalues, noise stability, curvature
along w - w0), on one process or under torchrun / srun. Rank 0 prints a one-line JSON summary and
writes the full report to --hessian-output; the library is `nsoclip.curvature`."""
import contextlib
import json
import logging
import math
import sys
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import load_checkpoint, load_model_weights, model_state_dict
from .checks import POSITIVE, POSITIVE_INT, command_line
from .cli import run_command
from .curvature import (HessianError, curvature_along, difference_from_reference, hessian_trace, noise_stability,
                        top_eigenvalues)
from .data import get_data
from .distributed import init_distributed
from .loader import first_batches
from .logger import setup_console_logging
from .loss import contrastive_loss_fn, create_loss
from .model import compile_model, create_model_and_transforms
from .params import (Parser, UsageError, add_compile_args, add_data_args, add_distributed_args, add_hessian_args,
                     add_model_args, validate_compile, validate_hessian)
from .parallel import unwrap
from .rng import seed_everything
from .wds import fit_to_reader


def sigma_list(text: str):
    """'0.005,0.01' -> [0.005, 0.01], every sigma > 0."""
    try:
        sigmas = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--noise-stability-sigmas {text}: expected comma-separated numbers") from None
    if not sigmas or any(POSITIVE.violated(s) for s in sigmas):
        raise UsageError(f"--noise-stability-sigmas {text}: every sigma must be > 0")
    return sigmas


def build_parser():
    parser = Parser(prog="nsoclip-hessian",
                    description="Hessian trace, per-block traces, top eigenvalues and noise stability of the "
                                "CLIP training loss, on one process or under torchrun / srun.")
    add_model_args(parser)
    add_data_args(parser)
    add_distributed_args(parser)
    add_hessian_args(parser)
    add_compile_args(parser)
    parser.set_defaults(precision="fp32")
    group = parser.add_argument_group("hessian report")
    group.add_argument("--resume", type=str, default=None, help="Our training checkpoint to evaluate.")
    group.add_argument("--hessian-output", type=str, default=None, help="Write the JSON report here.")
    group.add_argument("--noise-stability-sigmas", type=str, default=None,
                       help="Comma-separated sigmas, e.g. 0.001,0.01: E[L(w+e)] - L(w) for each.")
    group.add_argument("--noise-stability-draws", type=POSITIVE_INT.flag(), default=8,
                       help="Antithetic pairs per sigma.")
    group.add_argument("--reference-checkpoint", type=str, default=None,
                       help="Report (w - w0)^T H (w - w0) against this checkpoint's weights w0.")
    group.add_argument("--report-to", type=str, default="", help="'tensorboard' to log scalars under --logs.")
    group.add_argument("--logs", type=str, default=None,
                       help="Run folder (e.g. logs/NAME): TensorBoard events go to LOGS/tensorboard.")
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    validate_hessian(args)
    validate_compile(args)
    if args.torchcompile and args.hessian_hvp == "exact":
        raise UsageError("--torchcompile: exact Hessian-vector products need double backward, which torch.compile "
                         "does not support; add --hessian-hvp finite_difference or leave out --torchcompile")
    if args.report_to not in ("", "tensorboard"):
        raise UsageError(f"--report-to {args.report_to}: only 'tensorboard' is supported")
    if args.report_to and not args.logs:
        raise UsageError("--report-to tensorboard needs --logs (the run folder)")
    if args.dataset_type == "synthetic" and args.train_num_samples is None:
        raise UsageError("--dataset-type synthetic needs --train-num-samples")
    if args.train_data is None and args.val_data is None and args.dataset_type != "synthetic":
        raise UsageError("no data: give --train-data, --val-data or --dataset-type synthetic")
    args.sigmas = sigma_list(args.noise_stability_sigmas) if args.noise_stability_sigmas else []
    # The exact distributed contrastive loss, whatever was typed: it is the training objective.
    args.local_loss = args.gather_with_grad = True
    return args


def hessian_batches(args, model_bundle, world):
    """The first --hessian-num-batches batches of the training data (else the validation data)."""
    _, preprocess_train, preprocess_val, tokenizer = model_bundle
    fit_to_reader(args, world, args.hessian_num_batches)
    data = get_data(args, (preprocess_train, preprocess_val), tokenizer, world, epoch=0)
    split = "train" if data.get("train") is not None else "val"
    info = data.get(split)
    if info is None or info.num_batches == 0:
        raise HessianError("no batches: the data gives this rank zero batches (check --batch-size and the sample count)")
    if info.num_batches < args.hessian_num_batches:
        raise HessianError(f"--hessian-num-batches {args.hessian_num_batches}: the {split} data has only "
                           f"{info.num_batches} batches per rank")
    return first_batches(info, args.hessian_num_batches, world.device, args.precision), split


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool):
    """A tqdm bar on stderr (rank 0), yielding its update function; None where disabled."""
    if not enabled:
        yield None
        return
    with tqdm(total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


def checkpoint_step(path) -> int:
    checkpoint = load_checkpoint(path, mmap=True)
    for key in ("step", "epoch"):
        if isinstance(checkpoint.get(key), int):
            return checkpoint[key]
    return 0


def run(args, world) -> dict:
    seed_everything(args.seed)
    bundle = create_model_and_transforms(args, world.device, weights_follow=bool(args.resume))
    model = bundle[0]
    if args.resume:
        load_model_weights(model, args.resume, label="--resume")
        logging.info("Loaded weights from %s", args.resume)
    reference = None
    if args.reference_checkpoint:
        reference = model_state_dict(load_checkpoint(args.reference_checkpoint))
    batches, split = hessian_batches(args, bundle, world)
    loss_fn = contrastive_loss_fn(create_loss(args, world, model))
    settings = dict(seed=args.seed, params=args.hessian_params)
    compiled = compile_model(model, args)
    model = compiled if compiled is not None else model  # finite differences through the compiled forward

    with progress_bar("trace (products)", args.hessian_probes, world.is_master) as progress:
        report = hessian_trace(model, loss_fn, batches, num_probes=args.hessian_probes, method=args.hessian_method,
                               hvp=args.hessian_hvp, block_size=args.hessian_block_size, progress=progress,
                               **settings)
    report["top_eigenvalues"] = []
    if args.hessian_top_k > 0:
        with progress_bar("eigenvalues (products)", args.hessian_max_iter, world.is_master) as progress:
            report["top_eigenvalues"] = top_eigenvalues(model, loss_fn, batches, k=args.hessian_top_k,
                                                        max_iter=args.hessian_max_iter, hvp=args.hessian_hvp,
                                                        progress=progress, **settings)
    if args.sigmas:
        evaluations = 1 + 2 * args.noise_stability_draws * len(args.sigmas)
        with progress_bar("noise stability (losses)", evaluations, world.is_master) as progress:
            report["noise_stability"] = noise_stability(model, loss_fn, batches, args.sigmas,
                                                        num_draws=args.noise_stability_draws, progress=progress,
                                                        **settings)
    if reference is not None:
        direction = difference_from_reference(model, reference, args.hessian_params)
        with progress_bar("reference curvature (products)", 1, world.is_master) as progress:
            report["reference"] = {"checkpoint": args.reference_checkpoint,
                                   **curvature_along(model, loss_fn, batches, direction, hvp=args.hessian_hvp,
                                                     progress=progress)}
    bare = unwrap(model)
    batch_size = int(batches[0][0].shape[0])
    report["settings"] = {
        "model": args.model, "checkpoint": args.resume or args.pretrained or None, "data_split": split,
        "batch_size": batch_size, "global_batch_size": batch_size * world.world_size,
        "num_batches": len(batches), "world_size": world.world_size,
        "logit_scale": bare.logit_scale.exp().item() if hasattr(bare, "logit_scale") else None,
        "seed": args.seed, "params": args.hessian_params, "precision": args.precision, "device": str(world.device),
        "num_probes": args.hessian_probes, "method": args.hessian_method, "hvp": args.hessian_hvp,
        "block_size": args.hessian_block_size, "top_k": args.hessian_top_k, "max_iter": args.hessian_max_iter,
        "torchcompile": args.torchcompile,
    }
    return report


def finite_or_none(value):
    """NaN / inf become null so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def write_outputs(args, report: dict):
    report = finite_or_none(report)
    if args.hessian_output:
        path = Path(args.hessian_output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if args.report_to == "tensorboard":
        step = checkpoint_step(args.resume) if args.resume else 0
        writer = SummaryWriter(str(Path(args.logs) / "tensorboard"))
        scalars = {"hessian/trace": report["trace"], "hessian/trace_stderr": report["stderr"]}
        scalars.update({f"hessian/trace_{tower}": v for tower, v in report["per_tower"].items()})
        if report["top_eigenvalues"]:
            scalars["hessian/top_eigenvalue"] = report["top_eigenvalues"][0]
        for entry in report.get("noise_stability", []):
            scalars[f"hessian/noise_stability_sigma_{entry['sigma']:g}"] = entry["mean"]
        if "reference" in report:
            scalars["hessian/reference_curvature"] = report["reference"]["curvature"]
        for key, value in scalars.items():
            if value is not None:
                writer.add_scalar(key, value, step)
        writer.close()
    summary = {key: report[key] for key in ("trace", "stderr", "num_hvps", "top_eigenvalues")}
    summary.update(per_tower=report["per_tower"], settings=report["settings"])
    for key in ("noise_stability", "reference"):
        if key in report:
            summary[key] = report[key]
    print(json.dumps(summary))


def main(argv=None) -> int:
    argv = command_line(argv)

    def body() -> int:
        args = parse_args(argv)
        world = init_distributed(device=args.device, backend=args.dist_backend, dist_url=args.dist_url,
                                 timeout_minutes=args.dist_timeout, set_device_rank=not args.no_set_device_rank)
        setup_console_logging(world.is_master)
        with logging_redirect_tqdm():  # log lines above the progress bars, not through them
            report = run(args, world)
        if world.is_master:
            write_outputs(args, report)
        return 0

    return run_command(body, argv)


if __name__ == "__main__":
    sys.exit(main())
