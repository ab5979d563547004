"""Every flag of the README's flag tables starts a tiny training run (issue 18): the table below
gives each flag the run that uses it and a check of its effect on that run (its loss, weights,
files, logged values). Runs are shared between flags that fit together and made once per module.
The table must name exactly the README's flags, which must be exactly the parser's. Effects that
need several processes are checked where noted (tests named in the row's comment)."""
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from helpers import CONFIGS, REPO, TINY, in_process, read_jsonl, write_eval_data

from nsoclip import main
from nsoclip.checkpoint import load_checkpoint
from nsoclip.classification import IMAGENET_V2_FOLDER, imagenet_synsets
from nsoclip.params import build_parser

RN, COCA, TIMM = (str(CONFIGS / f"tiny-{name}.json") for name in ("rn", "coca", "timm"))
TOLERANCE = dict(rel=1e-4)  # the same loss through another code path (scripted, gathered) rounds otherwise


@dataclass
class Done:
    folder: Path
    argv: List[str]

    @property
    def params(self) -> Dict[str, str]:
        return dict(line.split(": ", 1) for line in (self.folder / "params.txt").read_text().splitlines())

    @property
    def metrics(self) -> list:
        return read_jsonl(self.folder / "metrics.jsonl")

    @property
    def results(self) -> list:
        return read_jsonl(self.folder / "results.jsonl")

    @property
    def losses(self) -> list:
        return [record["loss"] for record in self.metrics]

    def checkpoint(self, name="epoch_1.pt") -> dict:
        return load_checkpoint(self.folder / "checkpoints" / name)

    @property
    def state(self) -> dict:
        return self.checkpoint()["state_dict"]

    def log(self, name="out.log") -> str:
        return (self.folder / name).read_text()


# ---- the runs: extra flags on top of BASE ({data}, {root}, {checkpoint} are filled in)

