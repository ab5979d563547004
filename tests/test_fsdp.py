"""Sharded training (--fsdp): the same run whatever the layout. FSDP2 on 2 ranks, DDP on 2 ranks
and one process train to the same weights (AdamW with recomputed activations, NSO with
accumulation and clipping, SAM with global ascent and a locked image tower), perturb to bit-identical weights, evaluate to identical numbers; NSO's snapshot
holds P/N per rank; the collectives of a step are the ones the design says; checkpoints move
between layouts and survive a killed rank; epoch checkpoints load in plain OpenCLIP."""
import json
import os
import pickle
import random
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch._dynamo.utils import counters

from helpers import (TINY, assert_same_weights, finish, init_gloo, launch, read, run_cli, run_ranks, wait_until,
                     weights, workers_of)

from nsoclip.bench.fsdp import CollectiveCounter, unit_sizes
from nsoclip.checkpoint import CheckpointError, Checkpointer, latest_checkpoint
from nsoclip.classification import zero_shot_sets
from nsoclip.compute import ComputeMeter
from nsoclip.data import get_data
from nsoclip.distributed import World
from nsoclip.evaluate import evaluate
from nsoclip.loss import create_loss
from nsoclip.main import sharding_options
from nsoclip.model import compile_options, create_model_and_transforms, prepare_for_training, resolve_model_name
from nsoclip.optim import create_optimizer
from nsoclip.parallel import Layout, distribute, full_tensor, local_view
from nsoclip.params import UsageError, parse_args
from nsoclip.scheduler import LRSchedule
from nsoclip.train import Run, make_closure
from nsoclip.update import take_step

STEPS = 3
LR = 1e-3
GLOBAL_BATCH = 8
OPTIMIZERS = {
    "adamw": ["--grad-checkpointing"],
    "nso": ["--opt", "nso", "--nso-sigma", "0.01", "--accum-freq", "2", "--grad-clip-norm", "1.0"],
    "sam": ["--opt", "sam", "--sam-ascent", "global", "--sam-rho", "0.05", "--lock-image"],
    # Noise relative to w: rows of a dim-0 shard are whole, 1-d tensors need the norm over shards.
    "nso-filter": ["--opt", "nso", "--nso-sigma", "0.05", "--nso-noise-scale", "filter"],
}
# Counted on their own (no accumulation or recomputation, whose extra passes the counts would mix in).
COUNTED = {"adamw": [], "nso": ["--opt", "nso"], "nso-step": ["--opt", "nso", "--fsdp-grad-reduce", "step"],
           "sam": ["--opt", "sam", "--sam-ascent", "global"]}
WATCHED = ("visual.positional_embedding", "logit_scale")  # 17 rows and 1 row: neither splits evenly over 2 ranks


def train_args(*extra):
    return parse_args(["--dataset-type", "synthetic", "--train-num-samples", "64", "--model", TINY,
                       "--precision", "fp32", "--device", "cpu", "--lr", str(LR), "--warmup", "0",
                       "--lr-scheduler", "const", "--wd", "0.1", "--seed", "3", "--batch-size", "4",
                       "--local-loss", "--gather-with-grad", "--name", "fsdp", *extra])


def eval_args(workspace):
    return parse_args(["--model", TINY, "--precision", "fp32", "--device", "cpu", "--batch-size", "3",
                       "--workers", "0", "--val-data", str(workspace / "val.csv"),
                       "--zeroshot-data", str(workspace / "kinds"), "--zeroshot-classnames",
                       str(workspace / "classes.txt"), "--zeroshot-templates", str(workspace / "templates.txt")])


def rank_rows(tensor, world: World):
    """Rank r's slice of a (micro-)batch: what our sampler hands it."""
    share = tensor.shape[0] // world.world_size
    return tensor[world.rank * share:(world.rank + 1) * share]


