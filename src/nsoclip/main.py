"""`python -m nsoclip.main`: OpenCLIP's training entry point, with NSO and SAM as optimizers.

Read top to bottom: launch, run folder, model, data, optimizer, resume, then the epoch loop
(train, evaluate, checkpoint). Runs as a plain process, under torchrun, or under SLURM srun."""
import logging
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import Checkpointer
from .data import get_data
from .distributed import barrier, broadcast_object, describe_collective_failure, init_distributed, shutdown
from .logger import MetricsLogger, setup_logging
from .loss import create_loss
from .model import create_model_and_transforms
from .optim import create_optimizer
from .params import UsageError, parse_args
from .precision import grad_scaler
from .scheduler import LRSchedule
from .train import Run, stop_agreed, train_one_epoch

# Exit status of a run stopped by SIGTERM after its step checkpoint: 128 + 15, as a shell reports
# a process ended by SIGTERM. Non-zero because the run is unfinished: torchrun --max-restarts
# restarts it and SLURM requeues it, and neither mistakes it for a completed job.
STOPPED_ON_REQUEST = 128 + signal.SIGTERM


def random_seed(seed: int, rank: int = 0):
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def default_name(args) -> str:
    model = Path(args.model).stem if args.model.endswith(".json") else args.model.replace("/", "-")
    return "-".join([time.strftime("%Y_%m_%d-%H_%M_%S"), f"model_{model}", f"lr_{args.lr}",
                     f"b_{args.batch_size}", f"j_{args.workers}", f"p_{args.precision}"])


def prepare_run_dir(args, world) -> Path:
    """Rank 0 decides (name, refusal) and every rank follows, so no rank is left waiting."""
    decision = None
    if world.is_master:
        name = args.name or default_name(args)
        run_dir = Path(args.logs) / name
        if (run_dir / "out.log").exists() and not args.resume:
            decision = ("error", f"run folder {run_dir} already exists: pass --resume latest to continue it, "
                                 "or choose another --name")
        else:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            decision = ("ok", name)
    status, value = broadcast_object(decision)
    if status == "error":
        raise UsageError(value)
    args.name = value
    return Path(args.logs) / value


def write_params(args, run_dir: Path):
    with open(run_dir / "params.txt", "w") as f:
        for name in sorted(vars(args)):
            f.write(f"{name}: {getattr(args, name)}\n")


def due(completed_epochs: int, frequency: int, final: bool) -> bool:
    return final or (frequency > 0 and completed_epochs % frequency == 0)


def evaluate_and_record(run, data, tokenizer, preprocess_val, completed_epochs, run_dir, final, tb_writer):
    """Zero-shot, retrieval and Hessian metrics when due; every rank takes part, with barriers
    around, so that a long evaluation on one rank cannot time out the others' collectives."""
    args = run.args
    wants_zero_shot = any((args.imagenet_val, args.imagenet_v2, args.imagenet_a, args.imagenet_r, args.zeroshot_data))
    zero_shot_due = wants_zero_shot and due(completed_epochs, args.zeroshot_frequency, final)
    val_due = "val" in data and due(completed_epochs, args.val_frequency, final)
    hessian_due = args.hessian_frequency > 0 and "train" in data and due(completed_epochs, args.hessian_frequency, final)
    if not (zero_shot_due or val_due or hessian_due):
        return
    from .evaluate import evaluate, write_results
    barrier()
    metrics = {}
    if zero_shot_due or val_due:
        eval_args = args if zero_shot_due else no_zero_shot(args)
        metrics.update(evaluate(run.model, eval_args, run.world, tokenizer, preprocess_val,
                                val_data=data.get("val") if val_due else None, epoch=completed_epochs))
    if hessian_due:
        from .hessian import hessian_metrics
        from .loss import contrastive_loss_fn
        batches = first_batches(data["train"], args.hessian_num_batches, run)
        metrics.update(hessian_metrics(run.model, contrastive_loss_fn(run.loss), batches, args))
    barrier()
    if metrics:
        write_results(metrics, run_dir, completed_epochs, run.step, tb_writer)


def no_zero_shot(args):
    copy = type(args)(**vars(args))
    for flag in ("imagenet_val", "imagenet_v2", "imagenet_a", "imagenet_r", "zeroshot_data"):
        setattr(copy, flag, None)
    return copy


def first_batches(info, count, run):
    from .train import to_device
    info.set_position(0, 0)
    batches = []
    for batch in info.dataloader:
        batches.append(to_device(batch, run.world, "fp32"))
        if len(batches) == count:
            break
    return batches