RUNS = {
    "base": [],
    "start": ["--lr", "0"],                                   # the initial weights (AdamW at lr 0 keeps them)
    "rn-start": ["--model", RN, "--lr", "0"],
    "csv": ["--dataset-type", "csv", "--train-data", "{data}/keys.csv", "--csv-separator", ",",
            "--csv-img-key", "image", "--csv-caption-key", "caption"],
    "wds": ["--dataset-type", "webdataset", "--train-data", "{shards}::{shards}", "--dataset-resampled",
            "--train-data-upsampling-factors", "1::3", "--train-num-samples", "8"],
    "wds-sized": ["--dataset-type", "auto", "--train-data", "{shards}", "--train-num-samples", "12",
                  "--val-data", "{shards}", "--val-num-samples", "8"],
    "eval": ["--zeroshot-data", "{data}/kinds", "--zeroshot-classnames", "{data}/classes.txt",
             "--zeroshot-templates", "{data}/templates.txt", "--zeroshot-frequency", "1",
             "--val-data", "{data}/data.csv", "--val-frequency", "1"],
    "imagenet": ["--imagenet-val", "{root}/imagenet/val", "--imagenet-v2", "{root}/imagenet/v2",
                 "--imagenet-a", "{root}/imagenet/a", "--imagenet-r", "{root}/imagenet/r", "--zeroshot-frequency", "0"],
    "small-batch": ["--batch-size", "2", "--workers", "1", "--log-every-n-steps", "2"],
    "rn": ["--model", RN, "--use-bn-sync", "--lock-image", "--lock-image-freeze-bn-stats"],
    "pretrained": ["--pretrained", "{checkpoint}", "--lr", "0"],
    "amp": ["--precision", "amp"],
    "image-size": ["--force-image-size", "48", "--force-context-length", "8", "--force-custom-text",
                   "--image-interpolation", "bilinear", "--image-resize-mode", "squash"],
    "quick-gelu": ["--force-quick-gelu"],
    "patch-dropout": ["--force-patch-dropout", "0.5"],
    "mean-std": ["--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.2", "0.2", "0.2"],
    "aug": ["--aug-cfg", "scale=(0.3, 0.5)"],
    "same-loss": ["--local-loss", "--gather-with-grad", "--torchscript", "--ddp-static-graph",
                  "--cache-dir", "{root}/cache", "--dist-url", "env://", "--dist-backend", "gloo", "--dist-timeout", "5",
                  "--no-set-device-rank", "--max-nonfinite-steps", "3", "--debug"],
    "siglip": ["--siglip", "--loss-dist-impl", "gather"],
    "coca": ["--model", COCA, "--coca-caption-loss-weight", "0.5", "--coca-contrastive-loss-weight", "2"],
    "timm": ["--model", TIMM, "--pretrained-image"],
    "cooldown": ["--epochs", "2", "--lr-scheduler", "const-cooldown", "--epochs-cooldown", "1",
                 "--lr-cooldown-end", "1e-4", "--lr-cooldown-power", "2", "--warmup", "1", "--save-frequency", "2"],
    "adam": ["--lr", "1e-3", "--beta1", "0.8", "--beta2", "0.95", "--eps", "1e-7", "--wd", "0.05", "--warmup", "4",
             "--lr-scheduler", "const", "--grad-clip-norm", "0.001"],
    "accum": ["--accum-freq", "2"],
    "locks": ["--lock-image", "--lock-image-unlocked-groups", "1",
              "--lock-text", "--lock-text-freeze-layer-norm", "--lock-text-unlocked-layers", "2"],
    "skip": ["--skip-scheduler", "--warmup", "10"],
    "nso": ["--opt", "nso", "--nso-sigma", "0.02", "--nso-num-perturbs", "2", "--no-nso-two-point",
            "--nso-lam", "0.5", "--nso-distribution", "uniform", "--nso-sigma-schedule", "linear",
            "--nso-sigma-ramp-steps", "4", "--nso-perturb", "weights"],
    "nso-relative": ["--opt", "nso", "--nso-sigma", "0.05", "--nso-noise-scale", "element", "--nso-noise-eta", "0.02",
                     "--nso-sigma-groups", "visual=0.1,logit_scale=0", "--nso-every", "2", "--nso-start-step", "1",
                     "--train-num-samples", "16"],
    "sam": ["--opt", "sam", "--sam-rho", "0.1", "--sam-adaptive", "--sam-ascent", "global"],
    # FSDP2 on a group of one process: the same run as "base", laid out and checkpointed as on N ranks
    "fsdp": ["--fsdp", "--fsdp-checkpoint", "sharded", "--fsdp-grad-reduce", "step", "--fsdp-no-reshard-after-forward",
             "--save-every-n-steps", "1"],
    "fsdp-offload": ["--fsdp", "--fsdp-offload-cpu"],
    # aot_eager: compiled without inductor's C++ build, bit for bit the eager step (inductor: test_compile)
    "compile": ["--torchcompile", "--torchcompile-backend", "aot_eager", "--torchcompile-mode", "default"],
    "files": ["--epochs", "2", "--save-most-recent", "--save-every-n-steps", "1",
              "--delete-previous-checkpoint", "--report-to", "tensorboard", "--log-local",
              "--remote-sync", "file://{root}/remote", "--remote-sync-frequency", "60", "--remote-sync-protocol", "fsspec"],
    "resume": ["--resume", "{checkpoint}", "--epochs", "2"],
    "wandb": ["--report-to", "wandb", "--wandb-project-name", "flag-table", "--wandb-notes", "a note"],
    "seed": ["--seed", "4", "--grad-checkpointing"],
    "hessian": ["--hessian-frequency", "1", "--hessian-num-batches", "2", "--hessian-probes", "3",
                "--hessian-method", "hutchpp", "--hessian-hvp", "finite_difference", "--hessian-top-k", "1",
                "--hessian-params", "visual", "--hessian-max-iter", "4", "--hessian-block-size", "2",
                "--opt", "nso", "--nso-two-point"],
    "hessian-precision": ["--hessian-frequency", "1", "--hessian-num-batches", "1", "--hessian-probes", "32",
                          "--hessian-target-rel-stderr", "1000", "--hessian-top-k", "0", "--hessian-bottom-k", "1",
                          "--hessian-max-iter", "4", "--hessian-hvp", "finite_difference"],
}


