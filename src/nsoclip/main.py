"""`python -m nsoclip.main`: OpenCLIP's training entry point, with NSO and SAM as optimizers.

Read top to bottom: launch, resume checkpoint, model, data (everything checked before the run
folder is touched), run folder, optimizer, then the epoch loop (train, checkpoint, evaluate).
Runs as a plain process, under torchrun, or under SLURM srun."""
import logging
import signal
import shutil
import sys
import time
from pathlib import Path

import open_clip
import torch

from . import __version__, remote
from .checkpoint import Checkpointer, checkpoint_paths, checkpoint_position
from .checks import command_line
from .classification import zero_shot_sets
from .cli import run_command
from .curvature import hessian_metrics
from .data import get_data
from .distributed import barrier, broadcast_object, init_distributed
from .evaluate import evaluate, write_results
from .loader import check_worker_count, first_batches
from .logger import MetricsLogger, ReportToError, report_targets, setup_logging
from .loss import contrastive_loss_fn, create_loss
from .model import compile_options, create_model_and_transforms, prepare_for_training, torchscript
from .optim import check_against_model, create_optimizer
from .parallel import ShardingOptions, check_layout, distribute
from .params import UsageError, keeps_run_folder, parse_args, unused_settings
from .precision import grad_scaler
from .rng import seed_everything
from .scheduler import LRSchedule
from .train import Run, StopOnSignal, stop_agreed, train_one_epoch

# Exit status of a run stopped by SIGTERM after its step checkpoint: 128 + 15, as a shell reports
# a process ended by SIGTERM. Non-zero because the run is unfinished: torchrun --max-restarts
# restarts it and SLURM requeues it, and neither mistakes it for a completed job.
STOPPED_ON_REQUEST = 128 + signal.SIGTERM
# What a run writes into its folder besides checkpoints; a folder holding nothing else is the
# leftover of a start that failed before its first checkpoint, and the same command reuses it.
RUN_FILES = ("out.log", "params.txt", "results.jsonl", "metrics.jsonl", "tensorboard")
RANK_LOGS = "out-*.log"  # --log-local


def default_name(args) -> str:
    model = Path(args.model).stem if args.model.endswith(".json") else args.model.replace("/", "-")
    return "-".join([time.strftime("%Y_%m_%d-%H_%M_%S"), f"model_{model}", f"lr_{args.lr}",
                     f"b_{args.batch_size}", f"j_{args.workers}", f"p_{args.precision}"])


def agree_on_name(args, world) -> str:
    """--name, or rank 0's default (it holds the time, which ranks may read differently)."""
    return broadcast_object(args.name or default_name(args) if world.is_master else None)


def claim_run_dir(args, run_dir: Path, world) -> None:
    """Create the run folder, or refuse one that holds checkpoints without --resume. Only
    checkpoints make a folder a run to protect: a folder without any is the leftover of a start
    that failed before its first checkpoint, and the same command reuses it. Rank 0 decides and
    every rank follows, so no rank is left waiting."""
    refusal = None
    if world.is_master:
        checkpoints = checkpoint_paths(run_dir / "checkpoints")
        if checkpoints and not args.resume:
            refusal = (f"run folder {run_dir} already exists: pass --resume latest to continue it, "
                       "or choose another --name")
        else:
            if not checkpoints:
                for path in [run_dir / leftover for leftover in RUN_FILES] + list(run_dir.glob(RANK_LOGS)):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise UsageError(refusal)


def settings(args, model) -> dict:
    """The flags as the run uses them, for params.txt and wandb: every flag but those it never
    reads (params.unused_settings), so no default shows as if it were applied."""
    unused = unused_settings(args, coca=isinstance(model, open_clip.CoCa))
    return {name: getattr(args, name) for name in sorted(vars(args)) if name not in unused}


def write_params(values: dict, run_dir: Path):
    with open(run_dir / "params.txt", "w") as f:
        for name, value in values.items():
            f.write(f"{name}: {value}\n")


def due(completed_epochs: int, frequency: int, final: bool) -> bool:
    """OpenCLIP's rule: every `frequency` epochs and after the final one; frequency 0 never."""
    return frequency > 0 and (final or completed_epochs % frequency == 0)