def build(world, args, initial, resume=None):
    """The model, layout and optimizer as main.train builds them, optionally resumed from a
    checkpoint (weights into the bare model before it is laid out, the rest after)."""
    model = open_clip.create_model(resolve_model_name(TINY), output_dict=True)
    model.load_state_dict(initial)
    checkpoints = Checkpointer(Path(args.logs) / "checkpoints", args, world)
    checkpoint = checkpoints.load(resume, model) if resume is not None else None
    prepare_for_training(model, args)
    layout = distribute(model, world, sharding=sharding_options(args), compile=compile_options(args))
    optimizer = create_optimizer(args, model, layout)
    run = Run(args=args, world=world, model=model, layout=layout, loss=create_loss(args, world, model),
              optimizer=optimizer, scaler=None, schedule=LRSchedule(optimizer, args, STEPS), checkpoints=checkpoints,
              metrics=None)
    if resume is not None:
        checkpoints.restore(run, resume, checkpoint, STEPS)
    return run


def micro_batches(run, data, step):
    images, texts = data
    accum = run.args.accum_freq
    return [(rank_rows(i, run.world), rank_rows(t, run.world))
            for i, t in zip(images[step].chunk(accum), texts[step].chunk(accum))]


def flat_weights(model):
    """Every parameter whole, in one vector (a collective for shards)."""
    return torch.cat([full_tensor(p.detach()).reshape(-1) for p in model.parameters()])


def train(run, data, steps=STEPS, watch=False, count_step=None, save_at=None):
    """Steps as train_one_epoch takes them, from run.step on; `watch` records the weights every
    pass of the first step runs at, `count_step` the collectives of that step, `save_at` writes
    a step checkpoint after that many steps."""
    passes, counted = [], None
    for step in range(run.step, steps):
        run.schedule(step)
        closure = make_closure(run, micro_batches(run, data, step))
        if watch and step == 0:
            def closure(inner=closure):
                named = dict(run.model.named_parameters())
                passes.append({"all": flat_weights(run.model),
                               **{n: full_tensor(named[n].detach()).clone() for n in WATCHED}})
                return inner()
        if step == count_step:
            with CollectiveCounter() as counter:
                take_step(run.optimizer, closure, None, run.args.grad_clip_norm)
            counted = counter.summary()
        else:
            take_step(run.optimizer, closure, None, run.args.grad_clip_norm)
        run.step += 1
        if run.step == save_at:
            run.checkpoints.save_step(run, epoch=0, batch=0)
    return passes, counted


def evaluation(world, run, workspace):
    args = eval_args(workspace)
    _, preprocess_train, preprocess_val, tokenizer = create_model_and_transforms(args, world.device)
    val = get_data(args, (preprocess_train, preprocess_val), tokenizer, world)["val"]
    with run.layout.evaluation():
        return evaluate(run.model, args, world, tokenizer, preprocess_val, val, sets=zero_shot_sets(args, world))


# NSO's step checkpoint after 2 of the 3 steps: a full file under DDP, a sharded folder under FSDP2.
SAVED = {"ddp": ("ddp", []), "fsdp": ("fsdp", ["--fsdp-checkpoint", "sharded"])}


def layout_record(world, kind, initial, data, workspace):
    """Everything one layout produces, the same code on 1 process and on each of 2 ranks."""
    record = {}
    layout_flags = ["--fsdp"] if kind == "fsdp" else []
    for name, flags in OPTIMIZERS.items():
        saving = name == "nso" and kind in SAVED
        extra = ["--logs", str(workspace / SAVED[kind][0]), *SAVED[kind][1]] if saving else []
        run = build(world, train_args(*flags, *layout_flags, *extra), initial)
        if name == "adamw":
            record["eval"] = evaluation(world, run, workspace)
        passes, _ = train(run, data, watch=True, save_at=2 if saving else None)
        record[name] = {"passes": passes, "weights": run.layout.model_state_dict()}
        if name == "nso":
            record[name]["snapshot_elements"] = sum(s.numel() for s in run.optimizer._snapshot)
            record[name]["local_elements"] = sum(local_view(p).tensor.numel() for p in run.model.parameters())
    return record


