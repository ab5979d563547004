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
   on the CPU (`--skip accuracy` or `--hvp-counts ''` skips it).
3. Per-rank memory of Lanczos with `--memory-max-iter` (100) iterations at 2 gloo ranks, the
   basis replicated (every rank the full vectors, products all-reduced: the layout before the
   sharded basis) against sharded (each rank 1/R, products gathered and reduce-scattered), each
   layout in its own pair of processes: the basis bytes from the tensors, the process's RSS when
   Lanczos starts and its peak RSS (VmHWM) after, the time, and the eigenvalue both find.
4. Time of SLQ per product (`--slq-probes` x `--slq-steps` on `--model` at the first batch size,
   one batch: a kept graph) against a lone product on the same graph, measured in one process:
   the difference is the reorthogonalisation against the growing basis.
5. Finite-difference products of the same model at 2 gloo ranks laid out by FSDP2 (--fsdp: the
   points formed on local shards, the backward's reduce-scatter averaging) against DDP's layout
   (whole parameters: the vector gathered, this rank's product, a reduce-scatter), both in the
   same pair of processes, interleaved over `--fd-rounds`: seconds per product, the bytes each
   keeps per rank (parameters and point buffers, measured from the tensors), and the largest
   difference between the two products.
6. A paper estimate of the per-rank Lanczos memory of `--paper-model` (ViT-L-14) at
   `--paper-ranks` (8) and m = `--memory-max-iter`, parameters counted on the meta device.
"""
import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed
from ..curvature import Objective, spectral_density
from ..distributed import World
from ..launch import spawn_local_ranks
from ..loss import contrastive_loss_fn
from ..model import resolve_model_name
from ..parallel import ShardingOptions, local_tensor, shard
from ..spectral import CHUNK, HUTCHINSON_BLOCK, Space, hutchinson, hutchpp, lanczos
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
    parser.add_argument("--memory-max-iter", type=int, default=100, help="Lanczos iterations m of the memory case.")
    parser.add_argument("--memory-batch-size", type=int, default=8, help="Global batch of the memory case.")
    parser.add_argument("--slq-probes", type=int, default=2)
    parser.add_argument("--slq-steps", type=int, default=30)
    parser.add_argument("--paper-model", default="ViT-L-14")
    parser.add_argument("--paper-ranks", type=int, default=8)
    parser.add_argument("--fd-rounds", type=int, default=10, help="Interleaved rounds of the FSDP2 vs DDP case.")
    parser.add_argument("--skip", default="",
                        help="Comma-separated parts to leave out: cost,accuracy,memory,slq,fsdp.")
    return parser.parse_args(argv)


def random_batch(model, batch_size: int, generator: torch.Generator):
    image_size = model.visual.image_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    vocab = model.vocab_size
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    texts = torch.randint(1, vocab, (batch_size, model.context_length), generator=generator)
    return images, texts


def timed(call, device=torch.device("cpu")) -> float:
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
                    samples = estimator(objective.products, objective.space, objective.probes(seed, method), count)
                    relative.append(abs(samples.estimate()[0] - truth) / abs(truth))
                errors[method][count] = statistics.mean(relative)
    return {"model": args.exact_model, "num_params": objective.dim, "exact_trace": truth, "seeds": args.seeds,
            "mean_relative_error": errors}


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status (Linux). Not
    ru_maxrss: Linux keeps that across exec, so a spawned rank would report its parent's peak."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def lanczos_memory_worker(rank, world_size, port, model_name, batch_size, max_iter, layout, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30))
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(model_name), output_dict=True)
    images, texts = random_batch(model, batch_size, torch.Generator().manual_seed(1))
    share = batch_size // world_size
    batch = images[rank * share:(rank + 1) * share], texts[rank * share:(rank + 1) * share]
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                     world_size=world_size))
    sizes = {}

    def record(state):
        sizes["basis"] = state["basis"].untyped_storage().nbytes()

    with Objective(model, loss_fn, [batch]) as objective:
        probes = objective.probes(0, "lanczos")
        if layout == "sharded":
            products, space = objective.products, objective.space
        else:
            space = Space(objective.dim, objective.dim, distributed.all_reduce_sum, dtype=objective.dtype)
            products = lambda rows: distributed.all_reduce_mean(objective.local_products(rows))  # noqa: E731
            probes = (lambda draw: lambda start, count: objective.shards.gather(draw(start, count)))(probes)
        products(probes(0, 1))  # builds the kept graph; every iteration after reuses it
        start_rss = resident_bytes("VmRSS")
        started = time.perf_counter()
        # k = 10 with tol 0: the top Ritz value alone can reach a residual of exactly 0 (it did
        # after 28 steps), ten never do, so all max_iter steps run.
        result = lanczos(products, space, probes, 10, max_iter, 0.0, checkpoint=record)
        seconds = time.perf_counter() - started
        peak_rss = resident_bytes("VmHWM")
        parameter_bytes = objective.dim * torch.finfo(objective.dtype).bits // 8
    record_ = {"rank": rank, "layout": layout, "num_params": objective.dim, "local_dim": space.local_dim,
               "basis_bytes": sizes["basis"], "parameter_bytes": parameter_bytes, "rss_at_start": start_rss,
               "peak_rss": peak_rss, "peak_rss_above_start": peak_rss - start_rss, "seconds": seconds,
               "num_products": result.num_products, "top_eigenvalue": result.eigenvalues[0]}
    Path(out_dir, f"{layout}-rank{rank}.json").write_text(json.dumps(record_))
    dist.destroy_process_group()


def lanczos_memory(args) -> dict:
    """Replicated against sharded Lanczos bases at 2 ranks, each layout in fresh processes."""
    layouts = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for layout in ("replicated", "sharded"):
            spawn_local_ranks(lanczos_memory_worker, 2, args.model, args.memory_batch_size, args.memory_max_iter,
                              layout, out_dir, timeout=3600)
            layouts[layout] = [json.loads(Path(out_dir, f"{layout}-rank{r}.json").read_text()) for r in range(2)]
    mib = 1 << 20
    summary = {layout: {"basis_mib_per_rank": [r["basis_bytes"] / mib for r in ranks],
                        "peak_rss_above_start_mib_per_rank": [r["peak_rss_above_start"] / mib for r in ranks],
                        "peak_rss_mib_per_rank": [r["peak_rss"] / mib for r in ranks],
                        "seconds": max(r["seconds"] for r in ranks)}
               for layout, ranks in layouts.items()}
    return {"model": args.model, "world_size": 2, "max_iter": args.memory_max_iter,
            "global_batch_size": args.memory_batch_size, "summary": summary, "ranks": layouts}


def slq_cost(args) -> dict:
    """SLQ's time per product against a lone product on the same kept graph, one process."""
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(args.model), output_dict=True)
    batch_size = int(args.batch_sizes.split(",")[0])
    batch = random_batch(model, batch_size, torch.Generator().manual_seed(1))
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss())
    with Objective(model, loss_fn, [batch]) as objective:
        vector = objective.probes(0, "cost")(0, 1)
        objective.products(vector)
        lone = statistics.median(timed(lambda: objective.products(vector)) for _ in range(10))
    # spectral_density keeps its own graph: one product builds it, the rest reuse it, as above
    started = time.perf_counter()
    density = spectral_density(model, loss_fn, [batch], num_probes=args.slq_probes, num_steps=args.slq_steps)
    seconds = time.perf_counter() - started
    per_product = seconds / density["num_hvps"]
    return {"model": args.model, "batch_size": batch_size, "num_params": density["num_params"],
            "num_probes": args.slq_probes, "num_steps": args.slq_steps, "num_hvps": density["num_hvps"],
            "seconds": seconds, "seconds_per_product": per_product, "lone_product_seconds": lone,
            "slq_per_product_over_lone_product": per_product / lone}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fd_layouts_worker(rank, world_size, port, model_name, batch_size, rounds, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30))
    world = World(rank=rank, local_rank=rank, world_size=world_size)
    torch.manual_seed(0)
    plain = open_clip.create_model(resolve_model_name(model_name), output_dict=True)
    sharded = open_clip.create_model(resolve_model_name(model_name), output_dict=True)
    sharded.load_state_dict(plain.state_dict())
    shard(sharded, world, ShardingOptions())
    images, texts = random_batch(plain, batch_size, torch.Generator().manual_seed(1))
    share = batch_size // world_size
    batch = images[rank * share:(rank + 1) * share], texts[rank * share:(rank + 1) * share]
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                     world_size=world_size))
    objectives = {"ddp": Objective(plain, loss_fn, [batch], hvp="finite_difference").__enter__(),
                  "fsdp": Objective(sharded, loss_fn, [batch], hvp="finite_difference").__enter__()}
    rows = {name: objective.probes(0, "bench")(0, 1) for name, objective in objectives.items()}
    products = {name: objective.products(rows[name]) for name, objective in objectives.items()}  # warm-up
    whole = {name: objectives[name].shards.gather(product) for name, product in products.items()}
    times = {name: [] for name in objectives}
    for round_index in range(rounds):
        for name in (("ddp", "fsdp") if round_index % 2 == 0 else ("fsdp", "ddp")):
            times[name].append(timed(lambda: objectives[name].products(rows[name])))
    held = {}
    for name, objective in objectives.items():
        params = [local_tensor(p) for p in objective.params]
        buffers = [t for point in objective.point_buffers() for t in point] + list(objective.weights())
        held[name] = {"parameters": tensor_bytes(params),
                      "point_buffers_and_snapshot": tensor_bytes({id(t): t for t in buffers
                                                                  if all(t is not p for p in params)}.values())}
    difference = ((whole["fsdp"] - whole["ddp"]).norm() / whole["ddp"].norm()).item()
    record = {"rank": rank, "num_params": objectives["ddp"].dim,
              "local_dim": {name: objective.shards.local_dim for name, objective in objectives.items()},
              "median_seconds": {name: statistics.median(t) for name, t in times.items()},
              "bytes_held": held, "relative_difference": difference}
    Path(out_dir, f"fd-rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def fd_layouts(args) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        spawn_local_ranks(fd_layouts_worker, 2, args.model, args.memory_batch_size, args.fd_rounds, out_dir,
                          timeout=3600)
        ranks = [json.loads(Path(out_dir, f"fd-rank{r}.json").read_text()) for r in range(2)]
    ratio = [r["median_seconds"]["fsdp"] / r["median_seconds"]["ddp"] for r in ranks]
    return {"model": args.model, "world_size": 2, "global_batch_size": args.memory_batch_size,
            "rounds": args.fd_rounds, "fsdp_over_ddp_seconds_per_product": ratio, "ranks": ranks}