def base(root: Path, name: str) -> list:
    return ["--dataset-type", "synthetic", "--train-num-samples", "8", "--model", TINY, "--batch-size", "4",
            "--epochs", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--logs", str(root / "logs"),
            "--name", name, "--warmup", "2", "--log-every-n-steps", "1", "--seed", "3"]


def unchanged(done: Done, start: Done, prefix: str) -> bool:
    return all(torch.equal(v, start.state[k]) for k, v in done.state.items() if k.startswith(prefix))


# ---- the table: flag -> (run, check(done, runs)); `runs` gives any other run by name

T: Dict[str, Tuple[str, Callable[[Done, Callable[[str], Done]], bool]]] = {
    # data
    "--train-data": ("csv", lambda d, r: len(d.metrics) == 1),                       # 4 csv rows, batch 4
    "--csv-separator": ("csv", lambda d, r: d.params["csv_separator"] == ","),
    "--csv-img-key": ("csv", lambda d, r: d.params["csv_img_key"] == "image" and d.losses),
    "--csv-caption-key": ("csv", lambda d, r: d.params["csv_caption_key"] == "caption" and d.losses),
    "--dataset-type": ("wds-sized", lambda d, r: d.params["dataset_type"] == "auto" and len(d.metrics) == 3),
    "--train-num-samples": ("wds-sized", lambda d, r: d.metrics[-1]["batches"] == 3),
    "--val-data": ("eval", lambda d, r: d.results[-1]["num_samples"] == 4),
    # the size of --val-data shards without a sizes.json; these have one, and all 16 samples are scored
    "--val-num-samples": ("wds-sized", lambda d, r: d.params["val_num_samples"] == "8"
                          and d.results[-1]["num_samples"] == 16),
    "--dataset-resampled": ("wds", lambda d, r: len(d.metrics) == 2),
    "--train-data-upsampling-factors": ("wds", lambda d, r: d.params["train_data_upsampling_factors"] == "1::3"),
    "--workers": ("small-batch", lambda d, r: d.params["workers"] == "1"),
    "--batch-size": ("small-batch", lambda d, r: [m["step"] for m in d.metrics] == [2, 4]),
    # model
    "--model": ("rn", lambda d, r: "visual.layer1.0.conv1.weight" in d.state),
    "--pretrained": ("pretrained", lambda d, r: all(torch.equal(v, r("base").state[k]) for k, v in d.state.items())),
    "--precision": ("amp", lambda d, r: "fp16_overflow_steps" in d.metrics[-1]),      # fp16 autocast + GradScaler
    "--force-image-size": ("image-size", lambda d, r: tuple(d.state["visual.positional_embedding"].shape) == (37, 64)),
    "--force-context-length": ("image-size", lambda d, r: tuple(d.state["text.positional_embedding"].shape) == (8, 32)),
    "--force-custom-text": ("image-size", lambda d, r: "text.token_embedding.weight" in d.state),
    "--image-interpolation": ("image-size", lambda d, r: d.params["image_interpolation"] == "bilinear"),
    "--image-resize-mode": ("image-size", lambda d, r: d.params["image_resize_mode"] == "squash"),
    "--force-quick-gelu": ("quick-gelu", lambda d, r: d.losses[0] != pytest.approx(r("base").losses[0], **TOLERANCE)),
    "--force-patch-dropout": ("patch-dropout", lambda d, r: d.losses[0] != pytest.approx(r("base").losses[0])),
    "--image-mean": ("mean-std", lambda d, r: d.losses[0] != pytest.approx(r("base").losses[0])),
    "--image-std": ("mean-std", lambda d, r: d.params["image_std"] == "[0.2, 0.2, 0.2]"),
    "--aug-cfg": ("aug", lambda d, r: d.losses[0] != pytest.approx(r("base").losses[0])),
    "--cache-dir": ("same-loss", lambda d, r: d.losses == pytest.approx(r("base").losses, **TOLERANCE)),
    "--siglip": ("siglip", lambda d, r: d.state["logit_bias"].item() == pytest.approx(-10, abs=0.01)),
    "--loss-dist-impl": ("siglip", lambda d, r: d.params["loss_dist_impl"] == "gather"),  # 2 ranks: test_openclip_parity
    "--local-loss": ("same-loss", lambda d, r: d.losses == pytest.approx(r("base").losses, **TOLERANCE)),
    "--gather-with-grad": ("same-loss", lambda d, r: d.params["gather_with_grad"] == "True"),
    "--pretrained-image": ("timm", lambda d, r: d.params["pretrained_image"] == "True"),  # weights: test_openclip_parity
    "--coca-caption-loss-weight": ("coca", lambda d, r: d.params["coca_caption_loss_weight"] == "0.5"),
    "--coca-contrastive-loss-weight": ("coca", lambda d, r: d.params["coca_contrastive_loss_weight"] == "2.0"),
    # training
    "--epochs": ("cooldown", lambda d, r: len(d.metrics) == 4),
    "--epochs-cooldown": ("cooldown", lambda d, r: [m["lr"] for m in d.metrics][1:] == pytest.approx([5e-4, 5e-4, 2e-4])),
    "--lr-cooldown-end": ("cooldown", lambda d, r: d.params["lr_cooldown_end"] == "0.0001"),
    "--lr-cooldown-power": ("cooldown", lambda d, r: d.params["lr_cooldown_power"] == "2.0"),
    "--lr": ("adam", lambda d, r: d.metrics[-1]["lr"] == pytest.approx(5e-4)),        # warmup 4: step 2 at 2/4
    "--beta1": ("adam", lambda d, r: tuple(d.checkpoint()["optimizer"]["param_groups"][0]["betas"]) == (0.8, 0.95)),
    "--beta2": ("adam", lambda d, r: d.params["beta2"] == "0.95"),
    "--eps": ("adam", lambda d, r: d.checkpoint()["optimizer"]["param_groups"][0]["eps"] == 1e-7),
    "--wd": ("adam", lambda d, r: [g["weight_decay"] for g in d.checkpoint()["optimizer"]["param_groups"]] == [0.0, 0.05]),
    "--warmup": ("adam", lambda d, r: d.metrics[0]["lr"] == pytest.approx(2.5e-4)),
    "--lr-scheduler": ("adam", lambda d, r: d.params["lr_scheduler"] == "const"),
    "--grad-clip-norm": ("adam", lambda d, r: d.metrics[0]["grad_norm"] > 0.001),    # the norm before clipping
    "--accum-freq": ("accum", lambda d, r: len(d.metrics) == 1 and d.checkpoint()["step"] == 1),
    "--grad-checkpointing": ("seed", lambda d, r: d.params["grad_checkpointing"] == "True"),
    "--ddp-static-graph": ("same-loss", lambda d, r: d.params["ddp_static_graph"] == "True"),  # DDP: test_train_cli
    "--lock-image": ("locks", lambda d, r: unchanged(d, r("start"), "visual.conv1")),
    "--lock-image-unlocked-groups": ("locks", lambda d, r: not unchanged(d, r("start"), "visual.proj")),
    # BatchNorm statistics move in training mode even at lr 0 (rn-start), frozen ones stay at their init
    "--lock-image-freeze-bn-stats": ("rn", lambda d, r: torch.all(d.state["visual.bn1.running_mean"] == 0)
                                     and not torch.all(r("rn-start").state["visual.bn1.running_mean"] == 0)),
    "--lock-text": ("locks", lambda d, r: unchanged(d, r("start"), "token_embedding")),
    "--lock-text-unlocked-layers": ("locks", lambda d, r: not unchanged(d, r("start"), "transformer.resblocks.1")
                                    and unchanged(d, r("start"), "transformer.resblocks.0")),
    "--lock-text-freeze-layer-norm": ("locks", lambda d, r: unchanged(d, r("start"), "transformer.resblocks.0.ln_1")),
    "--max-nonfinite-steps": ("same-loss", lambda d, r: d.params["max_nonfinite_steps"] == "3"),  # effect: test_faults
    "--skip-scheduler": ("skip", lambda d, r: [m["lr"] for m in d.metrics] == [5e-4, 5e-4]),
    "--torchcompile": ("compile", lambda d, r: d.losses == pytest.approx(r("base").losses, **TOLERANCE)
                       and d.state.keys() == r("base").state.keys()),          # the bare model is saved
    "--torchcompile-backend": ("compile", lambda d, r: d.params["torchcompile_backend"] == "aot_eager"),
    "--torchcompile-mode": ("compile", lambda d, r: d.params["torchcompile_mode"] == "default"),
    "--torchscript": ("same-loss", lambda d, r: d.params["torchscript"] == "True"
                      and d.checkpoint()["state_dict"].keys() == r("base").state.keys()),
    # optimizer
    "--opt": ("sam", lambda d, r: {"clean_loss", "perturbed_loss"} <= d.metrics[0].keys()),
    "--nso-sigma": ("nso", lambda d, r: [m["sigma"] for m in d.metrics] == pytest.approx([0.005, 0.01])),
    "--nso-num-perturbs": ("nso", lambda d, r: d.params["nso_num_perturbs"] == "2"),
    "--nso-two-point": ("hessian", lambda d, r: d.params["nso_two_point"] == "True"),
    "--no-nso-two-point": ("nso", lambda d, r: d.params["nso_two_point"] == "False"),
    "--nso-lam": ("nso", lambda d, r: "clean_loss" in d.metrics[0]),
    "--nso-distribution": ("nso", lambda d, r: d.params["nso_distribution"] == "uniform"),
    "--nso-sigma-schedule": ("nso", lambda d, r: d.metrics[0]["sigma"] < d.metrics[1]["sigma"]),
    "--nso-sigma-ramp-steps": ("nso", lambda d, r: d.params["nso_sigma_ramp_steps"] == "4"),
    "--nso-perturb": ("nso", lambda d, r: d.params["nso_perturb"] == "weights"),
    # start step 1, every 2nd step after it: steps 1 and 3 of 4 are perturbed
    "--nso-every": ("nso-relative", lambda d, r: [m["perturbed_steps"] for m in d.metrics] == [0, 1, 0, 1]),
    "--nso-start-step": ("nso-relative", lambda d, r: "perturbed_loss" not in d.metrics[0]
                         and "perturbed_loss" in d.metrics[1]),
    "--nso-noise-scale": ("nso-relative", lambda d, r: d.params["nso_noise_scale"] == "element"),  # rule: test_nso
    "--nso-noise-eta": ("nso-relative", lambda d, r: d.params["nso_noise_eta"] == "0.02"),
    "--nso-sigma-groups": ("nso-relative", lambda d, r: d.params["nso_sigma_groups"] == "visual=0.1,logit_scale=0"),
    "--sam-rho": ("sam", lambda d, r: d.metrics[0]["rho"] == 0.1),
    "--sam-adaptive": ("sam", lambda d, r: d.params["sam_adaptive"] == "True"),
    "--sam-ascent": ("sam", lambda d, r: d.params["sam_ascent"] == "global"),
    # logging and checkpoints
    "--logs": ("base", lambda d, r: d.folder.parent.name == "logs"),
    "--name": ("base", lambda d, r: d.folder.name == "base"),
    "--report-to": ("files", lambda d, r: any((d.folder / "tensorboard").glob("events.out.tfevents.*"))),
    "--wandb-project-name": ("wandb", lambda d, r: d.params["wandb_project_name"] == "flag-table"),
    "--wandb-notes": ("wandb", lambda d, r: d.params["wandb_notes"] == "a note"),
    "--log-local": ("files", lambda d, r: "Train epoch 1" in d.log("out-0.log")),
    "--log-every-n-steps": ("small-batch", lambda d, r: len(d.metrics) == 2),
    "--save-frequency": ("cooldown", lambda d, r: sorted(p.name for p in (d.folder / "checkpoints").iterdir())
                         == ["epoch_2.pt"]),
    "--save-most-recent": ("files", lambda d, r: (d.folder / "checkpoints" / "epoch_latest.pt").is_file()),
    "--save-every-n-steps": ("files", lambda d, r: "Saved step checkpoint" in d.log()),
    "--delete-previous-checkpoint": ("files", lambda d, r: sorted(p.name for p in (d.folder / "checkpoints").glob(
        "epoch_*.pt")) == ["epoch_2.pt", "epoch_latest.pt"]),
    "--resume": ("resume", lambda d, r: [m["step"] for m in d.metrics] == [3, 4] and "Resumed from" in d.log()),
    "--zeroshot-frequency": ("eval", lambda d, r: "kinds-zeroshot-val-top1" in d.results[-1]),
    "--val-frequency": ("eval", lambda d, r: [x["epoch"] for x in d.results] == [1]),
    "--hessian-frequency": ("hessian", lambda d, r: "hessian/trace" in d.results[-1]),
    "--debug": ("same-loss", lambda d, r: d.params["debug"] == "True"),
    "--remote-sync": ("files", lambda d, r: (d.folder.parent.parent / "remote" / "files" / "checkpoints" /
                                             "epoch_2.pt").is_file()),
    "--remote-sync-frequency": ("files", lambda d, r: d.params["remote_sync_frequency"] == "60"),
    "--remote-sync-protocol": ("files", lambda d, r: d.params["remote_sync_protocol"] == "fsspec"),
    # distributed (launches: test_train_cli's multi-process tests)
    "--device": ("base", lambda d, r: "device cpu" in d.log()),
    "--dist-url": ("same-loss", lambda d, r: d.params["dist_url"] == "env://"),
    "--dist-backend": ("same-loss", lambda d, r: d.params["dist_backend"] == "gloo"),
    "--dist-timeout": ("same-loss", lambda d, r: d.params["dist_timeout"] == "5.0"),
    "--no-set-device-rank": ("same-loss", lambda d, r: d.params["no_set_device_rank"] == "True"),
    "--seed": ("seed", lambda d, r: d.losses[0] != pytest.approx(r("base").losses[0])),
    # sharded training (2 ranks against DDP and one process: test_fsdp)
    "--fsdp": ("fsdp", lambda d, r: d.losses == pytest.approx(r("base").losses, **TOLERANCE)),
    "--fsdp-checkpoint": ("fsdp", lambda d, r: "Saved sharded step checkpoint" in d.log()),
    "--fsdp-grad-reduce": ("fsdp", lambda d, r: d.params["fsdp_grad_reduce"] == "step"),
    "--fsdp-no-reshard-after-forward": ("fsdp", lambda d, r: d.params["fsdp_no_reshard_after_forward"] == "True"),
    "--fsdp-offload-cpu": ("fsdp-offload", lambda d, r: d.losses == pytest.approx(r("base").losses, **TOLERANCE)),
    "--use-bn-sync": ("rn", lambda d, r: d.params["use_bn_sync"] == "True"),  # 2 GPUs: test_openclip_parity
    # evaluation
    "--imagenet-val": ("imagenet", lambda d, r: "Zero-shot set imagenet: 1000 classes, 1 images" in d.log()),
    "--imagenet-v2": ("imagenet", lambda d, r: "Zero-shot set imagenetv2: 1000 classes, 1 images" in d.log()),
    "--imagenet-a": ("imagenet", lambda d, r: "Zero-shot set imagenet-a: 200 classes, 1 images" in d.log()),
    "--imagenet-r": ("imagenet", lambda d, r: "Zero-shot set imagenet-r: 200 classes, 1 images" in d.log()),
    "--zeroshot-data": ("eval", lambda d, r: d.results[-1]["kinds-zeroshot-val-top1"] >= 0),
    "--zeroshot-classnames": ("eval", lambda d, r: "Zero-shot set kinds: 2 classes, 4 images" in d.log()),
    "--zeroshot-templates": ("eval", lambda d, r: d.params["zeroshot_templates"].endswith("templates.txt")),
    # hessian (with --hessian-frequency)
    "--hessian-num-batches": ("hessian", lambda d, r: d.params["hessian_num_batches"] == "2"),
    "--hessian-probes": ("hessian", lambda d, r: d.params["hessian_probes"] == "3"),
    "--hessian-method": ("hessian", lambda d, r: d.params["hessian_method"] == "hutchpp"),
    "--hessian-hvp": ("hessian", lambda d, r: d.params["hessian_hvp"] == "finite_difference"),
    "--hessian-top-k": ("hessian", lambda d, r: "hessian/top_eigenvalue" in d.results[-1]),
    "--hessian-params": ("hessian", lambda d, r: "hessian/trace_text" not in d.results[-1]
                         and "hessian/trace_visual" in d.results[-1]),
    # a loose target stops at the first block past 16 probes, of the 32 allowed
    "--hessian-target-rel-stderr": ("hessian-precision", lambda d, r: d.results[-1]["hessian/trace_num_hvps"] < 32),
    "--hessian-bottom-k": ("hessian-precision", lambda d, r: "hessian/bottom_eigenvalue" in d.results[-1]
                           and "hessian/top_eigenvalue" not in d.results[-1]),
    "--hessian-max-iter": ("hessian", lambda d, r: d.params["hessian_max_iter"] == "4"),
    "--hessian-block-size": ("hessian", lambda d, r: d.params["hessian_block_size"] == "2"),
}


