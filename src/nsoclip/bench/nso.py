"""`python -m nsoclip.bench nso`: what an NSO step costs next to an AdamW step on the same CLIP.

- step-time ratio NSO / AdamW (k=1, two-point, lam=0): AdamW steps, NSO steps (both through
  `nsoclip.optim.take_step`, as in training) and bare forward+backward passes interleaved in one
  process on the same batch, median and quartiles over repeats; also the ratio to the ideal NSO
  cost (two passes + one update = one AdamW step + one pass), and what NSO does outside its passes
  beyond AdamW's update (snapshot, noise, reflection, restore, gradient scaling) with the noise
  draw alone timed beside it;
- extra memory beyond AdamW in parameter copies: the bytes of every tensor NSO (or SAM) holds
  outside the base optimizer's state, over the parameter bytes; on CUDA also the peak;
- model FLOP utilisation of the AdamW step: the forward + backward FLOPs that torch's
  FlopCounterMode counts (matmuls, convolutions, attention), over the median AdamW step time,
  over the matmul rate measured here at the compute dtype (bf16 under amp_bf16);
- gradient all-reduces per step under 2-rank gloo DDP, counted with a DDP comm hook, for NSO,
  SAM local/global ascent and plain AdamW.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..launch import spawn_local_ranks
from ..model import resolve_model_name
from ..nso import NSO, noise_draw
from ..update import take_step
from ..precision import autocast, grad_scaler
from ..rng import Streams
from ..sam import SAM

# A ViT CLIP a little larger than tests/configs/tiny-vit.json (same OpenCLIP vocabulary).
BENCH_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
SHARED_WITH_BASE = ("base_optimizer", "param_groups", "state", "defaults")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m nsoclip.bench nso", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-vit",
                        help="OpenCLIP model name or config JSON; 'bench-vit' is the small ViT defined here.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="Timed repeats (each: one step of every arm).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16"])
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--ddp-steps", type=int, default=3, help="Steps per optimizer in the 2-rank count (0: skip).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    return parser.parse_args(argv)


def model_spec(model: str, directory: str) -> str:
    """A name or config path that resolve_model_name understands (in this or a spawned process)."""
    if model != "bench-vit":
        return model
    path = Path(directory) / "bench-vit.json"
    path.write_text(json.dumps(BENCH_CONFIG))
    return str(path)


def synthetic_batch(model, batch_size: int, device):
    generator = torch.Generator().manual_seed(0)
    image_size = model.visual.image_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    texts = torch.randint(0, model.vocab_size, (batch_size, model.context_length), generator=generator)
    return images.to(device), texts.to(device)


def tensor_bytes(obj, seen) -> int:
    """Bytes of the distinct tensors reachable through lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value, seen) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value, seen) for value in obj)
    return 0


def held_param_copies(optimizer, params) -> float:
    """Tensors the optimizer keeps beyond its base optimizer's state, in parameter copies."""
    held = {name: value for name, value in vars(optimizer).items() if name not in SHARED_WITH_BASE}
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return tensor_bytes(held, set()) / param_bytes


class Arm:
    """One model copy with its optimizer, stepping on the shared batch."""

    def __init__(self, name, model, make_optimizer, loss_fn, batch, precision, device):
        self.name, self.model, self.batch = name, model, batch
        self.optimizer = make_optimizer(model.parameters()) if make_optimizer else None
        self.loss_fn, self.precision, self.device = loss_fn, precision, device
        self.scaler = grad_scaler(precision, device)
        self.times, self.outside_passes = [], []
        self._in_passes = 0.0

    def closure(self):
        synchronize(self.device)
        start = time.perf_counter()
        with autocast(self.precision, self.device):
            loss = self.loss_fn(**self.model(*self.batch))
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        synchronize(self.device)
        self._in_passes += time.perf_counter() - start
        return loss

    def run(self):
        if self.optimizer is None:  # a bare forward + backward pass
            self.model.zero_grad(set_to_none=True)
            self.closure()
        else:  # the training loop's step: closure, unscale, grad norm, skip on inf, update
            take_step(self.optimizer, self.closure, grad_scaler=self.scaler)

    def timed(self):
        synchronize(self.device)
        self._in_passes = 0.0
        start = time.perf_counter()
        self.run()
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        self.outside_passes.append(self.times[-1] - self._in_passes)