def resume_checkpoint(args, checkpoints: Checkpointer, world):
    """--resume's checkpoint: a path, or for `latest` the newest of the run folder, or of the
    --remote-sync copy when that one is newer (downloaded into the run folder); None to start fresh."""
    resume_from = checkpoints.resolve(args.resume)
    if args.resume == "latest" and args.remote_sync:
        local_step = checkpoint_position(resume_from) if resume_from is not None else None
        resume_from = remote.fetch_latest(args.remote_sync, args.name, args.remote_sync_protocol, checkpoints.dir,
                                          world, local_step) or resume_from
    return resume_from


def start_remote_sync(args, run_dir: Path, world):
    """Rank 0's RemoteSync after a first sync that worked; a failure stops every rank with one line."""
    sync, failure = None, None
    if world.is_master:
        try:
            sync = remote.RemoteSync(run_dir, args.remote_sync, args.name, args.remote_sync_protocol,
                                     args.remote_sync_frequency)
            sync.first_sync()
            sync.start()
        except remote.RemoteSyncError as error:
            failure = str(error)
    failure = broadcast_object(failure)
    if failure is not None:
        raise remote.RemoteSyncError(failure)
    return sync


def start_metrics(args, run_dir, world, values: dict) -> MetricsLogger:
    """The MetricsLogger of every rank; a wandb that cannot start stops every rank with one line."""
    targets = report_targets(args.report_to)
    metrics, failure = None, None
    try:
        metrics = MetricsLogger(run_dir, world.is_master, tensorboard="tensorboard" in targets,
                                wandb_init=wandb_init(args, values) if "wandb" in targets else None)
    except ReportToError as error:
        failure = str(error)
    failure = broadcast_object(failure)
    if failure is not None:
        if metrics is not None:
            metrics.close()
        raise ReportToError(failure)
    return metrics


def wandb_init(args, values: dict) -> dict:
    """OpenCLIP's wandb.init: project, run name = id = --name (so a resumed run continues the
    same wandb run), notes, and as config the settings params.txt holds (OpenCLIP also uploads
    params.txt itself, a copy of that config)."""
    return dict(project=args.wandb_project_name, name=args.name, id=args.name, notes=args.wandb_notes, tags=[],
                resume="allow" if args.resume else None, config=values)


def evaluate_and_record(run, data, sets, tokenizer, preprocess_val, completed_epochs, run_dir, final):
    """Zero-shot, retrieval and Hessian metrics when due; every rank takes part, with barriers
    around, so that a long evaluation on one rank cannot time out the others' collectives."""
    args = run.args
    zero_shot_due = bool(sets) and due(completed_epochs, args.zeroshot_frequency, final)
    val_due = "val" in data and due(completed_epochs, args.val_frequency, final)
    hessian_due = args.hessian_frequency > 0 and "train" in data and due(completed_epochs, args.hessian_frequency, final)
    if not (zero_shot_due or val_due or hessian_due):
        return
    barrier()
    metrics = {}
    if zero_shot_due or val_due:
        with run.layout.evaluation():
            metrics.update(evaluate(run.model, args, run.world, tokenizer, preprocess_val,
                                    val_data=data.get("val") if val_due else None, epoch=completed_epochs,
                                    sets=sets if zero_shot_due else []))
    if hessian_due:
        batches = first_batches(data["train"], args.hessian_num_batches, run.world.device, args.precision)
        metrics.update(hessian_metrics(run.model, contrastive_loss_fn(run.loss), batches, args))
    barrier()
    if metrics:
        if run_dir is not None:
            write_results(metrics, run_dir, completed_epochs, run.step, run.metrics.writer, run.compute.totals())
        run.metrics.log_eval(metrics, step=run.step, epoch=completed_epochs)


def sharding_options(args):
    """The --fsdp-* flags, or None without --fsdp."""
    if not args.fsdp:
        return None
    return ShardingOptions(precision=args.precision, offload_cpu=args.fsdp_offload_cpu,
                           reshard_after_forward=not args.fsdp_no_reshard_after_forward,
                           grad_reduce=args.fsdp_grad_reduce)


