"""Model creation: an OpenCLIP model name or a path to a model-config JSON in OpenCLIP's format,
optional weights from our checkpoints or OpenCLIP's, and OpenCLIP's tower locking."""
import json
import logging
from pathlib import Path

import open_clip
import torch

from .checkpoint import load_model_weights


class ModelError(ValueError):
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
    """(model, preprocess_train, preprocess_val, tokenizer) from the OpenCLIP flags on `args`.

    Weights from a local file go through our own loader, which accepts OpenCLIP's and our
    checkpoints (with or without the `module.` prefix) and names mismatched keys on failure.
    """
    name = resolve_model_name(args.model)
    pretrained = getattr(args, "pretrained", "") or ""
    looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if pretrained and not is_local_file(pretrained) and looks_like_path:
        raise ModelError(f"--pretrained {pretrained}: file not found")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name,
        pretrained=None if is_local_file(pretrained) else (pretrained or None),
        precision=args.precision,
        device=device,
        force_quick_gelu=getattr(args, "force_quick_gelu", False),
        force_custom_text=getattr(args, "force_custom_text", False),
        force_patch_dropout=getattr(args, "force_patch_dropout", None),
        force_image_size=getattr(args, "force_image_size", None),
        force_context_length=getattr(args, "force_context_length", None),
        image_mean=getattr(args, "image_mean", None),
        image_std=getattr(args, "image_std", None),
        image_interpolation=getattr(args, "image_interpolation", None),
        image_resize_mode=getattr(args, "image_resize_mode", None),
        aug_cfg=getattr(args, "aug_cfg", None) or None,
        cache_dir=getattr(args, "cache_dir", None),
        output_dict=True,
    )
    if is_local_file(pretrained):
        load_model_weights(model, pretrained, label="--pretrained")
        logging.info("Loaded weights from %s", pretrained)
    if getattr(args, "lock_image", False):
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if getattr(args, "lock_text", False):
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers,
                              freeze_layer_norm=args.lock_text_freeze_layer_norm)
    if getattr(args, "grad_checkpointing", False):
        model.set_grad_checkpointing()
    tokenizer = open_clip.get_tokenizer(name, context_length=getattr(args, "force_context_length", None))
    return model, preprocess_train, preprocess_val, tokenizer