def noise_draw_time(model, sigma: float, device, repeats: int = 5) -> float:
    """One perturbation's noise for every parameter, as NSO draws it (rng.Streams, its own keys)."""
    streams, draw = Streams(), noise_draw("normal", sigma)
    buffers = [torch.empty_like(p) for p in model.parameters()]
    times = []
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for index, buffer in enumerate(buffers):
            streams.fill_(buffer, (0, repeat, 0, index), draw)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_memory(arm) -> int:
    torch.cuda.reset_peak_memory_stats(arm.device)
    arm.run()
    synchronize(arm.device)
    return torch.cuda.max_memory_allocated(arm.device)


def step_flops(arm) -> int:
    """FLOPs of one forward + backward of the arm's closure, as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    arm.model.zero_grad(set_to_none=True)
    with counter:
        arm.closure()
    return counter.get_total_flops()


COMPUTE_DTYPES = {"amp_bf16": torch.bfloat16, "amp": torch.float16, "fp32": torch.float32}


def matmul_rate(device, dtype, size: int, repeats: int) -> float:
    """FLOP/s of a size^3 matrix product on random data, median of repeats after a warm-up."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device, dtype=dtype) for _ in range(2))
    seconds = []
    for repeat in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if repeat >= 2:
            seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(seconds)


def model_flop_utilisation(arm, step_seconds: float, precision: str, device) -> dict:
    dtype = COMPUTE_DTYPES[precision]
    size, repeats = (8192, 20) if device.type == "cuda" else (1024, 5)
    rate = matmul_rate(device, dtype, size, repeats)
    flops = step_flops(arm)
    return {"flops_per_step": flops, "matmul_flops_per_s": rate, "matmul_size": size, "matmul_dtype": str(dtype),
            "achieved_flops_per_s": flops / step_seconds, "mfu": flops / step_seconds / rate}


def timing(args, spec: str, device) -> dict:
    name = resolve_model_name(spec)
    torch.manual_seed(0)
    template = open_clip.create_model(name, output_dict=True).to(device)
    batch = synthetic_batch(template, args.batch_size, device)
    loss_fn = open_clip.ClipLoss()

    def copy():
        model = open_clip.create_model(name, output_dict=True).to(device)
        model.load_state_dict(template.state_dict())
        return model

    adamw = dict(lr=1e-4, weight_decay=0.1)
    arms = [
        Arm("adamw", copy(), lambda p: torch.optim.AdamW(p, **adamw), loss_fn, batch, args.precision, device),
        Arm("nso", copy(), lambda p: NSO(p, torch.optim.AdamW, sigma=args.sigma, **adamw), loss_fn, batch,
            args.precision, device),
        Arm("pass", template, None, loss_fn, batch, args.precision, device),
    ]
    for _ in range(args.warmup):
        for arm in arms:
            arm.run()
    for repeat in range(args.steps):
        for arm in (arms if repeat % 2 == 0 else arms[::-1]):
            arm.timed()
    times = {arm.name: arm.times for arm in arms}
    ratios = [n / a for n, a in zip(times["nso"], times["adamw"])]
    ideal = [n / (a + p) for n, a, p in zip(times["nso"], times["adamw"], times["pass"])]
    parameter_work = [n - a for n, a in zip(arms[1].outside_passes, arms[0].outside_passes)]
    ideal_s = statistics.median([a + p for a, p in zip(times["adamw"], times["pass"])])
    noise_s = noise_draw_time(template, args.sigma, device)
    nso_params = list(arms[1].model.parameters())
    sam = SAM(nso_params, torch.optim.AdamW, rho=0.05, **adamw)
    sam.step(arms[1].closure, grad_scaler=arms[1].scaler)
    result = {
        "params": sum(p.numel() for p in template.parameters()),
        "median_step_s": {arm: statistics.median(values) for arm, values in times.items()},
        "step_time_ratio_nso_over_adamw": statistics.median(ratios),
        "step_time_ratio_nso_over_adamw_quartiles": statistics.quantiles(ratios, n=4)[::2],
        "step_time_ratio_nso_over_ideal": statistics.median(ideal),
        "step_time_ratio_nso_over_ideal_quartiles": statistics.quantiles(ideal, n=4)[::2],
        "median_outside_passes_s": {arm.name: statistics.median(arm.outside_passes) for arm in arms[:2]},
        "nso_parameter_work_s": statistics.median(parameter_work),
        "nso_parameter_work_over_ideal": statistics.median(parameter_work) / ideal_s,
        "noise_draw_s": noise_s,
        "noise_draw_over_ideal": noise_s / ideal_s,
        "extra_param_copies_held_nso": held_param_copies(arms[1].optimizer, nso_params),
        "extra_param_copies_held_sam": held_param_copies(sam, nso_params),
    }
    if device.type == "cuda":
        param_bytes = sum(p.numel() * p.element_size() for p in nso_params)
        result["extra_peak_param_copies_nso"] = (peak_step_memory(arms[1]) - peak_step_memory(arms[0])) / param_bytes
    result["mfu_adamw"] = model_flop_utilisation(arms[0], result["median_step_s"]["adamw"], args.precision, device)
    return result


