"""`python -m nsoclip.main`: OpenCLIP's training entry point, with NSO and SAM as optimizers.

Read top to bottom: launch, model, data, resume checkpoint (everything checked before the run
folder is touched), run folder, optimizer, then the epoch loop (train, checkpoint, evaluate).
Runs as a plain process, under torchrun, or under SLURM srun."""
import logging
import signal
import shutil
import sys
import time
from pathlib import Path

import torch

from .checkpoint import Checkpointer, checkpoint_paths
from .classification import zero_shot_sets
from .cli import run_command
from .curvature import hessian_metrics
from .data import get_data
from .distributed import barrier, broadcast_object, init_distributed
from .evaluate import evaluate, write_results
from .loader import first_batches
from .logger import MetricsLogger, setup_logging
from .loss import contrastive_loss_fn, create_loss
from .model import compile_options, create_model_and_transforms, prepare_for_training
from .optim import create_optimizer
from .parallel import ShardingOptions, distribute
from .params import UsageError, parse_args
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
                for leftover in RUN_FILES:
                    path = run_dir / leftover
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise UsageError(refusal)


def write_params(args, run_dir: Path):
    with open(run_dir / "params.txt", "w") as f:
        for name in sorted(vars(args)):
            f.write(f"{name}: {getattr(args, name)}\n")


def due(completed_epochs: int, frequency: int, final: bool) -> bool:
    return final or (frequency > 0 and completed_epochs % frequency == 0)


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
        write_results(metrics, run_dir, completed_epochs, run.step, run.metrics.writer)


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
    setup_logging(None, world.is_master, args.debug)
    args.name = agree_on_name(args, world)
    run_dir = Path(args.logs) / args.name
    if world.device.type == "cuda":
        # As OpenCLIP: TF32 matmuls and cuDNN autotuning, the speed its users' numbers assume.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    seed_everything(args.seed, 0)
    model, preprocess_train, preprocess_val, tokenizer = create_model_and_transforms(args, world.device)
    prepare_for_training(model, args)
    seed_everything(args.seed, world.rank)
    data = get_data(args, (preprocess_train, preprocess_val), tokenizer, world)
    sets = zero_shot_sets(args, world)
    steps_per_epoch = data["train"].num_batches // args.accum_freq if "train" in data else 0
    if "train" in data and steps_per_epoch == 0:
        raise UsageError(f"--accum-freq {args.accum_freq} exceeds the {data['train'].num_batches} batches per epoch")
    checkpoints = Checkpointer(run_dir / "checkpoints", args, world)
    resume_from = checkpoints.resolve(args.resume)
    resumed = checkpoints.load(resume_from, model) if resume_from is not None else None

    claim_run_dir(args, run_dir, world)
    setup_logging(run_dir / "out.log", world.is_master, args.debug)
    if world.is_master:
        write_params(args, run_dir)
    logging.info("Run %s on %d process(es), device %s", run_dir, world.world_size, world.device)
    checkpoints.remove_partial_writes()
    layout = distribute(model, world, args.ddp_static_graph, sharding_options(args), compile_options(args))
    optimizer = create_optimizer(args, model, layout)
    metrics = MetricsLogger(run_dir, world.is_master, tensorboard="tensorboard" in args.report_to)
    run = Run(args=args, world=world, model=model, layout=layout, loss=create_loss(args, world),
              optimizer=optimizer, scaler=grad_scaler(args.precision, world.device),
              schedule=LRSchedule(optimizer, args, steps_per_epoch), checkpoints=checkpoints, metrics=metrics)
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
    finally:
        metrics.close()
    if world.is_master:
        logging.info("Done. Log: %s  TensorBoard: %s  Checkpoints: %s", run_dir / "out.log",
                     run_dir / "tensorboard" if metrics.writer else "(--report-to tensorboard to enable)",
                     run_dir / "checkpoints")
    return True


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: 0 if train(parse_args(argv)) else STOPPED_ON_REQUEST, argv)


if __name__ == "__main__":
    sys.exit(main())