def install_preemption_handler(run):
    """SIGTERM (SLURM preemption, torchrun shutdown) asks for a step checkpoint and a clean exit."""

    def request_stop(signum, frame):
        logging.warning("Received signal %d: will checkpoint and stop at the next agreed step", signum)
        run.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)


def train(args) -> bool:
    """True when the run finished; False when it stopped on request after a step checkpoint."""
    world = init_distributed(device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                             backend=args.dist_backend, dist_url=args.dist_url,
                             timeout_minutes=args.dist_timeout, set_device_rank=not args.no_set_device_rank)
    run_dir = prepare_run_dir(args, world)
    setup_logging(run_dir / "out.log", world.is_master, args.debug)
    if world.is_master:
        write_params(args, run_dir)
    logging.info("Run %s on %d process(es), device %s", run_dir, world.world_size, world.device)
    if world.device.type == "cuda":
        # As OpenCLIP: TF32 matmuls and cuDNN autotuning, the speed its users' numbers assume.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    random_seed(args.seed, 0)
    model, preprocess_train, preprocess_val, tokenizer = create_model_and_transforms(args, world.device)
    random_seed(args.seed, world.rank)
    data = get_data(args, (preprocess_train, preprocess_val), tokenizer, world)
    ddp_model = None
    if world.distributed:
        ddp_model = DistributedDataParallel(
            model, device_ids=[world.device] if world.device.type == "cuda" else None,
            static_graph=args.ddp_static_graph)

    optimizer = create_optimizer(args, model, ddp_model)
    metrics = MetricsLogger(run_dir, world.is_master, tensorboard="tensorboard" in args.report_to)
    checkpoints = Checkpointer(run_dir / "checkpoints", args, world.is_master)
    run = Run(args=args, world=world, model=model, ddp_model=ddp_model, loss=create_loss(args, world),
              optimizer=optimizer, scaler=grad_scaler(args.precision, world.device), schedule=None,
              checkpoints=checkpoints, metrics=metrics)
    install_preemption_handler(run)

    if "train" not in data:
        evaluate_and_record(run, data, tokenizer, preprocess_val, 0, run_dir, True, metrics.writer)
        metrics.close()
        return True
    steps_per_epoch = data["train"].num_batches // args.accum_freq
    if steps_per_epoch == 0:
        raise UsageError(f"--accum-freq {args.accum_freq} exceeds the {data['train'].num_batches} batches per epoch")
    run.schedule = LRSchedule(optimizer, args, steps_per_epoch)

    start_epoch, start_batch = 0, 0
    resume_from = checkpoints.resolve(args.resume)
    if resume_from is not None:
        start_epoch, start_batch = checkpoints.restore(run, resume_from, steps_per_epoch)
        logging.info("Resumed from %s: epoch %d, batch %d, step %d", resume_from, start_epoch, start_batch, run.step)
    elif args.resume == "latest":
        logging.info("--resume latest: no checkpoint yet in %s, starting fresh", checkpoints.dir)

    try:
        for epoch in range(start_epoch, args.epochs):
            finished = train_one_epoch(run, data["train"], epoch, start_batch if epoch == start_epoch else 0)
            if not finished:
                logging.warning("Stopped at step %d on request; continue with --resume latest", run.step)
                return False
            completed = epoch + 1
            checkpoints.save_epoch(run, completed)
            evaluate_and_record(run, data, tokenizer, preprocess_val, completed, run_dir,
                                completed == args.epochs, metrics.writer)
            if completed < args.epochs and stop_agreed(run):
                logging.warning("Stopped after epoch %d on request; continue with --resume latest", completed)
                return False
    finally:
        metrics.close()
    if world.is_master:
        logging.info("Done. Log: %s  TensorBoard: %s  Checkpoints: %s", run_dir / "out.log",
                     run_dir / "tensorboard" if metrics.writer else "(--report-to tensorboard to enable)",
                     run_dir / "checkpoints")
    return True


def one_line(error: BaseException) -> str:
    """Errors re-raised from dataloader workers carry the worker's traceback: keep its last line."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    head, sep, tail = last.partition(": ")
    return tail if sep and "." in head and " " not in head else last


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        finished = train(args)
    except (ValueError, RuntimeError) as error:
        message = one_line(error) if is_user_error(error) else describe_collective_failure(error, args.dist_timeout)
        if args.debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0 if finished else STOPPED_ON_REQUEST


def is_user_error(error: BaseException) -> bool:
    """Our own error types (bad flags, files, checkpoints, launch, data) print as one line; any
    other exception is a bug and keeps its traceback."""
    return type(error).__module__.startswith("nsoclip") or "nsoclip." in str(error)


if __name__ == "__main__":
    sys.exit(main())
