"""One training epoch, read top to bottom: fetch `accum_freq` batches, build the closure that
computes the contrastive loss and its gradient, hand it to the optimizer, agree on a stop, log,
checkpoint.

The loop does not know how NSO or SAM form their gradient: it only builds the closure and calls
`take_step`. The closure runs forward and backward at whatever weights the optimizer has set;
what the optimizer spent is counted from its closure calls (`nsoclip.compute`)."""
import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import Checkpointer
from .compute import ComputeMeter
from .distributed import World, all_reduce_mean, all_reduce_sum
from .errors import NsoclipError
from .loader import to_device
from .logger import MetricsLogger
from .parallel import Layout, full_tensor, unwrap
from .precision import autocast
from .scheduler import LRSchedule
from .update import UpdateResult, take_step

# A GradScaler whose scale fell this low no longer overflows by accident: its skips are real
# non-finite gradients and count towards --max-nonfinite-steps.
COLLAPSED_LOSS_SCALE = 1.0
# Model outputs that are parameters, not one row per sample.
SCALAR_OUTPUTS = ("logit_scale", "logit_bias")


class TrainingError(NsoclipError, RuntimeError):
    """Training cannot go on (too many non-finite steps); the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything a training step touches, built once by main()."""
    args: object
    world: World
    model: torch.nn.Module                 # the bare open_clip model (saved, evaluated)
    layout: Layout                         # how it is laid out over the ranks (nsoclip.parallel)
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    schedule: LRSchedule
    checkpoints: Checkpointer
    metrics: MetricsLogger
    compute: ComputeMeter = field(default_factory=ComputeMeter)
    step: int = 0
    nonfinite_streak: int = 0
    nonfinite_total: int = 0
    overflow_total: int = 0
    stop_requested: bool = False

    @property
    def forward_model(self):
        """What the training step calls (DDP's wrapper, a --torchscript model); checkpoints and
        evaluation use `model`, whose state_dict has plain open_clip's keys."""
        return self.layout.forward_model