def paper_estimate(model_name: str, world_size: int, max_iter: int) -> dict:
    """Per-rank bytes of Lanczos with m = max_iter on world_size ranks, fp32: the basis, and the
    working vectors of one product (the gathered direction and the padded product, full length;
    this rank's reduce-scattered slice and residual; two float64 gram buffers), beside the
    replicated basis. The model, its gradient graph and activations come on top in both."""
    with torch.device("meta"):
        model = open_clip.create_model(model_name, device="meta")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = -(-count // world_size)
    gib = 1 << 30
    working = (2 * count + 2 * shard) * 4 + 2 * CHUNK * 8
    return {"model": model_name, "num_params": count, "world_size": world_size, "max_iter": max_iter,
            "replicated_basis_gib_per_rank": max_iter * count * 4 / gib,
            "sharded_basis_gib_per_rank": max_iter * shard * 4 / gib,
            "sharded_working_vectors_gib_per_rank": working / gib,
            "sharded_total_gib_per_rank": (max_iter * shard * 4 + working) / gib}


def main(argv) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device(args.device)
    result = {"threads": args.threads, "torch": torch.__version__}
    if "cost" not in skip:
        with tempfile.TemporaryDirectory() as directory:
            costs = [hvp_cost(model_spec(args.model, directory), int(size), args.rounds, args.block_size, device)
                     for size in args.batch_sizes.split(",")]
            if args.compute_model:
                costs.append(hvp_cost(model_spec(args.compute_model, directory), args.compute_batch_size,
                                      args.compute_rounds, args.block_size, device))
        result["hvp_cost"] = costs
    if "accuracy" not in skip and args.hvp_counts:
        result["trace_accuracy"] = trace_accuracy(args)
    if "memory" not in skip:
        result["lanczos_memory"] = lanczos_memory(args)
    if "slq" not in skip:
        result["slq_cost"] = slq_cost(args)
    if "fsdp" not in skip:
        result["fd_products_fsdp_vs_ddp"] = fd_layouts(args)
    result["paper_estimate"] = paper_estimate(args.paper_model, args.paper_ranks, args.memory_max_iter)
    print(json.dumps(result, indent=2))
    return 0
