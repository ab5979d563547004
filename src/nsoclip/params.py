"""Command-line flags. OpenCLIP's training flags keep their names, meanings and defaults; ours
are added beside them. Flag groups are functions so the Hessian and zero-shot CLIs reuse them."""
import argparse
import ast
import re

from . import curvature, logger, loss, nso, parallel, remote, sam
from .checkpoint import CHECKPOINT_KINDS
from .checks import command_line, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from .errors import NsoclipError
from .model import COMPILE_MODES, DEFAULT_COMPILE_BACKEND, compile_backend
from .optim import OPTIMIZERS
from .precision import PRECISIONS, default_precision
from .spectral import HUTCHINSON_BLOCK


class UsageError(NsoclipError, ValueError):
    """An invalid flag or flag combination; main() prints it as one line and exits 2."""


# OpenCLIP flags whose feature we do not ship: refused with the reason and what to do instead,
# never silently ignored.
UNSUPPORTED = {
    "--horovod": "Horovod is not supported; launch the same command with torchrun or srun (torch.distributed)",
    "--trace": "--trace (an inference-only traced model, which OpenCLIP cannot train either) is not supported; "
               "evaluate checkpoints with python -m nsoclip.zeroshot",
    "--distill-model": "distillation is not supported; train with the contrastive loss (drop the --distill-* flags)",
    "--distill-pretrained": "distillation is not supported; train with the contrastive loss (drop the --distill-* flags)",
    "--use-bnb-linear": "bitsandbytes int8 linear layers are not supported (NSO and SAM perturb floating-point "
                        "weights); train without it",
    "--copy-codebase": "--copy-codebase is not supported: nsoclip runs as an installed package and out.log "
                       "records the nsoclip, open_clip and torch versions of the run",
    "--momentum": "only AdamW is supported as base optimizer (--momentum is for timm optimizers); drop it",
}

# The reference NSO code's flag names, accepted so its scripts run unchanged.
REFERENCE_ALIASES = {
    "--train_nsm": ["--opt", "nso"],
    "--train_sam": ["--opt", "sam"],
    "--nsm_use_neg": ["--nso-two-point"],
    "--nsm_lam": ["--nso-lam"],
    "--nsm_num_perturbs": ["--nso-num-perturbs"],
    "--nsm_sigma": ["--nso-sigma"],
    "--sam_rho": ["--sam-rho"],
    "--sam_adaptive": ["--sam-adaptive"],
}


