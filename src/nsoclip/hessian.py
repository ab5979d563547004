"""`nsoclip-hessian` / `python -m nsoclip.hessian`: the Hessian of the training loss at one
checkpoint (trace with per-block and per-tower traces, extreme eigenvalues and eigenvectors, the
spectral density, noise stability, curvature along w - w0, a loss landscape), on one process or
under torchrun / srun. Rank 0 prints a one-line JSON summary and writes the full report to
--hessian-output; the libraries are `nsoclip.curvature` and `nsoclip.landscape`.

With --hessian-output the evaluation is preemption-safe: after every block of products its
partial state goes to `{--hessian-output}.partial/` (`nsoclip.resumable`), and the same command
run again continues from there with the numbers an uninterrupted run gives; the folder is
removed once the report is written. SIGTERM keeps its default action here (nsoclip.cli): the job
ends at once, and what is on disk is consistent at every moment."""
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import load_checkpoint, load_model_weights, model_state_dict
from .checks import POSITIVE, POSITIVE_INT, command_line
from .cli import run_command
from .curvature import (DENSITY_PROBES, DENSITY_STEPS, HessianError, curvature_along, difference_from_reference,
                        hessian_eigenpairs, hessian_trace, noise_stability, save_eigenvectors, spectral_density)
from .data import get_data
from .distributed import init_distributed
from .landscape import DIMENSIONS, DIRECTIONS, NUM_POINTS, SPAN, loss_landscape
from .loader import first_batches
from .logger import setup_console_logging
from .loss import contrastive_loss_fn, create_loss
from .model import compile_model, create_model_and_transforms
from .params import (Parser, UsageError, add_compile_args, add_data_args, add_distributed_args, add_hessian_args,
                     add_model_args, validate_compile, validate_hessian)
from .parallel import FSDP_PRECISIONS, ShardingOptions, full_tensor, shard, unwrap
from .resumable import PartialState
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
    group.add_argument("--hessian-density", action="store_true", default=False,
                       help="The eigenvalue density by stochastic Lanczos quadrature (Ritz values, weights and a "
                            "Gaussian-broadened density in the report).")
    group.add_argument("--hessian-density-probes", type=DENSITY_PROBES.flag(), default=4,
                       help="Probe vectors of the density (one Lanczos run each).")
    group.add_argument("--hessian-density-steps", type=DENSITY_STEPS.flag(), default=64,
                       help="Lanczos steps (products) per density probe.")
    group.add_argument("--hessian-save-eigenvectors", type=str, default=None, metavar="PATH",
                       help="Write the top (and bottom) eigenvectors here as a torch file.")
    group.add_argument("--landscape", choices=DIMENSIONS, default=None,
                       help="Also the loss on a line (1d) or plane (2d) through w.")
    group.add_argument("--landscape-directions", choices=DIRECTIONS, default="random",
                       help="Filter-normalised random directions (Li et al. 2018) or the top eigenvectors.")
    group.add_argument("--landscape-points", type=NUM_POINTS.flag(), default=21, help="Grid points per direction.")
    group.add_argument("--landscape-range", type=SPAN.flag(), default=1.0,
                       help="The grid spans [-R, R] along each direction.")
    group.add_argument("--fsdp", action="store_true", default=False,
                       help="Lay the model out with FSDP2 as training's --fsdp does (each rank holds 1/R of every "
                            "parameter); needs --hessian-hvp finite_difference.")
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
    if args.hessian_save_eigenvectors and args.hessian_top_k == 0 and args.hessian_bottom_k == 0:
        raise UsageError("--hessian-save-eigenvectors: no eigenvectors to save (--hessian-top-k and "
                         "--hessian-bottom-k are 0)")
    if args.landscape and args.landscape_directions == "eigen" and args.hessian_top_k < int(args.landscape[0]):
        raise UsageError(f"--landscape {args.landscape} --landscape-directions eigen: needs --hessian-top-k >= "
                         f"{args.landscape[0]} (its eigenvectors are the directions)")
    if args.fsdp and args.hessian_hvp == "exact":
        raise UsageError("--fsdp needs --hessian-hvp finite_difference: exact products (double backward) cannot run "
                         "on an FSDP2 model, whose gradients FSDP forms outside autograd")
    if args.fsdp and args.precision not in FSDP_PRECISIONS:
        raise UsageError(f"--precision {args.precision} with --fsdp: use {', '.join(FSDP_PRECISIONS)}")
    if args.fsdp and args.torchcompile:
        raise UsageError("--torchcompile with --fsdp: the Hessian evaluator runs a sharded model eagerly "
                         "(drop one of them)")
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