def resumed(world, layout_flags, source: Path, initial, data):
    """NSO's last step after resuming the step-2 checkpoint in `source` in another layout."""
    checkpoint = next(p for p in (source / "checkpoints").iterdir() if p.name.startswith("step_"))
    run = build(world, train_args(*OPTIMIZERS["nso"], *layout_flags, "--logs", str(source.parent / "unused")),
                initial, resume=checkpoint)
    assert run.step == 2
    train(run, data)
    return run.layout.model_state_dict()


def fsdp_extras(world, initial, data, workspace):
    """Collectives per step, an epoch checkpoint with the features the sharded model computes, and
    the step-2 checkpoints resumed across layouts."""
    counts = {}
    for name, flags in COUNTED.items():
        run = build(world, train_args(*flags, "--fsdp"), initial)
        counts[name] = train(run, data, steps=1, count_step=0)[1]
    args = train_args("--fsdp", "--logs", str(workspace), "--epochs", "1")
    run = build(world, args, initial)
    train(run, data, steps=1)
    run.checkpoints.save_epoch(run, 1)
    images, texts = data[0][0], data[1][0]
    with run.layout.evaluation(), torch.no_grad():
        features = run.model(images, texts)
    return {"counts": counts, "units": unit_sizes(run.model, world.world_size),
            "tensors": len(list(run.model.parameters())),
            "features": {k: features[k] for k in ("image_features", "text_features")},
            "resumed": {"ddp_to_fsdp": resumed(world, ["--fsdp"], workspace / "ddp", initial, data),
                        "fsdp_to_ddp": resumed(world, [], workspace / "fsdp", initial, data),
                        "fsdp_to_fsdp": resumed(world, ["--fsdp"], workspace / "fsdp", initial, data)}}


