"""Model creation: an OpenCLIP model name or a path to a model-config JSON in OpenCLIP's format,
optional weights from our checkpoints or OpenCLIP's (or downloaded by open_clip and timm into
their caches), SigLIP's initialisation, OpenCLIP's tower locking, and the --torchcompile settings."""
import argparse
import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Optional

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder

from .checkpoint import load_model_weights
from .errors import NsoclipError


# torch.compile's modes (inductor's; the other backends take none).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_COMPILE_BACKEND = "inductor"


class ModelError(NsoclipError, ValueError):
    """--model / --pretrained do not describe a model we can build."""


def resolve_model_name(model: str) -> str:
    """Register a config JSON with open_clip and return the name it is known by (its stem)."""
    if model.endswith(".json") or Path(model).is_file():
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"--model {model}: config file not found")
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"--model {model}: not a readable JSON model config ({error})") from None
        missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
        if missing:
            raise ModelError(f"--model {model}: model config lacks {', '.join(missing)}")
        open_clip.add_model_config(path)
        return path.stem
    if model.startswith(("hf-hub:", "local-dir:")) or model in open_clip.list_models():
        return model
    raise ModelError(f"--model {model}: not an OpenCLIP model name nor a model-config JSON path")


def is_local_file(pretrained: str) -> bool:
    return bool(pretrained) and Path(pretrained).is_file()


# SigLIP's start (Zhai et al. 2023), which OpenCLIP's --siglip gives a CLIP config: logits
# 10 * cos - 10, so that every pair starts out far on the "negative" side of the sigmoid.
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10}
RANDOM_INIT_MESSAGE = "No pretrained weights loaded for model"


def image_size(force_image_size):
    """--force-image-size: one value is a square side (an int, as OpenCLIP passes it), two are
    (height, width)."""
    if force_image_size is None:
        return None
    if len(force_image_size) == 1:
        return force_image_size[0]
    if len(force_image_size) == 2:
        return tuple(force_image_size)
    raise ModelError(f"--force-image-size {' '.join(map(str, force_image_size))}: give one value (square) "
                     "or two (height width)")


class DropRecord(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def quiet_random_init(weights_follow: bool):
    """open_clip warns on every rank that the model is initialised randomly; when our own loader
    fills it right after, that warning is wrong, and the load is announced instead."""
    if not weights_follow:
        yield
        return
    root, dropped = logging.getLogger(), DropRecord(RANDOM_INIT_MESSAGE)
    root.addFilter(dropped)
    try:
        yield
    finally:
        root.removeFilter(dropped)


def check_pretrained_image(name: str, args) -> None:
    """OpenCLIP 3.3 ignores --pretrained-image silently unless the image tower is a timm model."""
    if args.pretrained_image and "timm_model_name" not in (open_clip.get_model_config(name) or {}).get("vision_cfg", {}):
        raise ModelError(f"--pretrained-image: --model {args.model} has no timm image tower (vision_cfg."
                         "timm_model_name), so there are no ImageNet weights to load")


def download_error(args, error: Exception) -> ModelError:
    """One line for weights open_clip or timm could not download nor find in their caches."""
    what = f"--pretrained {args.pretrained}" if args.pretrained else "--pretrained-image"
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return ModelError(f"{what}: weights neither in the cache nor downloadable ({detail}); pass a local "
                      "checkpoint file, or fill the cache (--cache-dir, HF_HOME) on a machine with network access")


@torch.no_grad()
def initialise_coca_decoder_projection(model: torch.nn.Module) -> None:
    """open_clip 3.3 never calls CoCa's MultimodalTransformer.init_parameters(), so the text
    decoder's text_projection stays torch.empty memory: zeros in a fresh process, garbage (we
    measured caption losses of 1e20 on tiny-coca) after earlier allocations; its PR 551 was never
    merged, and that init_parameters itself fails (it reads self.transformer.width). This draws
    the one tensor left uninitialised with the std init_parameters means, width ** -0.5."""
    decoder = model.text_decoder
    torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)


