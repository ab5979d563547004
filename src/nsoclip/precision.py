"""OpenCLIP's --precision modes: what runs under autocast, what dtype the inputs get, and
whether a GradScaler is needed (only fp16 autocast; bf16 has fp32's exponent range)."""
import contextlib

import torch

PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")


def autocast(precision: str, device: torch.device):
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision in ("amp_bf16", "amp_bfloat16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_dtype(precision: str):
    """Dtype of the image batch for modes whose weights are cast (pure/half modes)."""
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    return None


def grad_scaler(precision: str, device: torch.device):
    return torch.amp.GradScaler(device.type) if precision == "amp" else None