def compiled_fsdp_nso(world, initial, data) -> dict:
    """NSO (accumulation, clipping) under --fsdp --torchcompile: each residual block compiled before
    it is sharded (aot_eager, bitwise equal to eager); no step after the first recompiles."""
    run = build(world, train_args(*OPTIMIZERS["nso"], "--fsdp", "--torchcompile", "--torchcompile-backend",
                                  "aot_eager"), initial)
    train(run, data, steps=1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(run, data)
    return {"weights": run.layout.model_state_dict(), "graphs": counters["stats"]["unique_graphs"]}


def two_rank_worker(rank, world_size, port, initial_path, data_path, workspace):
    init_gloo(rank, world_size, port)
    world = World(rank=rank, world_size=world_size)
    initial = torch.load(initial_path, weights_only=True)
    data = torch.load(data_path, weights_only=True)
    workspace = Path(workspace)
    result = {"fsdp": layout_record(world, "fsdp", initial, data, workspace),
              "ddp": layout_record(world, "ddp", initial, data, workspace),
              "fsdp_compiled": compiled_fsdp_nso(world, initial, data),
              **fsdp_extras(world, initial, data, workspace)}
    torch.save(result, workspace / f"rank{rank}.pt")
    dist.destroy_process_group()


def make_workspace(root: Path):
    """7 images in class folders (ranks score 4 and 3: different numbers of batches), their csv."""
    rng = random.Random(0)
    rows = []
    for i in range(7):
        folder = root / "kinds" / str(i % 3)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.png"
        Image.frombytes("RGB", (36, 36), rng.randbytes(3 * 36 * 36)).save(path)
        rows.append(f"{path}\ta {['red', 'green', 'blue'][i % 3]} thing number {i}")
    (root / "classes.txt").write_text("".join(f"kind {i}\n" for i in range(3)))
    (root / "templates.txt").write_text("a photo of a {}.\nan image of a {}.\n")
    (root / "val.csv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One 2-rank job records FSDP2 and DDP; the same code runs here as the single process."""
    root = tmp_path_factory.mktemp("fsdp")
    make_workspace(root)
    torch.manual_seed(0)
    initial = open_clip.create_model(resolve_model_name(TINY), output_dict=True).state_dict()
    torch.save(initial, root / "initial.pt")
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(STEPS, GLOBAL_BATCH, 3, 32, 32, generator=generator),
            torch.randint(0, 49408, (STEPS, GLOBAL_BATCH, 16), generator=generator))
    torch.save(data, root / "data.pt")
    run_ranks(two_rank_worker, 2, str(root / "initial.pt"), str(root / "data.pt"), str(root), timeout=400)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = layout_record(World(), "single", initial, data, root)
    single["fsdp_to_single"] = resumed(World(), [], root / "fsdp", initial, data)
    return {"ranks": ranks, "single": single, "root": root, "data": data}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fsdp_equals_ddp_equals_one_process(layouts, optimizer):
    """Final weights after 3 steps: FSDP2 2 ranks = DDP 2 ranks = 1 process on the global batch."""
    fsdp = layouts["ranks"][0]["fsdp"][optimizer]["weights"]
    ddp = layouts["ranks"][0]["ddp"][optimizer]["weights"]
    single = layouts["single"][optimizer]["weights"]
    assert {k: v.shape for k, v in fsdp.items()} == {k: v.shape for k, v in single.items()}  # logit_scale 0-d again
    moved = max(float((single[k] - v).abs().max()) for k, v in torch.load(layouts["root"] / "initial.pt").items())
    assert moved > 1e-3
    assert_same_weights(fsdp, ddp, key_bias_atol=2 * LR * STEPS)
    assert_same_weights(fsdp, single, key_bias_atol=2 * LR * STEPS)


@pytest.mark.slow
def test_compiled_fsdp_nso_equals_eager_fsdp(layouts):
    for rank in layouts["ranks"]:
        assert rank["fsdp_compiled"]["graphs"] >= 1
    compiled, eager = layouts["ranks"][0]["fsdp_compiled"]["weights"], layouts["ranks"][0]["fsdp"]["nso"]["weights"]
    assert_same_weights(compiled, eager, atol=1e-7, rtol=1e-6, key_bias_atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_perturbed_weights_are_identical_in_every_layout(layouts, optimizer):
    """The weights each pass of the first step runs at, gathered whole inside the closure: bit for
    bit the same on both FSDP2 ranks, both DDP ranks and the single process, including tensors
    whose first dimension does not split evenly over 2 ranks. (SAM's ascent point follows the
    all-reduced gradient, whose rounding depends on the reduction, and filter noise of a 1-d tensor
    follows its norm, summed over the shards: equal within float error.)"""
    reference = layouts["single"][optimizer]["passes"]
    assert len(reference) == {"adamw": 1, "nso": 2, "sam": 2, "nso-filter": 2}[optimizer]
    for rank in layouts["ranks"]:
        for kind in ("fsdp", "ddp"):
            passes = rank[kind][optimizer]["passes"]
            assert len(passes) == len(reference)
            for number, (got, want) in enumerate(zip(passes, reference)):
                for key in want:
                    value = got[key].reshape(want[key].shape)
                    if (optimizer == "sam" and number == 1) or optimizer == "nso-filter":
                        torch.testing.assert_close(value, want[key], atol=1e-7, rtol=0, msg=f"{kind} {key}")
                    else:
                        assert torch.equal(value, want[key]), (kind, number, key)
    if optimizer == "nso":
        assert not torch.equal(reference[0]["all"], reference[1]["all"])  # w + e and w - e


@pytest.mark.slow
def test_nso_snapshot_holds_this_ranks_shard_only(layouts):
    total = sum(p.numel() for p in torch.load(layouts["root"] / "initial.pt").values())
    fsdp = [rank["fsdp"]["nso"] for rank in layouts["ranks"]]
    assert [r["snapshot_elements"] for r in fsdp] == [r["local_elements"] for r in fsdp]
    assert sum(r["snapshot_elements"] for r in fsdp) == total
    assert max(r["snapshot_elements"] for r in fsdp) <= 1.01 * total / 2
    assert [rank["ddp"]["nso"]["snapshot_elements"] for rank in layouts["ranks"]] == [total, total]


@pytest.mark.slow
def test_evaluation_under_fsdp_equals_ddp_and_one_process(layouts):
    """Zero-shot and retrieval of the same weights; the ranks score 4 and 3 images, so their
    numbers of forwards differ (gathered once, the sharded model needs no collective per forward).
    clip_val_loss is OpenCLIP's per-batch loss, so it depends on how the pairs are batched: equal
    between the 2-rank layouts, not to the one process."""
    single = layouts["single"]["eval"]
    assert {"kinds-zeroshot-val-top1", "image_to_text_R@1", "clip_val_loss"} <= single.keys()
    ddp = layouts["ranks"][0]["ddp"]["eval"]
    for rank in layouts["ranks"]:
        assert rank["fsdp"]["eval"] == ddp
        assert rank["ddp"]["eval"] == ddp
    assert {k: v for k, v in ddp.items() if k != "clip_val_loss"} == {k: v for k, v in single.items()
                                                                      if k != "clip_val_loss"}


@pytest.mark.slow
def test_collectives_per_step_are_the_designed_ones(layouts):
    """One step of tiny-vit (4 residual blocks + the root = 5 units) under FSDP2 on 2 ranks:
    forward all-gathers every unit, backward again every block (the root stays gathered), every
    synced backward reduce-scatters every unit, the gradient norm is one all-reduce (of the
    per-tensor norms, a float each). NSO's
    two passes cost exactly two passes (reduce-scatter per pass by default, once with
    --fsdp-grad-reduce step) and nothing else; SAM global adds one scalar all-reduce (its
    ascent norm). The feature all-gathers of --gather-with-grad are the loss's, as under DDP."""
    units = layouts["ranks"][0]["units"]
    shard_bytes = sum(u["shard_bytes"] for u in units)
    block_shard_bytes = sum(u["shard_bytes"] for u in units if not u["root"])
    padded_bytes = sum(u["padded_bytes"] for u in units)
    one_pass_gathers = (len(units) + len(units) - 1, shard_bytes + block_shard_bytes)
    for rank in layouts["ranks"]:
        counts = rank["counts"]
        for name, passes, reduces, all_reduces in (("adamw", 1, 1, 1), ("nso", 2, 2, 1), ("nso-step", 2, 1, 1),
                                                    ("sam", 2, 2, 2)):
            got = counts[name]
            assert got["all_gather_into_tensor"] == {"count": passes * one_pass_gathers[0],
                                                     "bytes": passes * one_pass_gathers[1]}, name
            assert got["reduce_scatter_tensor"] == {"count": reduces * len(units), "bytes": reduces * padded_bytes}, name
            sam = all_reduces - 1
            assert got["all_reduce"] == {"count": all_reduces, "bytes": 4 * (rank["tensors"] + sam)}, name
            features = counts["adamw"]["all_gather"]
            assert got["all_gather"] == {"count": passes * features["count"], "bytes": passes * features["bytes"]}
            assert set(got) <= {"all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_gather",
                                "scatter"}, name


@pytest.mark.slow
def test_epoch_checkpoint_of_fsdp_loads_in_plain_open_clip_with_the_same_features(layouts):
    path = layouts["root"] / "checkpoints" / "epoch_1.pt"
    model, _, _ = open_clip.create_model_and_transforms(resolve_model_name(TINY), pretrained=str(path))
    model.eval()
    images, texts = layouts["data"][0][0], layouts["data"][1][0]
    with torch.no_grad():
        image_features, text_features = model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)
    for rank in layouts["ranks"]:
        torch.testing.assert_close(rank["features"]["image_features"], image_features, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rank["features"]["text_features"], text_features, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_step_checkpoints_resume_across_layouts_and_world_sizes(layouts):
    """NSO's step-2 checkpoint, resumed for the last step: DDP's full file under FSDP2, FSDP2's
    sharded folder under DDP, under FSDP2 and in one process (DCP reads each rank's part) equal
    the uninterrupted run; FSDP2 from its own sharded folder bit for bit."""
    ranks, single = layouts["ranks"], layouts["single"]
    fsdp, ddp = ranks[0]["fsdp"]["nso"]["weights"], ranks[0]["ddp"]["nso"]["weights"]
    assert sorted(p.name for p in (layouts["root"] / "fsdp" / "checkpoints").iterdir()) == ["step_2"]
    assert sorted(p.name for p in (layouts["root"] / "ddp" / "checkpoints").iterdir()) == ["step_2.pt"]
    resumed = ranks[0]["resumed"]
    assert_same_weights(resumed["ddp_to_fsdp"], ddp, key_bias_atol=2 * LR * STEPS)
    assert_same_weights(resumed["fsdp_to_ddp"], fsdp, key_bias_atol=2 * LR * STEPS)
    assert_same_weights(single["fsdp_to_single"], fsdp, key_bias_atol=2 * LR * STEPS)
    assert_same_weights(resumed["fsdp_to_fsdp"], fsdp, atol=0, rtol=0, key_bias_atol=0)


def cli_flags(logs, name, *extra):
    """NSO on tiny-vit, FSDP2 on 2 ranks x 4, 2 epochs of 4 steps."""
    return ["--dataset-type", "synthetic", "--train-num-samples", 32, "--model", TINY, "--batch-size", 4,
            "--epochs", 2, "--workers", 0, "--device", "cpu", "--precision", "fp32", "--logs", logs,
            "--name", name, "--warmup", 2, "--log-every-n-steps", 1, "--seed", 3, "--local-loss",
            "--gather-with-grad", "--opt", "nso", "--nso-sigma", "0.01", "--fsdp", *extra]


@pytest.mark.slow
def test_kill9_of_one_rank_resumes_from_a_sharded_checkpoint_bit_identically(tmp_path):
    """torchrun --max-restarts 1 restarts the group after rank 1 is SIGKILLed; --resume latest
    takes the newest complete sharded step checkpoint (an interrupted write never is one) and
    the run ends bit-identical to an uninterrupted one."""
    run_cli(cli_flags(tmp_path, "straight"), nproc=2)
    args = cli_flags(tmp_path, "killed", "--fsdp-checkpoint", "sharded", "--resume", "latest", "--save-every-n-steps", 2)
    agent = launch(args, tmp_path / "killed.txt", nproc=2, torchrun_flags=["--max-restarts", "1"])
    checkpoints = tmp_path / "killed" / "checkpoints"
    wait_until(lambda: [p for p in checkpoints.glob("step_*") if p.is_dir()], agent, "a sharded step checkpoint")
    assert not (checkpoints / "epoch_2.pt").exists(), "the run ended before the kill"
    os.kill(workers_of(agent.pid)[1], signal.SIGKILL)
    assert finish(agent) == 0, read(tmp_path / "killed.txt")[-3000:]
    log = read(tmp_path / "killed" / "out.log")
    assert log.count("Run ") == 2 and "Resumed from" in log
    resumed_from = Path(log.split("Resumed from ")[1].split(":")[0])
    assert resumed_from.parent == checkpoints and resumed_from.name.startswith("step_")
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(("step_", "."))], "step checkpoints are removed"
    assert_same_weights(weights(tmp_path / "killed", "epoch_2.pt"), weights(tmp_path / "straight", "epoch_2.pt"),
                        atol=0, rtol=0, key_bias_atol=0)


# ---- flags and checkpoint folders, in this process

@pytest.mark.parametrize("extra,message", [
    (["--fsdp", "--ddp-static-graph"], "--ddp-static-graph is a DDP setting"),
    (["--fsdp", "--precision", "amp"], "--precision amp with --fsdp: use fp32, amp_bf16, amp_bfloat16, pure_bf16"),
    (["--fsdp", "--precision", "fp32", "--opt", "sam"], "--sam-ascent local needs every rank to hold the whole model"),
    (["--fsdp", "--precision", "fp32", "--hessian-frequency", "1"], "--hessian-frequency with --fsdp needs"),
    (["--fsdp", "--precision", "amp_bf16", "--hessian-frequency", "1", "--hessian-hvp", "finite_difference"],
     "--hessian-frequency with --fsdp needs"),
    (["--fsdp", "--precision", "fp32", "--torchscript"], "--torchscript with --fsdp"),
    (["--fsdp", "--precision", "fp32", "--use-bn-sync"], "--use-bn-sync with --fsdp"),
    (["--fsdp-checkpoint", "sharded"], "--fsdp-checkpoint sharded needs --fsdp"),
    (["--fsdp-offload-cpu"], "--fsdp-offload-cpu needs --fsdp"),
    (["--fsdp-grad-reduce", "step"], "--fsdp-grad-reduce step needs --fsdp"),
])
def test_flags_fsdp_cannot_honour_fail_with_one_line(extra, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args(["--dataset-type", "synthetic", "--train-num-samples", "8", "--model", TINY, *extra])


def small_run(args, seed):
    torch.manual_seed(seed)
    model = open_clip.create_model(resolve_model_name(TINY), output_dict=True)
    layout = Layout(model)
    optimizer = create_optimizer(args, model, layout)
    for p in model.parameters():  # some optimizer state to save
        optimizer.state[p] = {"step": torch.tensor(float(seed)), "exp_avg": torch.full_like(p, seed),
                              "exp_avg_sq": torch.full_like(p, seed + 1)}
    return SimpleNamespace(model=model, layout=layout, optimizer=optimizer, step=0, scaler=None, nonfinite_total=seed,
                           compute=ComputeMeter())


def test_sharded_checkpoint_folders_incomplete_or_unsafe_are_never_resumed(tmp_path, caplog):
    """Sharded step checkpoints written by one process (DCP without a group) round-trip into a
    fresh model and optimizer; --resume latest passes over an interrupted write (hidden temporary
    folder), a folder without its nsoclip.json and one whose .metadata pickles code, and the next
    start removes the leftovers of interrupted writes."""
    args = train_args("--opt", "nso", "--logs", str(tmp_path))
    args.fsdp_checkpoint = "sharded"
    checkpoints = Checkpointer(tmp_path / "checkpoints", args, World())
    run = small_run(args, seed=7)
    for step in (2, 4):
        run.step = step
        checkpoints.save_step(run, epoch=0, batch=step)
    assert sorted(p.name for p in checkpoints.dir.iterdir()) == ["step_4"]  # older step checkpoints go
    assert (checkpoints.dir / "step_4" / ".metadata").is_file()
    interrupted = checkpoints.dir / ".step_6.tmp-1-2"
    shutil.copytree(checkpoints.dir / "step_4", interrupted)
    shutil.copytree(checkpoints.dir / "step_4", checkpoints.dir / "step_8")
    (checkpoints.dir / "step_8" / "nsoclip.json").unlink()
    planted = checkpoints.dir / "step_10"
    shutil.copytree(checkpoints.dir / "step_4", planted)
    (planted / ".metadata").write_bytes(pickle.dumps(Exploit()))
    meta = json.loads((planted / "nsoclip.json").read_text())
    (planted / "nsoclip.json").write_text(json.dumps({**meta, "step": 10}))
    assert latest_checkpoint(checkpoints.dir) == checkpoints.dir / "step_4"
    assert "nsoclip.json missing" in caplog.text and "refused, it pickles posix.system" in caplog.text
    checkpoints.remove_partial_writes()
    assert not interrupted.exists()

    fresh = small_run(args, seed=1)
    loaded = checkpoints.load(checkpoints.dir / "step_4", fresh.model)
    fresh.schedule = None
    assert checkpoints.restore(fresh, checkpoints.dir / "step_4", loaded, steps_per_epoch=8) == (0, 4)
    assert fresh.step == 4 and fresh.nonfinite_total == 7 and fresh.optimizer.step_count == run.optimizer.step_count
    for (name, a), b in zip(run.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    saved, restored = run.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"] and saved["nso"] == restored["nso"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, restored["state"][index][key]), (index, key)
    with pytest.raises(CheckpointError, match="refused, it pickles posix.system"):
        checkpoints.load(planted, fresh.model)


class Exploit:
    def __reduce__(self):
        return os.system, ("echo exploited",)