class ParseKwargs(argparse.Action):
    """--aug-cfg scale='(0.9, 1.0)' color_jitter=0.4 -> dict, as OpenCLIP."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for value in values:
            key, _, raw = value.partition("=")
            try:
                kwargs[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                kwargs[key] = str(raw)
        setattr(namespace, self.dest, kwargs)


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=str, default="RN50",
                       help="OpenCLIP model name, or path to a model-config JSON in OpenCLIP's format.")
    group.add_argument("--pretrained", default="", type=str,
                       help="OpenCLIP pretrained tag, or a checkpoint file (ours or OpenCLIP's).")
    group.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="Floating point precision (default: amp on GPUs, fp32 on CPUs).")
    group.add_argument("--force-image-size", type=int, nargs="+", default=None,
                       help="Override the model's image size: one value (square) or height width.")
    group.add_argument("--force-context-length", type=int, default=None, help="Override the text context length.")
    group.add_argument("--force-quick-gelu", action="store_true", default=False,
                       help="Use QuickGELU (as OpenAI's models).")
    group.add_argument("--force-patch-dropout", type=float, default=None,
                       help="Override patch dropout (e.g. 0.5 trains faster; 0 to disable).")
    group.add_argument("--force-custom-text", action="store_true", default=False,
                       help="Build the text tower as a separate module (CustomTextCLIP).")
    group.add_argument("--image-mean", type=float, nargs="+", default=None, metavar="MEAN",
                       help="Override the normalisation mean.")
    group.add_argument("--image-std", type=float, nargs="+", default=None, metavar="STD",
                       help="Override the normalisation std.")
    group.add_argument("--image-interpolation", default=None, choices=["bicubic", "bilinear", "random"],
                       help="Override the resize interpolation.")
    group.add_argument("--image-resize-mode", default=None, choices=["shortest", "longest", "squash"],
                       help="Override the resize mode.")
    group.add_argument("--aug-cfg", nargs="*", default={}, action=ParseKwargs,
                       help="Training augmentation, key=value pairs (OpenCLIP's AugmentationCfg).")
    group.add_argument("--cache-dir", type=str, default=None, help="Where OpenCLIP caches pretrained weights.")
    group.add_argument("--siglip", action="store_true", default=False, help="Use the SigLIP (sigmoid) loss.")
    group.add_argument("--local-loss", action="store_true", default=False,
                       help="Each rank computes the loss of its own rows against all gathered features "
                            "(requires --gather-with-grad).")
    group.add_argument("--gather-with-grad", action="store_true", default=False,
                       help="All-gather features with gradient (exact distributed contrastive loss).")
    group.add_argument("--pretrained-image", action="store_true", default=False,
                       help="ImageNet weights for a timm image tower (through timm's Hugging Face cache).")
    group.add_argument("--loss-dist-impl", choices=loss.SIGLIP_DIST_IMPLS, default=None,
                       help="How SigLIP exchanges features between ranks (default bidir).")
    group.add_argument("--coca-caption-loss-weight", type=NON_NEGATIVE.flag(), default=2.0,
                       help="Weight of the captioning loss (CoCa models).")
    group.add_argument("--coca-contrastive-loss-weight", type=NON_NEGATIVE.flag(), default=1.0,
                       help="Weight of the contrastive loss (CoCa models).")


def add_compile_args(parser):
    group = parser.add_argument_group("compile")
    group.add_argument("--torchcompile", action="store_true", default=False,
                       help="torch.compile the model the training step calls (every --opt; the saved, "
                            "evaluated and Hessian model stays uncompiled).")
    group.add_argument("--torchcompile-backend", type=compile_backend, default=None,
                       help=f"torch.compile backend, e.g. inductor or aot_eager (default: {DEFAULT_COMPILE_BACKEND}).")
    group.add_argument("--torchcompile-mode", choices=COMPILE_MODES, default=None,
                       help="torch.compile mode of the inductor backend (default: default).")


def add_distributed_args(parser):
    group = parser.add_argument_group("distributed")
    group.add_argument("--device", default=None, type=str,
                       help="cpu, cuda or cuda:N (default: cuda when available, else cpu).")
    group.add_argument("--dist-url", default=None, type=str, help="Rendezvous URL (default env://).")
    group.add_argument("--dist-backend", default=None, type=str, help="nccl (GPU default) or gloo (CPU default).")
    group.add_argument("--dist-timeout", default=30.0, type=float,
                       help="Minutes a collective may wait before the job fails naming it.")
    group.add_argument("--no-set-device-rank", action="store_true", default=False,
                       help="Use cuda:0 in every process (when CUDA_VISIBLE_DEVICES is set per rank).")
    group.add_argument("--seed", type=int, default=0, help="Default random seed.")
    group.add_argument("--use-bn-sync", action="store_true", default=False,
                       help="SyncBatchNorm over the ranks (BatchNorm models such as RN50; GPUs only).")


def add_sharding_args(parser):
    group = parser.add_argument_group("sharded training (FSDP2)")
    group.add_argument("--fsdp", action="store_true", default=False,
                       help="Shard parameters, gradients and optimizer state over all ranks (fully_shard, one unit "
                            "per residual block plus the root).")
    group.add_argument("--fsdp-checkpoint", choices=CHECKPOINT_KINDS, default="full",
                       help="Step checkpoints as one OpenCLIP file written by rank 0, or sharded folders every rank "
                            "writes (torch.distributed.checkpoint); epoch checkpoints are always full files.")
    group.add_argument("--fsdp-offload-cpu", action="store_true", default=False,
                       help="Keep the shards, their gradients and the optimizer state in CPU memory.")
    group.add_argument("--fsdp-no-reshard-after-forward", action="store_true", default=False,
                       help="Keep each block's gathered parameters from forward to backward (one all-gather less "
                            "per block and pass, more memory).")
    group.add_argument("--fsdp-grad-reduce", choices=parallel.GRAD_REDUCES, default="pass",
                       help="Reduce-scatter gradients after every backward (NSO pass, micro-batch): sharded "
                            "gradients; or once per step, accumulating whole gradients (P per rank) in between.")


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--train-data", type=str, default=None,
                       help="csv file, or webdataset shards (brace expansion, sources joined by '::').")
    group.add_argument("--train-data-upsampling-factors", type=str, default=None,
                       help="Sampling weight per '::' source, e.g. '1::2' (with --dataset-resampled).")
    group.add_argument("--val-data", type=str, default=None, help="Validation data (csv or webdataset).")
    group.add_argument("--train-num-samples", type=int, default=None, help="Samples per epoch (webdataset).")
    group.add_argument("--val-num-samples", type=int, default=None, help="Validation samples (webdataset).")
    group.add_argument("--dataset-type", choices=["webdataset", "csv", "synthetic", "auto"], default="auto",
                       help="Data format; auto reads it from --train-data.")
    group.add_argument("--dataset-resampled", action="store_true", default=False,
                       help="Sample shards with replacement (webdataset).")
    group.add_argument("--csv-separator", type=str, default="\t", help="Column separator of the csv.")
    group.add_argument("--csv-img-key", type=str, default="filepath", help="Image path column of the csv.")
    group.add_argument("--csv-caption-key", type=str, default="title", help="Caption column of the csv.")
    group.add_argument("--workers", type=NON_NEGATIVE_INT.flag(), default=4, help="Dataloader workers per rank.")
    group.add_argument("--batch-size", type=POSITIVE_INT.flag(), default=64, help="Batch size per rank.")


def add_eval_args(parser):
    group = parser.add_argument_group("evaluation")
    group.add_argument("--imagenet-val", type=str, default=None,
                       help="ImageNet validation folder (ImageFolder layout).")
    group.add_argument("--imagenet-v2", type=str, default=None, help="ImageNetV2 folder (classes 0..999).")
    group.add_argument("--imagenet-a", type=str, default=None, help="ImageNet-A folder (200 WordNet-id classes).")
    group.add_argument("--imagenet-r", type=str, default=None, help="ImageNet-R folder (200 WordNet-id classes).")
    group.add_argument("--zeroshot-data", type=str, default=None, help="Any labelled ImageFolder tree.")
    group.add_argument("--zeroshot-classnames", type=str, default=None, help="Class names, one per line.")
    group.add_argument("--zeroshot-templates", type=str, default=None, help="Templates with '{}', one per line.")


def add_hessian_args(parser):
    group = parser.add_argument_group("hessian")
    group.add_argument("--hessian-num-batches", type=POSITIVE_INT.flag(), default=4, help="Batches per rank in the Hessian loss.")
    group.add_argument("--hessian-probes", type=curvature.NUM_PROBES.flag(), default=64,
                       help="Hessian-vector products for the trace.")
    group.add_argument("--hessian-method", choices=curvature.METHODS, default="hutchinson",
                       help="Trace estimator.")
    group.add_argument("--hessian-hvp", choices=curvature.HVPS, default="exact",
                       help="Hessian-vector products by double backward or central differences.")
    group.add_argument("--hessian-top-k", type=curvature.NUM_EIGENVALUES.flag(), default=1,
                       help="Top eigenvalues to compute (0: none).")
    group.add_argument("--hessian-bottom-k", type=curvature.NUM_EIGENVALUES.flag(), default=0,
                       help="Smallest eigenvalues to compute, where negative curvature shows (0: none).")
    group.add_argument("--hessian-params", type=str, default=None,
                       help="Comma-separated substrings; only parameters whose name contains one are included.")
    group.add_argument("--hessian-max-iter", type=POSITIVE_INT.flag(), default=100, help="Lanczos iterations for eigenvalues.")
    group.add_argument("--hessian-block-size", type=curvature.BLOCK_SIZE.flag(), default=HUTCHINSON_BLOCK,
                       help="Hutchinson probes multiplied together, sharing each batch's graph (exact HVPs); "
                            "costs 2 x this many parameter-sized vectors of memory.")
    group.add_argument("--hessian-target-rel-stderr", type=curvature.TARGET_REL_STDERR.flag(), default=None,
                       help="Stop Hutchinson once the trace's relative standard error is at most this "
                            "(--hessian-probes caps the products).")


def add_training_args(parser):
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=POSITIVE_INT.flag(), default=32, help="Training epochs.")
    group.add_argument("--epochs-cooldown", type=int, default=None,
                       help="Final epochs spent cooling down (const-cooldown schedule).")
    group.add_argument("--lr", type=NON_NEGATIVE.flag(), default=None, help="Learning rate.")
    group.add_argument("--beta1", type=float, default=None, help="Adam beta 1.")
    group.add_argument("--beta2", type=float, default=None, help="Adam beta 2.")
    group.add_argument("--eps", type=float, default=None, help="Adam epsilon.")
    group.add_argument("--wd", type=NON_NEGATIVE.flag(), default=0.2, help="Weight decay.")
    group.add_argument("--warmup", type=NON_NEGATIVE_INT.flag(), default=10000, help="Warmup steps.")
    group.add_argument("--lr-scheduler", choices=["cosine", "const", "const-cooldown"], default="cosine",
                       help="LR schedule after the linear warmup.")
    group.add_argument("--lr-cooldown-end", type=float, default=0.0, help="Final LR of the cooldown.")
    group.add_argument("--lr-cooldown-power", type=float, default=1.0,
                       help="Power of the polynomial cooldown (1: linear).")
    group.add_argument("--accum-freq", type=POSITIVE_INT.flag(), default=1, help="Optimizer step every --accum-freq batches.")
    group.add_argument("--grad-clip-norm", type=POSITIVE.flag(), default=None,
                       help="Clip the gradient norm (after unscaling) to this value.")
    group.add_argument("--grad-checkpointing", action="store_true", default=False,
                       help="Recompute activations in backward to save memory.")
    group.add_argument("--ddp-static-graph", action="store_true", default=False,
                       help="Tell DDP the graph is static (faster with some models).")
    group.add_argument("--lock-image", action="store_true", default=False, help="Freeze the image tower.")
    group.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                       help="Leave the last N layer groups of the image tower trainable.")
    group.add_argument("--lock-image-freeze-bn-stats", action="store_true", default=False,
                       help="Freeze BatchNorm statistics of locked layers.")
    group.add_argument("--lock-text", action="store_true", default=False, help="Freeze the text tower.")
    group.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                       help="Leave the last N layers of the text tower trainable.")
    group.add_argument("--lock-text-freeze-layer-norm", action="store_true", default=False,
                       help="Freeze LayerNorm of locked text layers.")
    group.add_argument("--max-nonfinite-steps", type=POSITIVE_INT.flag(), default=10,
                       help="Stop after this many consecutive steps with a NaN/inf loss or gradient.")
    group.add_argument("--skip-scheduler", action="store_true", default=False,
                       help="Keep the learning rate at --lr from the first step (no warmup, no decay).")
    group.add_argument("--torchscript", action="store_true", default=False,
                       help="Train the model scripted by torch.jit.script (deprecated by torch).")

    optim = parser.add_argument_group("optimizer (NSO / SAM)")
    optim.add_argument("--opt", choices=OPTIMIZERS, default="adamw",
                       help="Optimizer: AdamW, or NSO / SAM around AdamW.")
    optim.add_argument("--nso-sigma", type=nso.SIGMA.flag(), default=0.01, help="Std of the Gaussian weight perturbation.")
    optim.add_argument("--nso-num-perturbs", type=nso.NUM_PERTURBS.flag(), default=1, help="Perturbations k per step.")
    optim.add_argument("--nso-two-point", action=argparse.BooleanOptionalAction, default=True,
                       help="Also evaluate w - e (antithetic pairs).")
    optim.add_argument("--nso-lam", type=nso.LAM.flag(), default=0.0, help="Weight of the clean gradient at w.")
    optim.add_argument("--nso-distribution", choices=nso.DISTRIBUTIONS, default="normal",
                       help="Zero-mean noise distribution, variance sigma^2.")
    optim.add_argument("--nso-sigma-schedule", choices=nso.SIGMA_SCHEDULES, default="constant",
                       help="Sigma over the first --nso-sigma-ramp-steps steps.")
    optim.add_argument("--nso-sigma-ramp-steps", type=nso.SIGMA_RAMP_STEPS.flag(), default=0, help="Steps of the sigma ramp.")
    optim.add_argument("--nso-perturb", choices=nso.PERTURB_CHOICES, default="all",
                       help="'weights' leaves logit_scale, norms and biases unperturbed.")
    optim.add_argument("--nso-noise-scale", choices=nso.NOISE_SCALES, default="absolute",
                       help="Noise std sigma (absolute), or relative to w: sigma ||w_row|| / sqrt(row size) per "
                            "output row (filter), sigma ||w|| / sqrt(numel) per tensor (layer), "
                            "sigma (|w| + eta) per element (element).")
    optim.add_argument("--nso-noise-eta", type=nso.NOISE_ETA.flag(), default=0.01,
                       help="eta of --nso-noise-scale element (ASAM's offset).")
    optim.add_argument("--nso-sigma-groups", type=nso.sigma_groups_flag, default=None,
                       help="Per-group sigma, e.g. 'visual=0.01,text=0.005,logit_scale=0': a pattern is a tower "
                            "(visual, text, other) or part of a parameter name; first match wins, the rest "
                            "use --nso-sigma.")
    optim.add_argument("--nso-every", type=nso.EVERY.flag(), default=1,
                       help="Perturbed steps every N-th step, plain AdamW steps in between.")
    optim.add_argument("--nso-start-step", type=nso.START_STEP.flag(), default=0,
                       help="Plain AdamW steps before this step, perturbed steps from it on.")
    optim.add_argument("--sam-rho", type=sam.RHO.flag(), default=0.05, help="SAM neighbourhood radius.")
    optim.add_argument("--sam-adaptive", action="store_true", default=False, help="ASAM.")
    optim.add_argument("--sam-ascent", choices=sam.ASCENTS, default="local",
                       help="Ascent direction from each rank's gradient (1 all-reduce/step) "
                            "or the all-reduced gradient (2 all-reduces/step).")

    logs = parser.add_argument_group("logging and checkpoints")
    logs.add_argument("--logs", type=str, default="./logs/",
                      help="Root folder of run folders; 'none' keeps no run folder (console only).")
    logs.add_argument("--name", type=str, default=None, help="Run folder name (default: date and settings).")
    logs.add_argument("--report-to", default="", type=str,
                      help="'tensorboard', 'wandb', both joined by ',', 'all', or '' (none).")
    logs.add_argument("--wandb-project-name", type=str, default="open-clip", help="wandb project.")
    logs.add_argument("--wandb-notes", type=str, default="", help="wandb run notes.")
    logs.add_argument("--log-local", action="store_true", default=False,
                      help="Every rank also writes its own log, out-RANK.log.")
    logs.add_argument("--log-every-n-steps", type=POSITIVE_INT.flag(), default=100,
                      help="Log training metrics every N optimizer steps.")
    logs.add_argument("--save-frequency", type=NON_NEGATIVE_INT.flag(), default=1, help="Save epoch_N.pt every N epochs.")
    logs.add_argument("--save-most-recent", action="store_true", default=False, help="Keep epoch_latest.pt.")
    logs.add_argument("--save-every-n-steps", type=NON_NEGATIVE_INT.flag(), default=0, help="Step checkpoints inside an epoch.")
    logs.add_argument("--delete-previous-checkpoint", action="store_true", default=False,
                      help="Keep only the newest epoch_N.pt.")
    logs.add_argument("--resume", default=None, type=str, help="Checkpoint path, or 'latest'.")
    logs.add_argument("--zeroshot-frequency", type=NON_NEGATIVE_INT.flag(), default=2, help="Zero-shot every N epochs.")
    logs.add_argument("--val-frequency", type=NON_NEGATIVE_INT.flag(), default=1, help="Validation every N epochs.")
    logs.add_argument("--hessian-frequency", type=NON_NEGATIVE_INT.flag(), default=0, help="Hessian trace every N epochs (0: off).")
    logs.add_argument("--debug", action="store_true", default=False,
                      help="Verbose logging; show tracebacks instead of one-line errors.")
    logs.add_argument("--remote-sync", type=str, default=None,
                      help="Copy the run folder to this fsspec URL (s3://..., file://..., ...); "
                           "--resume latest also looks there.")
    logs.add_argument("--remote-sync-frequency", type=POSITIVE_INT.flag(), default=300,
                      help="Seconds between remote syncs.")
    logs.add_argument("--remote-sync-protocol", choices=remote.PROTOCOLS, default="s3",
                      help="s3 (s3:// URLs, through s3fs) or fsspec (any fsspec URL).")


def refuse_unsupported(argv):
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in UNSUPPORTED:
            raise UsageError(f"{flag}: {UNSUPPORTED[flag]}")


def expand_aliases(argv):
    expanded = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if flag in REFERENCE_ALIASES:
            expanded.extend(REFERENCE_ALIASES[flag])
            if sep:
                expanded.append(value)
        else:
            expanded.append(arg)
    return expanded


RANGE_MESSAGE = re.compile(r"^argument ([^/\s:]+)\S*: (.+?: must be .*)$")


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting; a value outside its
    range (checks.Range.flag) reads '--flag VALUE: must be ...'."""

    def error(self, message):
        match = RANGE_MESSAGE.match(message)
        raise UsageError(f"{match.group(1)} {match.group(2)}" if match else message)