def readme_flags() -> set:
    section = (REPO / "README.md").read_text().split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    return {flag for line in section.splitlines() if line.startswith("| `--")
            for flag in re.findall(r"`(--[a-z0-9-]+)`", line.split(" | ")[0])}


def parser_flags() -> set:
    return {option for action in build_parser()._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def test_the_table_covers_exactly_the_readme_flags_and_the_parsers():
    assert readme_flags() == parser_flags()
    assert set(T) == parser_flags()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    files = write_eval_data(root / "data")
    rows = (root / "data" / "data.csv").read_text().splitlines()[1:]
    (root / "data" / "keys.csv").write_text("image,caption\n" + "".join(
        f"{row.split(chr(9))[0]},{row.split(chr(9))[1]}\n" for row in rows))
    synsets = imagenet_synsets("imagenet-1k")
    for folder in (f"val/{synsets[0]}", f"v2/{IMAGENET_V2_FOLDER}/0", f"a/{imagenet_synsets('imagenet-a')[0]}",
                   f"r/{imagenet_synsets('imagenet-r')[0]}"):
        (root / "imagenet" / folder).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / "imagenet" / folder / "0.jpg")
    torch.manual_seed(1)  # timm's test_resnet weights in an offline Hugging Face cache, for --pretrained-image
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in timm.create_model("test_resnet").state_dict().items()}
    snapshot = root / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(state, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return root, files


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """runs(name) -> Done, each run made once on first use."""
    root, files = inputs
    done = {}
    patch = pytest.MonkeyPatch()
    patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(root))
    patch.setenv("WANDB_SILENT", "true")

    def run(name: str) -> Done:
        if name not in done:
            if name == "wandb":
                pytest.importorskip("wandb")
            fill = {"{data}": str(root / "data"), "{root}": str(root), "{shards}": files["shards"],
                    "{checkpoint}": str(root / "logs" / "base" / "checkpoints" / "epoch_1.pt")}
            if "{checkpoint}" in " ".join(RUNS[name]):
                run("base")
            extra = [re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group()], word) for word in RUNS[name]]
            argv = base(root, name) + extra
            assert in_process(main.main, argv) == 0, name
            done[name] = Done(root / "logs" / name, argv)
        return done[name]

    yield run
    patch.undo()
    if "wandb" in done:  # wandb keeps the environment of its first run per process (its setup singleton)
        sys.modules["wandb"].teardown()


@pytest.mark.parametrize("flag", sorted(T))
def test_flag_starts_a_tiny_run_with_its_effect(flag, runs):
    name, check = T[flag]
    assert flag in runs(name).argv or flag == "--no-nso-two-point" and "--no-nso-two-point" in runs(name).argv
    assert check(runs(name), runs), f"{flag} in run {name!r}: {RUNS[name]}"