def train(args) -> bool:
    """True when the run finished; False when it stopped on a signal after a step checkpoint."""
    world = init_distributed(device=args.device, backend=args.dist_backend, dist_url=args.dist_url,
                             timeout_minutes=args.dist_timeout, set_device_rank=not args.no_set_device_rank)
    check_layout(world, args.use_bn_sync)
    if args.remote_sync:
        remote.filesystem(args.remote_sync, args.remote_sync_protocol)
    setup_logging(None, world.is_master, args.debug, hold=keeps_run_folder(args))
    args.name = agree_on_name(args, world)
    run_dir = Path(args.logs) / args.name if keeps_run_folder(args) else None
    if world.device.type == "cuda":
        # As OpenCLIP: TF32 matmuls and cuDNN autotuning, the speed its users' numbers assume.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    checkpoints = Checkpointer(run_dir / "checkpoints" if run_dir is not None else None, args, world)
    resume_from = resume_checkpoint(args, checkpoints, world)

    seed_everything(args.seed, 0)
    model, preprocess_train, preprocess_val, tokenizer = create_model_and_transforms(
        args, world.device, weights_follow=resume_from is not None)
    prepare_for_training(model, args)
    check_against_model(args, model)
    loss = create_loss(args, world, model)
    values = settings(args, model)
    scripted = torchscript(model, args)
    seed_everything(args.seed, world.rank)
    data = get_data(args, (preprocess_train, preprocess_val), tokenizer, world)
    sets = zero_shot_sets(args, world)
    steps_per_epoch = data["train"].num_batches // args.accum_freq if "train" in data else 0
    if "train" in data and steps_per_epoch == 0:
        raise UsageError(f"--accum-freq {args.accum_freq} exceeds the {data['train'].num_batches} batches per epoch")
    resumed = checkpoints.load(resume_from, model) if resume_from is not None else None

    if run_dir is not None:
        claim_run_dir(args, run_dir, world)
        setup_logging(run_dir / "out.log", world.is_master, args.debug,
                      rank_file=run_dir / f"out-{world.rank}.log" if args.log_local else None)
        if world.is_master:
            write_params(values, run_dir)
    logging.info("Run %s on %d process(es), device %s, precision %s (nsoclip %s, open_clip %s, torch %s)",
                 run_dir if run_dir is not None else f"{args.name} (--logs {args.logs}: no run folder)",
                 world.world_size, world.device, args.precision, __version__, open_clip.__version__, torch.__version__)
    if world.is_master:
        check_worker_count(args.workers)
    checkpoints.remove_partial_writes()
    layout = distribute(model, world, args.ddp_static_graph, args.use_bn_sync, sharding_options(args), scripted,
                        compile_options(args))
    optimizer = create_optimizer(args, model, layout)
    metrics = start_metrics(args, run_dir, world, values)
    run = Run(args=args, world=world, model=model, layout=layout, loss=loss,
              optimizer=optimizer, scaler=grad_scaler(args.precision, world.device),
              schedule=LRSchedule(optimizer, args, steps_per_epoch), checkpoints=checkpoints, metrics=metrics)
    sync = start_remote_sync(args, run_dir, world) if args.remote_sync else None
    try:
        if "train" not in data:
            evaluate_and_record(run, data, sets, tokenizer, preprocess_val, 0, run_dir, True)
            return True
        start_epoch, start_batch = 0, 0
        if resumed is not None:
            start_epoch, start_batch = checkpoints.restore(run, resume_from, resumed, steps_per_epoch)
            logging.info("Resumed from %s: epoch %d, batch %d, step %d", resume_from, start_epoch, start_batch, run.step)
            del resumed
        elif args.resume == "latest":
            logging.info("--resume latest: no checkpoint yet in %s, starting fresh", checkpoints.dir)

        for epoch in range(start_epoch, args.epochs):
            with StopOnSignal(run):
                finished = train_one_epoch(run, data["train"], epoch, start_batch if epoch == start_epoch else 0)
            if not finished:
                logging.warning("Stopped at step %d on request; continue with --resume latest", run.step)
                return False
            completed = epoch + 1
            checkpoints.save_epoch(run, completed)
            if completed < args.epochs and stop_agreed(run):
                logging.warning("Stopped after epoch %d on request; continue with --resume latest", completed)
                return False
            evaluate_and_record(run, data, sets, tokenizer, preprocess_val, completed, run_dir,
                                completed == args.epochs)
        if world.is_master and run_dir is not None:
            logging.info("Done. Log: %s  TensorBoard: %s  Checkpoints: %s", run_dir / "out.log",
                         run_dir / "tensorboard" if metrics.writer else "(--report-to tensorboard to enable)",
                         run_dir / "checkpoints")
        return True
    finally:
        metrics.close()
        if sync is not None:
            sync.close()


def main(argv=None) -> int:
    argv = command_line(argv)
    return run_command(lambda: 0 if train(parse_args(argv)) else STOPPED_ON_REQUEST, argv)


if __name__ == "__main__":
    sys.exit(main())
