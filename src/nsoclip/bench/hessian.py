"""Hessian evaluator costs and accuracy, printed as one JSON object.

1. Cost of one Hessian-vector product relative to one gradient (the flat gradient vector), same
   model and batch, timed interleaved in one process (each round starting at the next arm).
   Exact products (double backward under the math attention kernel) are timed three ways:
   - `exact_hvp_block`: per product of a block of `--block-size` on a fresh graph, which is what
     hessian_trace spends when each call rebuilds the batch's graph (several batches per rank);
   - `exact_hvp_kept_graph`: per product on a kept graph (one batch per rank: every trace probe
     and Lanczos iteration after the first);
   - `exact_hvp_alone`: one product with its own graph (a single curvature_along).
   Finite-difference products: two gradients at w +- t v and the parameter-sized work around them.
   The gradient is timed as training computes it (default attention kernel).
   Cases: `--model` at each of `--batch-sizes` (a tiny ViT whose 49,408-token embedding is 92% of
   its parameters but almost none of its compute), and `--compute-model` (bench-vit of
   `bench nso`), whose gradient, like a real CLIP's, dwarfs parameter-sized work.
   `--device cuda` times the products on the GPU (fp32: the evaluator turns TF32 off).
2. Relative error of the trace estimate versus the number of HVPs, Hutchinson and Hutch++, on
   the micro CLIP whose exact Hessian (torch.autograd.functional.hessian) gives the true trace,
   on the CPU (`--hvp-counts ''` skips it).
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..curvature import Objective
from ..loss import contrastive_loss_fn
from ..model import resolve_model_name
from ..spectral import HUTCHINSON_BLOCK, hutchinson, hutchpp
from .nso import model_spec, synchronize

CONFIGS = Path(__file__).resolve().parents[3] / "tests" / "configs"
TARGETS = {"exact_hvp_block": 3.0, "finite_difference_hvp": 2.1}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench hessian")
    parser.add_argument("--model", default=str(CONFIGS / "tiny-vit.json"), help="Model for the HVP cost.")
    parser.add_argument("--batch-sizes", default="32,128", help="Per-rank batch sizes for the HVP cost.")
    parser.add_argument("--rounds", type=int, default=30, help="Interleaved timing rounds.")
    parser.add_argument("--compute-model", default="bench-vit",
                        help="A second, compute-bound model for the HVP cost ('' to skip).")
    parser.add_argument("--compute-batch-size", type=int, default=64)
    parser.add_argument("--compute-rounds", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=HUTCHINSON_BLOCK,
                        help="Products per block, as --hessian-block-size.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="Device of the HVP cost (cpu or cuda).")
    parser.add_argument("--exact-model", default=str(CONFIGS / "micro-vit.json"),
                        help="Model small enough for the exact Hessian (trace accuracy).")
    parser.add_argument("--hvp-counts", default="6,12,24,48,96", help="HVP budgets of the trace accuracy ('': skip).")
    parser.add_argument("--seeds", type=int, default=5)
    return parser.parse_args(argv)


def random_batch(model, batch_size: int, generator: torch.Generator):
    image_size = model.visual.image_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    vocab = model.vocab_size
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    texts = torch.randint(1, vocab, (batch_size, model.context_length), generator=generator)
    return images, texts


def timed(call, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def hvp_cost(model_name: str, batch_size: int, rounds: int, block_size: int, device=torch.device("cpu")) -> dict:
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(model_name), output_dict=True).to(device)
    batch = tuple(t.to(device) for t in random_batch(model, batch_size, torch.Generator().manual_seed(1)))
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss())

    def objective(hvp: str) -> Objective:
        return Objective(model, loss_fn, [batch], hvp=hvp).__enter__()

    kept, finite_difference = objective("exact"), objective("finite_difference")
    vectors = (torch.randint(0, 2, (block_size, kept.dim), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
               ).to(device)
    calls = {"gradient": kept.local_gradient,
             "exact_hvp_block": lambda: objective("exact").products(vectors),
             "exact_hvp_kept_graph": lambda: kept.hvp(vectors[0]),
             "exact_hvp_alone": lambda: objective("exact").hvp(vectors[0]),
             "finite_difference_hvp": lambda: finite_difference.hvp(vectors[0])}
    products_per_call = {"exact_hvp_block": block_size}
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up; also builds the kept graph
        call()
    names = list(calls)
    for round_index in range(rounds):  # each round starts at the next arm, so none always follows the same one
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            times[name].append(timed(calls[name], device) / products_per_call.get(name, 1))
    kept.__exit__(None, None, None)
    finite_difference.__exit__(None, None, None)
    products = [name for name in calls if name != "gradient"]
    median_ratio = {name: statistics.median(t / g for t, g in zip(times[name], times["gradient"])) for name in products}
    best_ratio = {name: min(times[name]) / min(times["gradient"]) for name in products}
    return {"model": model_name, "num_params": kept.dim, "batch_size": batch_size, "rounds": rounds,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "block_size": block_size,
            "median_seconds": {name: statistics.median(t) for name, t in times.items()},
            "hvp_over_gradient_median_of_rounds": median_ratio, "hvp_over_gradient_min_times": best_ratio,
            "targets": TARGETS}


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
                    samples = estimator(objective.products, objective.dim, count, objective.generator(seed),
                                        objective.segments, objective.dtype, objective.device)
                    relative.append(abs(samples.estimate()[0] - truth) / abs(truth))
                errors[method][count] = statistics.mean(relative)
    return {"model": args.exact_model, "num_params": objective.dim, "exact_trace": truth, "seeds": args.seeds,
            "mean_relative_error": errors}


def main(argv) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as directory:
        costs = [hvp_cost(model_spec(args.model, directory), int(size), args.rounds, args.block_size, device)
                 for size in args.batch_sizes.split(",")]
        if args.compute_model:
            costs.append(hvp_cost(model_spec(args.compute_model, directory), args.compute_batch_size,
                                  args.compute_rounds, args.block_size, device))
    result = {"threads": args.threads, "torch": torch.__version__, "hvp_cost": costs}
    if args.hvp_counts:
        result["trace_accuracy"] = trace_accuracy(args)
    print(json.dumps(result, indent=2))
    return 0