# Flags that do not change the numbers: a partial state is resumed whatever they say.
NOT_SETTINGS = ("hessian_output", "hessian_save_eigenvectors", "report_to", "logs", "workers", "dist_url",
                "dist_backend", "dist_timeout", "no_set_device_rank", "debug")


def evaluation_settings(args) -> dict:
    """What decides an evaluation's numbers, as plain values: a partial state on disk is resumed
    only by the same. Checkpoint files count by path, size and modification time."""
    settings = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}, default=str))
    for flag in ("resume", "reference_checkpoint", "pretrained"):
        path = getattr(args, flag, None)
        if path and os.path.isfile(path):
            stat = os.stat(path)
            settings[f"{flag}_file"] = [stat.st_size, stat.st_mtime_ns]
    return settings


def partial_state_folder(output) -> Path:
    return Path(f"{output}.partial")


def run(args, world):
    """(the report, the PartialState or None)."""
    seed_everything(args.seed)
    bundle = create_model_and_transforms(args, world.device, weights_follow=bool(args.resume))
    model = bundle[0]
    if args.resume:
        load_model_weights(model, args.resume, label="--resume")
        logging.info("Loaded weights from %s", args.resume)
    if args.fsdp:
        # No FSDP2 mixed precision: products in the parameters' dtype, as without --fsdp (a bf16
        # all-gather would round away the finite-difference step).
        shard(model, world, ShardingOptions())
    reference = None
    if args.reference_checkpoint:
        reference = model_state_dict(load_checkpoint(args.reference_checkpoint))
    batches, split = hessian_batches(args, bundle, world)
    loss_fn = contrastive_loss_fn(create_loss(args, world, model))
    partial = None
    if args.hessian_output:
        partial = PartialState(partial_state_folder(args.hessian_output), evaluation_settings(args), world.rank,
                               world.world_size, world.device).load()
    stage = partial.stage if partial else (lambda name, compute: compute(None, None))
    settings = dict(seed=args.seed, params=args.hessian_params)
    compiled = compile_model(model, args)
    model = compiled if compiled is not None else model  # finite differences through the compiled forward
    common = (model, loss_fn, batches)

    def bar(description: str, total: int):
        return progress_bar(description, total, world.is_master)

    with bar("trace (products)", args.hessian_probes) as progress:
        report = dict(stage("trace", lambda state, checkpoint: hessian_trace(
            *common, num_probes=args.hessian_probes, method=args.hessian_method, hvp=args.hessian_hvp,
            block_size=args.hessian_block_size, target_rel_stderr=args.hessian_target_rel_stderr, progress=progress,
            state=state, checkpoint=checkpoint, **settings)))
    eigen_directions = args.landscape and args.landscape_directions == "eigen"
    eigenpairs = {}
    for name, k, which in (("top", args.hessian_top_k, "largest"), ("bottom", args.hessian_bottom_k, "smallest")):
        if k > 0:
            vectors = bool(args.hessian_save_eigenvectors) or (name == "top" and eigen_directions)
            with bar(f"{which} eigenvalues (products)", args.hessian_max_iter) as progress:
                eigenpairs[name] = stage(name, lambda state, checkpoint, k=k, which=which, vectors=vectors: (
                    hessian_eigenpairs(*common, k=k, max_iter=args.hessian_max_iter, hvp=args.hessian_hvp,
                                       which=which, vectors=vectors, progress=progress, state=state,
                                       checkpoint=checkpoint, **settings)))
        report[f"{name}_eigenvalues"] = eigenpairs[name]["eigenvalues"] if name in eigenpairs else []
        if name in eigenpairs:
            report[f"{name}_eigenvalues_num_hvps"] = eigenpairs[name]["num_hvps"]
    if args.hessian_density:
        total = args.hessian_density_probes * args.hessian_density_steps
        with bar("density (products)", total) as progress:
            report["density"] = stage("density", lambda state, checkpoint: spectral_density(
                *common, num_probes=args.hessian_density_probes, num_steps=args.hessian_density_steps,
                hvp=args.hessian_hvp, progress=progress, state=state, checkpoint=checkpoint, **settings))
    if args.sigmas:
        evaluations = 1 + 2 * args.noise_stability_draws * len(args.sigmas)
        with bar("noise stability (losses)", evaluations) as progress:
            report["noise_stability"] = stage("noise_stability", lambda state, checkpoint: noise_stability(
                *common, args.sigmas, num_draws=args.noise_stability_draws, progress=progress, state=state,
                checkpoint=checkpoint, **settings))
    if reference is not None:
        direction = difference_from_reference(model, reference, args.hessian_params)
        with bar("reference curvature (products)", 1) as progress:
            report["reference"] = {"checkpoint": args.reference_checkpoint, **stage(
                "reference", lambda state, checkpoint: curvature_along(*common, direction, hvp=args.hessian_hvp,
                                                                       progress=progress))}
    if args.landscape:
        dims = int(args.landscape[0])
        vectors = eigenpairs["top"]["vectors"][:dims].to(world.device) if eigen_directions else None
        with bar("landscape (losses)", 1 + args.landscape_points ** dims) as progress:
            report["landscape"] = dict(stage("landscape", lambda state, checkpoint: loss_landscape(
                *common, dims=dims, directions=args.landscape_directions, num_points=args.landscape_points,
                span=args.landscape_range, vectors=vectors, progress=progress, state=state, checkpoint=checkpoint,
                **settings)))
        if eigen_directions:
            report["landscape"]["eigenvalues"] = report["top_eigenvalues"][:dims]
    if args.hessian_save_eigenvectors:
        save_eigenvectors(args.hessian_save_eigenvectors, model, args.hessian_params,
                          **{name: {"eigenvalues": pairs["eigenvalues"], "vectors": pairs["vectors"].to(world.device)}
                             for name, pairs in eigenpairs.items()})
    bare = unwrap(model)
    batch_size = int(batches[0][0].shape[0])
    report["settings"] = {
        "model": args.model, "checkpoint": args.resume or args.pretrained or None, "data_split": split,
        "batch_size": batch_size, "global_batch_size": batch_size * world.world_size,
        "num_batches": len(batches), "world_size": world.world_size,
        "logit_scale": full_tensor(bare.logit_scale.detach()).exp().item() if hasattr(bare, "logit_scale") else None,
        "seed": args.seed, "params": args.hessian_params, "precision": args.precision, "device": str(world.device),
        "num_probes": args.hessian_probes, "method": args.hessian_method, "hvp": args.hessian_hvp,
        "block_size": args.hessian_block_size, "target_rel_stderr": args.hessian_target_rel_stderr,
        "top_k": args.hessian_top_k, "bottom_k": args.hessian_bottom_k, "max_iter": args.hessian_max_iter,
        "density_probes": args.hessian_density_probes if args.hessian_density else None,
        "density_steps": args.hessian_density_steps if args.hessian_density else None,
        "eigenvectors": args.hessian_save_eigenvectors, "fsdp": args.fsdp, "torchcompile": args.torchcompile,
    }
    return report, partial


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
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    if args.report_to == "tensorboard":
        step = checkpoint_step(args.resume) if args.resume else 0
        writer = SummaryWriter(str(Path(args.logs) / "tensorboard"))
        scalars = {"hessian/trace": report["trace"], "hessian/trace_stderr": report["stderr"]}
        scalars.update({f"hessian/trace_{tower}": v for tower, v in report["per_tower"].items()})
        if report["top_eigenvalues"]:
            scalars["hessian/top_eigenvalue"] = report["top_eigenvalues"][0]
        if report["bottom_eigenvalues"]:
            scalars["hessian/bottom_eigenvalue"] = report["bottom_eigenvalues"][0]
        for entry in report.get("noise_stability", []):
            scalars[f"hessian/noise_stability_sigma_{entry['sigma']:g}"] = entry["mean"]
        if "reference" in report:
            scalars["hessian/reference_curvature"] = report["reference"]["curvature"]
        for key, value in scalars.items():
            if value is not None:
                writer.add_scalar(key, value, step)
        writer.close()
    summary = {key: report[key] for key in ("trace", "stderr", "num_hvps", "top_eigenvalues", "bottom_eigenvalues")}
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
            report, partial = run(args, world)
        if world.is_master:
            write_outputs(args, report)
        if partial is not None:
            partial.finish()
        return 0

    return run_command(body, argv)


if __name__ == "__main__":
    sys.exit(main())