def default_adam_params(model_name: str) -> dict:
    """OpenCLIP's per-architecture AdamW defaults."""
    if "vit" in model_name.lower():
        return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


def build_parser():
    parser = Parser(prog="nsoclip-train", description="CLIP pretraining with NSO (OpenCLIP-compatible flags).")
    add_data_args(parser)
    add_model_args(parser)
    add_training_args(parser)
    add_compile_args(parser)
    add_distributed_args(parser)
    add_sharding_args(parser)
    add_eval_args(parser)
    add_hessian_args(parser)
    return parser


def parse_args(argv=None):
    argv = command_line(argv)
    refuse_unsupported(argv)
    args = build_parser().parse_args(expand_aliases(argv))
    for name, value in default_adam_params(args.model).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    resolve_precision(args)
    validate(args)
    return args


def resolve_precision(args) -> None:
    """--precision left out: OpenCLIP's amp where it is meant for (GPUs), fp32 on a CPU."""
    if args.precision is None:
        args.precision = default_precision(args.device)


def keeps_run_folder(args) -> bool:
    """OpenCLIP's --logs none (or ''): no run folder, no checkpoints, logs on the console only."""
    return bool(args.logs) and args.logs.lower() != "none"


# Flags read only with another flag: left out of params.txt when that flag is off, so that no
# default reads as if it were applied (nso_sigma in an AdamW run).
SETTINGS_OF = {
    "nso_": lambda args, coca: args.opt == "nso",
    "sam_": lambda args, coca: args.opt == "sam",
    "coca_": lambda args, coca: coca,
    "wandb_": lambda args, coca: "wandb" in logger.report_targets(args.report_to),
    "remote_sync_": lambda args, coca: bool(args.remote_sync),
    "lock_image_": lambda args, coca: args.lock_image,
    "lock_text_": lambda args, coca: args.lock_text,
    "lr_cooldown_": lambda args, coca: args.lr_scheduler == "const-cooldown" and not args.skip_scheduler,
    "hessian_": lambda args, coca: args.hessian_frequency > 0,
}
ALWAYS_READ = ("hessian_frequency",)