def ddp_worker(rank, world_size, port, spec, steps, out_path):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_model_name(spec), output_dict=True)
    ddp_model = DDP(model)
    counter = [0]

    def hook(state, bucket):
        counter[0] += bucket.index() == 0  # bucket 0 is reduced once per synced backward
        return allreduce_hook(None, bucket)

    ddp_model.register_comm_hook(state=None, hook=hook)
    images, texts = synthetic_batch(model, 4, torch.device("cpu"))
    loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    def closure():
        loss = loss_fn(**ddp_model(images, texts))
        loss.backward()
        return loss

    optimizers = {
        "nso": NSO(model.parameters(), torch.optim.AdamW, sigma=0.01, ddp_model=ddp_model),
        "nso_k2_lam0.5": NSO(model.parameters(), torch.optim.AdamW, sigma=0.01, num_perturbs=2, lam=0.5,
                             ddp_model=ddp_model),
        "sam_local": SAM(model.parameters(), torch.optim.AdamW, ascent="local", ddp_model=ddp_model),
        "sam_global": SAM(model.parameters(), torch.optim.AdamW, ascent="global", ddp_model=ddp_model),
    }
    counts = {}
    for label, optimizer in optimizers.items():
        before = counter[0]
        for _ in range(steps):
            optimizer.step(closure)
        counts[label] = (counter[0] - before) / steps
    adamw = torch.optim.AdamW(model.parameters())
    before = counter[0]
    for _ in range(steps):
        adamw.zero_grad(set_to_none=True)
        closure()
        adamw.step()
    counts["adamw"] = (counter[0] - before) / steps
    if rank == 0:
        Path(out_path).write_text(json.dumps(counts))
    torch.distributed.destroy_process_group()


def all_reduce_counts(spec: str, steps: int, directory: str, timeout: float = 300) -> dict:
    out_path = os.path.join(directory, "ddp_counts.json")
    spawn_local_ranks(ddp_worker, 2, spec, steps, out_path, timeout=timeout)
    return json.loads(Path(out_path).read_text())


def main(argv) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as directory:
        spec = model_spec(args.model, directory)
        result = {
            "benchmark": "nso",
            "model": args.model, "batch_size": args.batch_size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": args.precision, "threads": torch.get_num_threads(), "steps": args.steps,
            "nso": {"num_perturbs": 1, "two_point": True, "lam": 0.0, "sigma": args.sigma},
            **timing(args, spec, device),
        }
        if args.ddp_steps:
            # Counted on CPU with the small bench model: the count is structural, not size-dependent.
            small = model_spec("bench-vit", directory)
            result["gradient_all_reduces_per_step_2rank_gloo"] = all_reduce_counts(small, args.ddp_steps, directory)
    print(json.dumps(result, indent=2))
    return 0
