"""What only a CUDA GPU can show (marker `gpu`; skipped without CUDA, so CI stays green; `make
gpu-check` runs them): NSO noise from CUDA generators is the same on every call and in every
process; a bf16-autocast NSO step equals the fp32 one within bf16 rounding; training runs fused
(flash / memory-efficient) attention while the Hessian's exact products run the math kernel, and
finite-difference products match them; and the training, zero-shot and Hessian CLIs run end to
end on one GPU, agreeing with the CPU, with each other and (compiled by inductor) with eager."""
import json
import os
import random

import open_clip
import pytest
import torch
import torch._dynamo
from PIL import Image
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from helpers import CONFIGS, flat, logged_losses, run_ranks, weights
from nsoclip import hessian, main, zeroshot
from nsoclip.curvature import Objective
from nsoclip.loss import contrastive_loss_fn
from nsoclip.model import resolve_model_name
from nsoclip.nso import NSO, noise_draw
from nsoclip.precision import autocast
from nsoclip.rng import Streams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = str(CONFIGS / "tiny-vit.json")
CUDA = torch.device("cuda")
FUSED_ATTENTION = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                   "aten::_scaled_dot_product_cudnn_attention")
MATH_ATTENTION = "aten::_scaled_dot_product_attention_math"


@pytest.fixture(autouse=True)
def true_fp32():
    """fp32 references without TF32 (cuDNN convolutions default to it), put back afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_model(seed: int = 0, device=CUDA):
    torch.manual_seed(seed)
    return open_clip.create_model(resolve_model_name(TINY), output_dict=True).to(device)


def tiny_batch(batch_size: int = 16, seed: int = 1, device=CUDA):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49408, (batch_size, 16), generator=generator)
    return images.to(device), texts.to(device)


# ---- NSO noise

def perturbed_points(global_seed: int) -> list:
    """The weights of every pass of two NSO steps of a small model on the GPU, after scrambling
    the global generators as a rank-dependent seed would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Tanh(), torch.nn.Linear(700, 3)).to(CUDA)
    optimizer = NSO(model.parameters(), torch.optim.AdamW, sigma=0.01, num_perturbs=2, seed=5, lr=1e-3)
    inputs = torch.randn(8, 300, generator=torch.Generator().manual_seed(9)).to(CUDA)
    torch.manual_seed(global_seed)
    torch.cuda.manual_seed_all(global_seed)
    points = []

    def closure():
        points.append(flat(model.parameters()).cpu())
        loss = model(inputs).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    return points


def noise_worker(rank, world_size, port, out_dir):
    torch.cuda.set_device(0)
    torch.save(perturbed_points(global_seed=100 + rank), os.path.join(out_dir, f"rank{rank}.pt"))


def test_nso_noise_on_cuda_is_the_same_on_every_call_and_every_process(tmp_path):
    here = perturbed_points(global_seed=1)
    assert len(here) == 8 and not torch.equal(here[0], here[1])  # w + e and w - e differ
    assert all(torch.equal(a, b) for a, b in zip(here, perturbed_points(global_seed=2)))
    run_ranks(noise_worker, 2, str(tmp_path), timeout=240)
    for rank in range(2):
        theirs = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(here, theirs)), rank


def test_cuda_streams_any_slice_equals_the_slice_of_the_whole_draw():
    """What a sharded rank relies on, with CUDA generators: a slice drawn alone equals that slice
    of the whole tensor's draw, across chunk boundaries."""
    streams, draw, numel = Streams(chunk=1000), noise_draw("normal", 1.0), 4500
    whole = streams.fill_(torch.empty(numel, device=CUDA), (3, "key"), draw)
    assert torch.equal(whole, streams.fill_(torch.empty(numel, device=CUDA), (3, "key"), draw))
    for start, stop in ((0, 1), (999, 1001), (1500, 4500), (4499, 4500)):
        part = streams.fill_(torch.empty(stop - start, device=CUDA), (3, "key"), draw, start=start, numel=numel)
        assert torch.equal(part, whole[start:stop]), (start, stop)


# ---- bf16

def nso_gradient(precision: str):
    """The gradient one NSO step assembles (SGD with lr 1 makes the update that gradient) and the
    step's loss, from the same weights, batch and noise."""
    model = tiny_model()
    start = flat(model.parameters())
    optimizer = NSO(model.parameters(), torch.optim.SGD, sigma=0.01, seed=3, lr=1.0)
    loss_fn = open_clip.ClipLoss()
    images, texts = tiny_batch()

    def closure():
        with autocast(precision, CUDA):
            loss = loss_fn(**model(images, texts))
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    return start - flat(model.parameters()), loss.item()


def test_bf16_nso_step_equals_the_fp32_step_within_bf16_rounding():
    """bf16 keeps 8 mantissa bits (relative spacing 2^-8 = 3.9e-3); through the tiny ViT's
    layers the assembled gradient stays within 5e-2 of fp32's, the loss within 1e-2."""
    fp32, fp32_loss = nso_gradient("fp32")
    bf16, bf16_loss = nso_gradient("amp_bf16")
    assert torch.isfinite(bf16).all() and fp32.norm() > 0
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert relative < 5e-2, relative
    assert bf16_loss == pytest.approx(fp32_loss, rel=1e-2)


# ---- attention kernels

def profiled_ops(call) -> set:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return {event.key for event in prof.key_averages()}