def unused_settings(args, coca: bool = False) -> set:
    """Names of the flags this run never reads (see SETTINGS_OF); `coca`: the model is a CoCa."""
    return {name for name in vars(args) if name not in ALWAYS_READ and any(
        name.startswith(prefix) and not used(args, coca) for prefix, used in SETTINGS_OF.items())}


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]*$")


def validate(args):
    """Reject flag combinations that would train wrongly or waste a job."""
    if args.local_loss and not args.gather_with_grad:
        raise UsageError("--local-loss without --gather-with-grad gives a wrong gradient: add --gather-with-grad")
    targets = logger.report_targets(args.report_to)
    if "wandb" in targets and not logger.wandb_available():
        raise UsageError(f"--report-to {args.report_to}: wandb is not installed (pip install 'nsoclip[wandb]')")
    if not keeps_run_folder(args):
        writes = [flag for flag, value in (("--report-to tensorboard", "tensorboard" in targets),
                                           ("--resume latest", args.resume == "latest"),
                                           ("--save-most-recent", args.save_most_recent),
                                           ("--save-every-n-steps", args.save_every_n_steps > 0),
                                           ("--delete-previous-checkpoint", args.delete_previous_checkpoint),
                                           ("--remote-sync", bool(args.remote_sync)),
                                           ("--log-local", args.log_local)) if value]
        if writes:
            raise UsageError(f"--logs {args.logs!r} keeps no run folder, so {writes[0]} has nowhere to write "
                             "or read: give --logs a folder")
    if args.loss_dist_impl and not args.siglip:
        raise UsageError(f"--loss-dist-impl {args.loss_dist_impl} applies to --siglip only "
                         "(the CLIP loss has one implementation, all_gather)")
    if args.torchscript and args.grad_checkpointing:
        raise UsageError("--torchscript with --grad-checkpointing: a scripted open_clip model skips activation "
                         "checkpointing (drop one of them)")
    if args.torchscript and args.use_bn_sync:
        raise UsageError("--torchscript with --use-bn-sync: SyncBatchNorm cannot be swapped into a scripted model "
                         "(drop one of them)")
    if args.torchscript and args.torchcompile:
        raise UsageError("--torchscript with --torchcompile: torch.compile does not take a scripted model "
                         "(drop one of them; --torchcompile is the supported one)")
    if args.pretrained_image and args.pretrained:
        raise UsageError("--pretrained-image has no effect with --pretrained: the CLIP weights replace the "
                         "image tower's (drop one of them)")
    if args.name is not None and (not NAME_PATTERN.match(args.name) or ".." in args.name):
        raise UsageError(f"--name {args.name!r}: use letters, digits and . _ - + = @ , only "
                         "(no path separators or '..'); the run folder must stay inside --logs")
    if args.nso_sigma_schedule != "constant" and args.nso_sigma_ramp_steps == 0:
        raise UsageError(f"--nso-sigma-schedule {args.nso_sigma_schedule} needs --nso-sigma-ramp-steps > 0")
    validate_hessian(args)
    validate_sharding(args)
    validate_compile(args)
    if args.lr_scheduler == "const-cooldown" and args.epochs_cooldown is None:
        raise UsageError("--lr-scheduler const-cooldown needs --epochs-cooldown")
    if args.epochs_cooldown is not None and not 0 <= args.epochs_cooldown < args.epochs:
        raise UsageError(f"--epochs-cooldown {args.epochs_cooldown}: must be in [0, --epochs)")
    if args.train_data_upsampling_factors and not args.dataset_resampled:
        raise UsageError("--train-data-upsampling-factors needs --dataset-resampled")
    if args.dataset_type == "synthetic" and args.train_num_samples is None:
        raise UsageError("--dataset-type synthetic needs --train-num-samples")
    if args.train_data is None and args.dataset_type != "synthetic" and args.val_data is None \
            and not any((args.imagenet_val, args.imagenet_v2, args.imagenet_a, args.imagenet_r, args.zeroshot_data)):
        raise UsageError("nothing to do: give --train-data (or --dataset-type synthetic), --val-data or --imagenet-val")
    if args.zeroshot_data and not (args.zeroshot_classnames and args.zeroshot_templates):
        raise UsageError("--zeroshot-data needs --zeroshot-classnames and --zeroshot-templates")


