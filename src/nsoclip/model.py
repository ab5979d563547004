"""Model creation: an OpenCLIP model name or a path to a model-config JSON in OpenCLIP's format,
optional weights from our checkpoints or OpenCLIP's, OpenCLIP's tower locking, and the
--torchcompile settings."""
import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import open_clip
import torch

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


def create_model_and_transforms(args, device: torch.device):
    """(model, preprocess_train, preprocess_val, tokenizer) from the model flags on `args`
    (params.add_model_args, which every CLI has).

    Weights from a local file go through our own loader, which accepts OpenCLIP's and our
    checkpoints (with or without the `module.` prefix) and names mismatched keys on failure.
    """
    name = resolve_model_name(args.model)
    pretrained = args.pretrained or ""
    looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if pretrained and not is_local_file(pretrained) and looks_like_path:
        raise ModelError(f"--pretrained {pretrained}: file not found")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name,
        pretrained=None if is_local_file(pretrained) else (pretrained or None),
        precision=args.precision,
        device=device,
        force_quick_gelu=args.force_quick_gelu,
        force_custom_text=args.force_custom_text,
        force_patch_dropout=args.force_patch_dropout,
        force_image_size=args.force_image_size,
        force_context_length=args.force_context_length,
        image_mean=args.image_mean,
        image_std=args.image_std,
        image_interpolation=args.image_interpolation,
        image_resize_mode=args.image_resize_mode,
        aug_cfg=args.aug_cfg or None,
        cache_dir=args.cache_dir,
        output_dict=True,
    )
    if is_local_file(pretrained):
        load_model_weights(model, pretrained, label="--pretrained")
        logging.info("Loaded weights from %s", pretrained)
    tokenizer = open_clip.get_tokenizer(name, context_length=args.force_context_length)
    return model, preprocess_train, preprocess_val, tokenizer


def prepare_for_training(model: torch.nn.Module, args) -> None:
    """OpenCLIP's training-only model settings: tower locking and gradient checkpointing."""
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
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