def create_model_and_transforms(args, device: torch.device, weights_follow: bool = False):
    """(model, preprocess_train, preprocess_val, tokenizer) from the model flags on `args`
    (params.add_model_args, which every CLI has). `weights_follow`: the caller loads weights
    into the model next (a checkpoint to resume or evaluate).

    Weights from a local file go through our own loader, which accepts OpenCLIP's and our
    checkpoints (with or without the `module.` prefix) and names mismatched keys on failure. A
    pretrained tag (--pretrained) and timm image weights (--pretrained-image) go through
    open_clip and timm, which use their caches and download what is missing.
    """
    name = resolve_model_name(args.model)
    pretrained = args.pretrained or ""
    looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if pretrained and not is_local_file(pretrained) and looks_like_path:
        raise ModelError(f"--pretrained {pretrained}: file not found")
    if pretrained and not is_local_file(pretrained) and not name.startswith(("hf-hub:", "local-dir:")) \
            and not open_clip.get_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelError(f"--pretrained {pretrained}: neither a file nor a pretrained tag of {name} "
                         f"({'its tags: ' + ', '.join(tags) if tags else 'it has no pretrained tags'})")
    check_pretrained_image(name, args)
    downloads = bool(pretrained and not is_local_file(pretrained)) or args.pretrained_image
    try:
        with quiet_random_init(weights_follow or is_local_file(pretrained)):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name,
                pretrained=None if is_local_file(pretrained) else (pretrained or None),
                precision=args.precision,
                device=device,
                force_quick_gelu=args.force_quick_gelu,
                force_custom_text=args.force_custom_text,
                force_patch_dropout=args.force_patch_dropout,
                force_image_size=image_size(args.force_image_size),
                force_context_length=args.force_context_length,
                image_mean=args.image_mean,
                image_std=args.image_std,
                image_interpolation=args.image_interpolation,
                image_resize_mode=args.image_resize_mode,
                aug_cfg=args.aug_cfg or None,
                pretrained_image=args.pretrained_image,
                cache_dir=args.cache_dir,
                output_dict=True,
                **(SIGLIP_INIT if args.siglip else {}),
            )
    except (RuntimeError, OSError, ValueError) as error:
        if downloads:
            raise download_error(args, error) from None
        raise
    if isinstance(model, open_clip.CoCa) and not (pretrained and not is_local_file(pretrained)):
        initialise_coca_decoder_projection(model)
    if is_local_file(pretrained):
        load_model_weights(model, pretrained, label="--pretrained")
        logging.info("Loaded weights from %s", pretrained)
    tokenizer = open_clip.get_tokenizer(name, context_length=args.force_context_length)
    return model, preprocess_train, preprocess_val, tokenizer


def torchscript(model: torch.nn.Module, args):
    """--torchscript as OpenCLIP: the model scripted by torch.jit.script (torch deprecates it),
    sharing the model's parameters, for the training step to call; None without the flag."""
    return torch.jit.script(model) if args.torchscript else None


def prepare_for_training(model: torch.nn.Module, args) -> None:
    """OpenCLIP's training-only model settings: tower locking and gradient checkpointing."""
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        if not args.lock_text_freeze_layer_norm and not isinstance(getattr(model, "text", None), HFTextEncoder):
            raise ModelError(f"--lock-text: the built-in text tower of --model {args.model} locks its LayerNorms "
                             "with their layers (open_clip cannot leave them trainable): add "
                             "--lock-text-freeze-layer-norm")
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers,
                              freeze_layer_norm=args.lock_text_freeze_layer_norm)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()


def compile_backend(name: str) -> str:
    """argparse type of --torchcompile-backend: a backend torch.compile knows, so a typo fails at
    parse time rather than at the first step."""
    known = torch.compiler.list_backends(exclude_tags=())
    if name not in known:
        common = [b for b in ("inductor", "aot_eager", "eager", "cudagraphs") if b in known]
        raise argparse.ArgumentTypeError(f"{name!r}: must be a torch.compile backend ({', '.join(common)}, ...; "
                                         "see torch.compiler.list_backends())")
    return name


def compile_options(args) -> Optional[dict]:
    """torch.compile's keyword arguments from --torchcompile-backend / --torchcompile-mode, or
    None without --torchcompile. Training hands them to parallel.distribute, which compiles the
    module the training closure calls (NSO's and SAM's in-place perturbations change no guard, so
    no step after the first recompiles); the bare model stays uncompiled: checkpoints save it,
    evaluation runs it and the Hessian differentiates it twice (aot_autograd has no double
    backward)."""
    if not args.torchcompile:
        return None
    return {"backend": args.torchcompile_backend or DEFAULT_COMPILE_BACKEND, "mode": args.torchcompile_mode}


def compile_model(module: torch.nn.Module, args) -> Optional[torch.nn.Module]:
    """torch.compile of `module` with the --torchcompile-* flags, or None without --torchcompile
    (the Hessian CLI's finite differences)."""
    options = compile_options(args)
    return torch.compile(module, **options) if options is not None else None