def validate_sharding(args):
    """--fsdp-* flags need --fsdp; --fsdp refuses what it cannot honour."""
    if not args.fsdp:
        given = [flag for flag, set_ in (("--fsdp-checkpoint sharded", args.fsdp_checkpoint != "full"),
                                         ("--fsdp-offload-cpu", args.fsdp_offload_cpu),
                                         ("--fsdp-no-reshard-after-forward", args.fsdp_no_reshard_after_forward),
                                         (f"--fsdp-grad-reduce {args.fsdp_grad_reduce}", args.fsdp_grad_reduce != "pass"))
                 if set_]
        if given:
            raise UsageError(f"{given[0]} needs --fsdp")
        return
    if args.ddp_static_graph:
        raise UsageError("--ddp-static-graph is a DDP setting: --fsdp does not use DDP (drop one of them)")
    if args.precision not in parallel.FSDP_PRECISIONS:
        raise UsageError(f"--precision {args.precision} with --fsdp: use {', '.join(parallel.FSDP_PRECISIONS)} "
                         "(fp16 loss scaling and OpenCLIP's mixed-dtype bf16/fp16 modes are not sharded)")
    if args.opt == "sam" and args.sam_ascent == "local":
        raise UsageError("--sam-ascent local needs every rank to hold the whole model: with --fsdp use "
                         "--sam-ascent global")
    if args.hessian_frequency and (args.hessian_hvp != "finite_difference" or args.precision != "fp32"
                                   or args.fsdp_offload_cpu):
        raise UsageError("--hessian-frequency with --fsdp needs --hessian-hvp finite_difference, --precision fp32 "
                         "and no --fsdp-offload-cpu: exact products (double backward) cannot run on an FSDP2 model, "
                         "bf16 all-gathers would round away the finite-difference step, and offloaded shards "
                         "live on another device than the batches")
    if args.torchscript:
        raise UsageError("--torchscript with --fsdp: fully_shard's hooks are not scriptable (drop --torchscript)")
    if args.use_bn_sync:
        raise UsageError("--use-bn-sync with --fsdp: SyncBatchNorm is synchronised through DDP here "
                         "(drop one of them)")


