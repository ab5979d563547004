"""Hessian evaluator costs and accuracy, printed as one JSON object.

1. Cost of one Hessian-vector product relative to one gradient, same model and batch, timed
   interleaved in one process (exact: double backward under the math attention kernel;
   finite difference: two gradients plus weight moves). The gradient is timed as training
   computes it (default attention kernel).
2. Relative error of the trace estimate versus the number of HVPs, Hutchinson and Hutch++, on
   the micro CLIP whose exact Hessian (torch.autograd.functional.hessian) gives the true trace.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import open_clip
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..hessian import Objective
from ..loss import contrastive_loss_fn
from ..model import resolve_model_name
from ..spectral import hutchinson, hutchpp

CONFIGS = Path(__file__).resolve().parents[3] / "tests" / "configs"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench hessian")
    parser.add_argument("--model", default=str(CONFIGS / "tiny-vit.json"), help="Model for the HVP cost.")
    parser.add_argument("--batch-sizes", default="32,128", help="Per-rank batch sizes for the HVP cost.")
    parser.add_argument("--rounds", type=int, default=30, help="Interleaved timing rounds.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact-model", default=str(CONFIGS / "micro-vit.json"),
                        help="Model small enough for the exact Hessian (trace accuracy).")
    parser.add_argument("--hvp-counts", default="6,12,24,48,96")
    parser.add_argument("--seeds", type=int, default=5)
    return parser.parse_args(argv)


def random_batch(model, batch_size: int, generator: torch.Generator):
    image_size = model.visual.image_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    vocab = model.vocab_size
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    texts = torch.randint(1, vocab, (batch_size, model.context_length), generator=generator)
    return images, texts


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def hvp_cost(args, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(args.model), output_dict=True)
    batch = random_batch(model, batch_size, torch.Generator().manual_seed(1))
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss())
    exact = Objective(model, loss_fn, [batch], hvp="exact")
    fd = Objective(model, loss_fn, [batch], hvp="finite_difference")
    vector = torch.randint(0, 2, (exact.dim,), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    times = {"gradient": [], "exact_hvp": [], "finite_difference_hvp": []}
    with exact, fd:
        calls = {"gradient": exact.local_gradient, "exact_hvp": lambda: exact.hvp(vector),
                 "finite_difference_hvp": lambda: fd.hvp(vector)}
        for call in calls.values():  # warm-up
            call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                times[name].append(timed(call))
    products = ("exact_hvp", "finite_difference_hvp")
    median_ratio = {name: statistics.median(t / g for t, g in zip(times[name], times["gradient"])) for name in products}
    best_ratio = {name: min(times[name]) / min(times["gradient"]) for name in products}
    return {"model": args.model, "num_params": exact.dim, "batch_size": batch_size, "rounds": args.rounds,
            "median_seconds": {name: statistics.median(t) for name, t in times.items()},
            "min_seconds": {name: min(t) for name, t in times.items()},
            "hvp_over_gradient_median_of_rounds": median_ratio, "hvp_over_gradient_min_times": best_ratio,
            "targets": {"exact_hvp": 3.0, "finite_difference_hvp": 2.1}}


def exact_trace(model, loss_fn, batch) -> float:
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(vector):
        state = {n: piece.view(s) for n, piece, s in zip(names, vector.split(sizes), shapes)}
        return loss_fn(lambda images, texts: torch.func.functional_call(model, state, (images, texts)), batch)

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(objective, flat, vectorize=True).double().trace().item()


def trace_accuracy(args) -> dict:
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(args.exact_model), output_dict=True)
    batch = random_batch(model, 8, torch.Generator().manual_seed(1))
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss())
    truth = exact_trace(model, loss_fn, batch)
    counts = [int(c) for c in args.hvp_counts.split(",")]
    errors = {"hutchinson": {}, "hutchpp": {}}
    with Objective(model, loss_fn, [batch]) as objective:
        for count in counts:
            for method, estimator in (("hutchinson", hutchinson), ("hutchpp", hutchpp)):
                relative = []
                for seed in range(args.seeds):
                    samples = estimator(objective.hvp, objective.dim, count, objective.generator(seed),
                                        objective.segments, objective.dtype, objective.device)
                    relative.append(abs(samples.estimate()[0] - truth) / abs(truth))
                errors[method][count] = statistics.mean(relative)
    return {"model": args.exact_model, "num_params": objective.dim, "exact_trace": truth, "seeds": args.seeds,
            "mean_relative_error": errors}


def main(argv) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads,
              "hvp_cost": [hvp_cost(args, int(size)) for size in args.batch_sizes.split(",")],
              "trace_accuracy": trace_accuracy(args)}
    print(json.dumps(result, indent=2))
    return 0