class StopOnSignal:
    """SIGTERM (SLURM preemption, torchrun shutdown) and SIGINT while an epoch runs: every rank
    finishes the step it is in, all agree on the stop at the end of that step (train_one_epoch
    asks every step), write a step checkpoint and exit. The signal's default action is back at
    once, so a second signal ends the process immediately; on exit the previous handlers return."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run: Run):
        self.run = run

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.request_stop) for sig in self.SIGNALS}
        return self

    def request_stop(self, signum, frame):
        logging.warning("Received signal %d after step %d: stopping after the step in progress with a step "
                        "checkpoint (a second signal ends the process at once)", signum, self.run.step)
        self.run.stop_requested = True
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def make_closure(run: Run, micro_batches):
    """Forward + backward of the contrastive loss over the whole accumulated batch.

    With accum_freq > 1 this follows OpenCLIP's feature caching: features of every micro-batch are
    computed without gradient, then each micro-batch is recomputed with gradient and the loss is
    taken over all cached features, so the contrastive loss sees the whole accumulated batch.
    Unlike OpenCLIP, logit_scale carries gradient in one micro-batch only, so the sum of the
    micro-batch gradients is exactly the gradient of the full-batch loss. All micro-batches but
    the last run under the layout's no_sync (DDP's: gradients are reduced once per step).

    `closure(backward=False)` is the forward alone, without gradient (each micro-batch once), and
    returns the same loss: a pass that only updates BatchNorm statistics at w."""
    args, model, loss = run.args, run.forward_model, run.loss
    scaler = run.scaler

    def backpropagate(value):
        (scaler.scale(value) if scaler is not None else value).backward()

    def forward_only():
        with torch.no_grad(), autocast(args.precision, run.world.device):
            outs = [unwrap(model)(images, texts) for images, texts in micro_batches]
            features = {key: torch.cat([out[key] for out in outs]) for key in ("image_features", "text_features")}
            extras = {key: outs[-1][key] for key in ("logit_scale", "logit_bias") if outs[-1].get(key) is not None}
            return loss(**features, **extras)

    def closure(backward: bool = True):
        if not backward:
            return forward_only().detach()
        if len(micro_batches) == 1:
            images, texts = micro_batches[0]
            with autocast(args.precision, run.world.device):
                total = loss(**model(images, texts))
            backpropagate(total)
            return total.detach()
        with torch.no_grad(), autocast(args.precision, run.world.device):
            cached = [run.model(images, texts) for images, texts in micro_batches]
        last = len(micro_batches) - 1
        for j, (images, texts) in enumerate(micro_batches):
            sync = run.layout.no_sync() if j < last else contextlib.nullcontext()
            with sync:
                with autocast(args.precision, run.world.device):
                    out = model(images, texts)
                    # Per-sample outputs (features; CoCa's caption logits and labels) over the
                    # whole accumulated batch; the scalar parameters once.
                    features = {
                        key: torch.cat([out[key] if m == j else c[key] for m, c in enumerate(cached)])
                        for key in out if key not in SCALAR_OUTPUTS
                    }
                    extras = {key: (out[key] if j == last else out[key].detach())
                              for key in SCALAR_OUTPUTS if out.get(key) is not None}
                    total = loss(**features, **extras)
                backpropagate(total)
        return total.detach()

    return closure


def train_one_epoch(run: Run, data, epoch: int, start_batch: int = 0) -> bool:
    """True when the epoch ended; False when the ranks stopped on a signal after a step checkpoint."""
    args, world = run.args, run.world
    accum = args.accum_freq
    steps_per_epoch = data.num_batches // accum
    run.forward_model.train()
    data.set_position(epoch, start_batch)
    batches = iter(data.dataloader)
    global_batch = args.batch_size * world.world_size * accum
    window = new_window()
    tick = time.perf_counter()

    for step_in_epoch in range(start_batch // accum, steps_per_epoch):
        micro_batches = [to_device(next(batches), world.device, args.precision) for _ in range(accum)]
        data_time = time.perf_counter() - tick
        lr = run.schedule(run.step)

        shapes = tuple((tuple(images.shape), tuple(texts.shape)) for images, texts in micro_batches)
        closure = run.compute.counting(make_closure(run, micro_batches), shapes, world.world_size)
        loss, update = take_step(run.optimizer, closure, run.scaler, args.grad_clip_norm)
        with torch.no_grad():
            unwrap(run.model).logit_scale.clamp_(0, math.log(100))
        run.step += 1
        run.compute.count_samples(global_batch)
        track_nonfinite(run, loss, update)

        window["loss"].append(loss)
        window["stats"].append(getattr(run.optimizer, "step_stats", {}))
        window["data_time"] += data_time
        window["step_time"] += time.perf_counter() - tick
        window["steps"] += 1
        window["perturbed_steps"] += int(update.perturbed)
        batches_done = (step_in_epoch + 1) * accum
        last = step_in_epoch + 1 == steps_per_epoch
        if run.step % args.log_every_n_steps == 0 or last:
            log_window(run, window, epoch, step_in_epoch + 1, steps_per_epoch, lr, update, global_batch, data)
            window = new_window()
        if not last and stop_agreed(run):
            run.checkpoints.save_step(run, epoch, batches_done)
            return False
        if args.save_every_n_steps and run.step % args.save_every_n_steps == 0 and not last:
            run.checkpoints.save_step(run, epoch, batches_done)
        tick = time.perf_counter()
    return True


def stop_agreed(run: Run) -> bool:
    """A stop request (a signal) may reach ranks at different steps: one tiny all-reduce after
    every step tells all of them, so all stop after the same step."""
    if not run.world.distributed:
        return run.stop_requested
    flag = torch.tensor([float(run.stop_requested)], device=run.world.device)
    return all_reduce_sum(flag).item() > 0


def track_nonfinite(run: Run, loss: torch.Tensor, update: UpdateResult):
    """Gradients are identical on every rank after the all-reduce, so every rank skips alike.
    A GradScaler overflow (finite loss, inf gradient, scale still high) is fp16 training working
    as designed: logged, not counted."""
    if update.applied:
        run.nonfinite_streak = 0
        return
    if update.loss_scale is not None and update.loss_scale > COLLAPSED_LOSS_SCALE and bool(torch.isfinite(loss)):
        run.overflow_total += 1
        logging.info("step %d: fp16 gradient overflow at loss scale %g, step skipped and the scale lowered "
                     "(expected now and then with --precision amp)", run.step, update.loss_scale)
        return
    run.nonfinite_streak += 1
    run.nonfinite_total += 1
    logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                    run.step, run.nonfinite_streak)
    if run.nonfinite_streak >= run.args.max_nonfinite_steps:
        raise TrainingError(f"{run.nonfinite_streak} consecutive steps with a non-finite loss or gradient "
                            f"(--max-nonfinite-steps {run.args.max_nonfinite_steps}) at step {run.step}; "
                            "the last good checkpoint is kept")


def new_window() -> dict:
    return {"loss": [], "stats": [], "data_time": 0.0, "step_time": 0.0, "steps": 0, "perturbed_steps": 0}


def window_means(window) -> dict:
    """The loss and every loss the optimizer reports (NSO's perturbed_loss, SAM's clean_loss and
    perturbed_loss), each averaged over the window's steps and then over all ranks, in one
    all-reduce (OpenCLIP logs rank 0's last step). Other statistics (sigma, rho) are the last
    step's, the same on every rank."""
    per_step = {"loss": window["loss"]}
    for key, value in window["stats"][-1].items():
        if isinstance(value, torch.Tensor):
            per_step[key] = [stats[key] for stats in window["stats"]]
    means = torch.stack([torch.stack(values).float().mean() for values in per_step.values()])
    averaged = dict(zip(per_step, all_reduce_mean(means).tolist()))
    last = {key: float(value) for key, value in window["stats"][-1].items() if key not in averaged}
    return {"loss": averaged.pop("loss"), **last, **averaged}


def log_window(run: Run, window, epoch, step_in_epoch, steps_per_epoch, lr, update, global_batch, data):
    """Log the window's metrics: losses averaged over its steps and all ranks (window_means; OpenCLIP
    logs rank 0's only), times averaged over its steps, grad_norm of its last step (identical on
    every rank), how many of the window's steps were perturbed (NSO, SAM) and the cumulative compute."""
    world = run.world
    losses = window_means(window)
    steps = window["steps"]
    step_time = window["step_time"] / steps
    metrics = {
        "loss": losses.pop("loss"),
        "lr": lr,
        "scale": full_tensor(unwrap(run.model).logit_scale).exp().item(),
        "grad_norm": update.grad_norm.item(),
        "step_time": step_time,
        "data_time": window["data_time"] / steps,
        "samples_per_second": global_batch / step_time,
        "samples_per_second_per_gpu": global_batch / step_time / world.world_size,
        "nonfinite_steps": run.nonfinite_total,
        "window_steps": steps,
        "perturbed_steps": window["perturbed_steps"],
        **run.compute.totals(),
    }
    if run.scaler is not None:
        metrics["fp16_overflow_steps"] = run.overflow_total
    metrics.update(losses)
    if data.bad_sample_counts is not None:
        metrics.update({f"bad_samples/{k}": v for k, v in data.bad_sample_counts().items()})
    run.metrics.log_train(metrics, step=run.step, epoch=epoch, progress=(step_in_epoch, steps_per_epoch))
