"""What several test modules share: the tiny model configs, running the CLIs in this process or
as jobs, local gloo ranks, reading run folders, and the small models of the optimizer tests.
Test modules import from here, never from conftest or from each other."""
import datetime
import json
import logging
import os
import signal
import subprocess
import time
from argparse import Namespace
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist

from nsoclip.checkpoint import load_checkpoint
from nsoclip.distributed import World
from nsoclip.launch import child_env, free_port, python_command, spawn_local_ranks as run_ranks  # noqa: F401
from nsoclip.parallel import Layout
from nsoclip.params import Parser, add_model_args
from nsoclip.train import Run, make_closure

CONFIGS = Path(__file__).parent / "configs"
REPO = Path(__file__).resolve().parent.parent
TINY = str(CONFIGS / "tiny-vit.json")
MICRO = str(CONFIGS / "micro-vit.json")
cpu_env = child_env
DEADLINE = 180  # seconds any one launched job may take before the test fails


def model_args(model: str = TINY, **flags) -> Namespace:
    """The model flags every CLI has (params.add_model_args), with their defaults."""
    parser = Parser()
    add_model_args(parser)
    args = parser.parse_args(["--model", model])
    args.precision = "fp32"
    for key, value in flags.items():
        setattr(args, key, value)
    return args


def run_cli(args, *, nproc: int = 1, timeout: float = 240, env=None, check: bool = True,
            module: str = "nsoclip.main") -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as a job, plainly (nproc == 1) or under torchrun with nproc CPU ranks."""
    command = python_command(module, args, nproc)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or cpu_env(), cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


def in_process(main, args) -> int:
    """A CLI's main() in this process (no interpreter start-up, the same code path), putting back
    the logging set-up and signal handlers it installs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return main([str(a) for a in args])
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# ---- runs launched in the background, to be signalled or killed

def launch(args, logfile: Path, nproc=1, torchrun_flags=()):
    """Start a run in its own session (so the test can signal it alone) with output in logfile.

    torchrun gets the c10d rendezvous (--standalone): with the static one (--master_port alone)
    a restarted group reuses the first attempt's store keys and gloo can hang connecting."""
    command = python_command("nsoclip.main", args, nproc, torchrun_flags=["--standalone", *torchrun_flags])
    with open(logfile, "w") as out:
        return subprocess.Popen(command, env=cpu_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(condition, process, what: str, timeout=DEADLINE, poll=0.02):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def finish(process, timeout=DEADLINE) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def trained_a_step(run_dir: Path):
    return lambda: bool(read_jsonl(run_dir / "metrics.jsonl"))


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def workers_of(agent_pid: int):
    """The torchrun agent's children, by rank (read from each one's environment)."""
    workers = {}
    for pid in map(int, subprocess.run(["ps", "--ppid", str(agent_pid), "-o", "pid="], capture_output=True,
                                       text=True).stdout.split()):
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item)
        workers[int(environ["RANK"])] = pid
    return workers


def weights(run_dir, checkpoint="epoch_1.pt"):
    return load_checkpoint(Path(run_dir) / "checkpoints" / checkpoint)["state_dict"]


def read_jsonl(path) -> list:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def logged_losses(run_dir):
    return [record["loss"] for record in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def assert_same_weights(a, b, atol=1e-5, rtol=1e-4, key_bias_atol=1e-4):
    """The attention key bias is the exception: softmax is invariant to it, so its gradient is
    zero up to rounding, and AdamW's normalisation turns that rounding into lr-sized steps that
    depend on summation order. It gets a looser bound (up to lr x steps); every other tensor the
    tight one."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.in_proj_bias"):
            width = x.numel() // 3
            torch.testing.assert_close(x[width:2 * width], y[width:2 * width], atol=max(atol, key_bias_atol), rtol=rtol)
            x, y = torch.cat([x[:width], x[2 * width:]]), torch.cat([y[:width], y[2 * width:]])
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=f"weights differ at {key}")


# ---- the small models of the optimizer tests

def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def mlp(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(16, 3))


def mlp_batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(24, 5, generator=generator), torch.randn(24, 3, generator=generator)


def mlp_loss(model, batch):
    inputs, targets = batch
    return (model(inputs) - targets).pow(2).mean()


def recording_closure(model, batch, points=None, grad_scaler=None):
    """The closure contract: forward + backward at the current weights, return the loss."""

    def closure():
        if points is not None:
            points.append(flat(model.parameters()))
        loss = mlp_loss(model, batch)
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        return loss

    return closure


def gradient_at(model, batch, point: torch.Tensor) -> torch.Tensor:
    """grad L at a flat weight vector, on a throwaway copy of the model."""
    clone = mlp()
    clone.load_state_dict(model.state_dict())
    torch.nn.utils.vector_to_parameters(point, clone.parameters())
    mlp_loss(clone, batch).backward()
    return flat(p.grad for p in clone.parameters())


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))


def count_all_reduces(ddp_model) -> list:
    """A comm hook that counts gradient all-reduces: one per synced backward (bucket 0 is
    reduced exactly once per synced backward, whatever the number of buckets)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    counter = [0]

    def hook(state, bucket):
        counter[0] += bucket.index() == 0
        return allreduce_hook(None, bucket)

    ddp_model.register_comm_hook(state=None, hook=hook)
    return counter


def loop_closure(model, batches):
    """The training loop's closure over `batches` (fp32, one process, the contrastive loss)."""
    run = Run(args=Namespace(precision="fp32"), world=World(), model=model, layout=Layout(model),
              loss=open_clip.ClipLoss(), optimizer=None, scaler=None, schedule=None, checkpoints=None, metrics=None)
    return make_closure(run, batches)


# ---- small data sets on disk (zero-shot folder, csv, webdataset shards) for runs that need files

def write_eval_data(root) -> dict:
    """A 2-class zero-shot folder with its class names and templates, a 4-row csv and 4 webdataset
    shards of 4 samples each (with sizes.json); {name: path as str}."""
    from PIL import Image

    from nsoclip.shards import write_shards

    root = Path(root)
    images = []
    for index in range(16):
        label = index % 2
        image = Image.new("RGB", (32, 32), (40 + 100 * label, 20 * (index % 8), 90))
        images.append((image, f"a {'red' if label else 'dark'} square number {index}"))
        if index < 4:
            folder = root / "kinds" / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
            image.save(root / f"csv-{index}.png")
    (root / "classes.txt").write_text("dark\nred\n")
    (root / "templates.txt").write_text("a photo of a {} square.\n")
    (root / "data.csv").write_text("filepath\ttitle\n" + "".join(f"csv-{i}.png\t{images[i][1]}\n" for i in range(4)))
    write_shards(images, root / "shards", maxcount=4)
    return {"zeroshot": str(root / "kinds"), "classnames": str(root / "classes.txt"),
            "templates": str(root / "templates.txt"), "csv": str(root / "data.csv"),
            "shards": str(root / "shards" / "shard-{000000..000003}.tar")}