def test_training_runs_fused_attention_and_the_hessian_the_math_kernel_fd_matches_exact():
    model = tiny_model()
    batch = tiny_batch()
    loss_fn = contrastive_loss_fn(open_clip.ClipLoss())

    def training_step():
        with autocast("amp_bf16", CUDA):
            loss = loss_fn(model, batch)
        loss.backward()

    training_ops = profiled_ops(training_step)
    assert training_ops & set(FUSED_ATTENTION) and MATH_ATTENTION not in training_ops, sorted(
        op for op in training_ops if "attention" in op)
    dim = sum(p.numel() for p in model.parameters())
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(4)).to(CUDA)
    with Objective(model, loss_fn, [batch], hvp="exact") as objective:
        products = {}
        hessian_ops = profiled_ops(lambda: products.update(exact=objective.hvp(vector)))
    assert MATH_ATTENTION in hessian_ops and not hessian_ops & set(FUSED_ATTENTION)
    with Objective(model, loss_fn, [batch], hvp="finite_difference") as objective:
        approximate = objective.hvp(vector)
    exact = products["exact"]
    assert ((approximate - exact).norm() / exact.norm()).item() < 5e-3


# ---- the CLIs end to end on one GPU

def train_flags(logs, name, device, *extra):
    return ["--dataset-type", "synthetic", "--train-num-samples", 64, "--model", TINY, "--batch-size", 16,
            "--epochs", 1, "--workers", 2, "--device", device, "--logs", logs, "--name", name, "--warmup", 2,
            "--log-every-n-steps", 1, "--seed", 3, *extra]


def run(module, flags):
    assert module.main([str(a) for a in flags]) == 0


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    """AdamW on the GPU (amp_bf16) and on the CPU (fp32) from the same weights and batches; NSO
    on the GPU eager and compiled by inductor (fp32, TF32 as training sets it)."""
    logs = tmp_path_factory.mktemp("gpu")
    run(main, train_flags(logs, "adamw-gpu", "cuda", "--precision", "amp_bf16"))
    run(main, train_flags(logs, "adamw-cpu", "cpu", "--precision", "fp32"))
    nso = ["--opt", "nso", "--precision", "fp32"]
    run(main, train_flags(logs, "nso-eager", "cuda", *nso))
    torch._dynamo.reset()
    counters.clear()
    run(main, train_flags(logs, "nso-compiled", "cuda", *nso, "--torchcompile"))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return logs, graphs


def test_training_cli_on_gpu_agrees_with_cpu(gpu_runs):
    logs, _ = gpu_runs
    gpu, cpu = logged_losses(logs / "adamw-gpu"), logged_losses(logs / "adamw-cpu")
    assert len(gpu) == len(cpu) == 4
    # The same initial weights and batches, bf16 autocast against fp32; four AdamW steps apart.
    assert gpu == pytest.approx(cpu, rel=2e-2), (gpu, cpu)


def test_compiled_nso_on_gpu_agrees_with_eager(gpu_runs):
    logs, graphs = gpu_runs
    assert graphs >= 1
    eager, compiled = weights(logs / "nso-eager"), weights(logs / "nso-compiled")
    assert eager.keys() == compiled.keys() and not any("_orig_mod" in key for key in compiled)
    assert logged_losses(logs / "nso-compiled") == pytest.approx(logged_losses(logs / "nso-eager"), rel=1e-2)
    a, b = (torch.cat([w[k].float().reshape(-1) for k in sorted(w)]) for w in (compiled, eager))
    assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_zeroshot_cli_on_gpu_equals_cpu(gpu_runs, tmp_path):
    """A labelled folder on which the CPU predictions of the GPU-trained checkpoint score 1.0."""
    logs, _ = gpu_runs
    checkpoint = logs / "adamw-gpu" / "checkpoints" / "epoch_1.pt"
    model, _, preprocess = open_clip.create_model_and_transforms(resolve_model_name(TINY), pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(resolve_model_name(TINY))
    classes = [f"kind {i}" for i in range(5)]
    rng = random.Random(0)
    images = [Image.frombytes("RGB", (36, 36), rng.randbytes(3 * 36 * 36)) for _ in range(8)]
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model.eval(), tokenizer, classes, ["a photo of a {}."])
        labels = (model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
                  @ classifier).argmax(dim=1).tolist()
    for index, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "kinds" / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "kinds" / str(label) / f"{index}.png")
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    results = {}
    for device in ("cuda", "cpu"):
        run(zeroshot, ["--model", TINY, "--pretrained", checkpoint, "--precision", "fp32", "--device", device,
                       "--zeroshot-data", tmp_path / "kinds", "--zeroshot-classnames", tmp_path / "classes.txt",
                       "--zeroshot-templates", tmp_path / "templates.txt", "--batch-size", 4, "--workers", 0,
                       "--output", tmp_path / f"{device}.json"])
        results[device] = json.loads((tmp_path / f"{device}.json").read_text())
    assert results["cuda"] == results["cpu"]
    assert results["cuda"]["kinds-zeroshot-val-top1"] == 1.0


def test_hessian_cli_on_gpu_exact_and_finite_differences_agree(gpu_runs, tmp_path):
    logs, _ = gpu_runs
    reports = {}
    for hvp in ("exact", "finite_difference"):
        run(hessian, ["--model", TINY, "--resume", logs / "adamw-gpu" / "checkpoints" / "epoch_1.pt",
                      "--dataset-type", "synthetic", "--train-num-samples", 32, "--batch-size", 16, "--workers", 0,
                      "--device", "cuda", "--hessian-num-batches", 2, "--hessian-probes", 8, "--hessian-top-k", 0,
                      "--hessian-hvp", hvp, "--seed", 1,
                      "--hessian-output", tmp_path / f"{hvp}.json"])
        reports[hvp] = json.loads((tmp_path / f"{hvp}.json").read_text())
    exact, approximate = reports["exact"], reports["finite_difference"]
    assert exact["settings"]["device"].startswith("cuda") and exact["stderr"] > 0
    assert approximate["trace"] == pytest.approx(exact["trace"], rel=5e-3)  # the same probes, two products
