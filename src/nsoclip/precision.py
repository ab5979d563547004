"""OpenCLIP's --precision modes: what runs under autocast, what dtype the inputs get, and
whether a GradScaler is needed (only fp16 autocast; bf16 has fp32's exponent range)."""
import contextlib
from typing import Optional

import torch

PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")


def default_precision(device: Optional[str]) -> str:
    """OpenCLIP's default, amp (fp16 autocast with a GradScaler), is a GPU setting: on a CPU fp16
    matrix products are emulated (slower than fp32, not faster) and the scaler skips steps for
    nothing, so a run left at the default there is fp32. `device` is --device (None: the GPU
    when there is one)."""
    on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
    return "amp" if on_gpu else "fp32"


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