def validate_hessian(args):
    """The cross-flag rule of the --hessian-* flags, shared by training and nsoclip-hessian."""
    if args.hessian_top_k > args.hessian_max_iter:
        raise UsageError(f"--hessian-max-iter {args.hessian_max_iter}: must be >= --hessian-top-k")
    if args.hessian_bottom_k > args.hessian_max_iter:
        raise UsageError(f"--hessian-max-iter {args.hessian_max_iter}: must be >= --hessian-bottom-k")
    if args.hessian_target_rel_stderr is not None and args.hessian_method != "hutchinson":
        raise UsageError(f"--hessian-target-rel-stderr: only --hessian-method hutchinson stops at a precision, "
                         f"not {args.hessian_method}")


def validate_compile(args):
    """The cross-flag rules of the --torchcompile-* flags, shared by training and nsoclip-hessian."""
    for flag, value in (("--torchcompile-backend", args.torchcompile_backend),
                        ("--torchcompile-mode", args.torchcompile_mode)):
        if value is not None and not args.torchcompile:
            raise UsageError(f"{flag} {value} needs --torchcompile")
    backend = args.torchcompile_backend or DEFAULT_COMPILE_BACKEND
    if args.torchcompile_mode not in (None, "default") and backend != "inductor":
        raise UsageError(f"--torchcompile-mode {args.torchcompile_mode}: a mode of the inductor backend, "
                         f"which --torchcompile-backend {backend} would ignore")
