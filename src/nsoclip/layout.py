"""Where a parameter sits in an OpenCLIP model, from its name alone: its tower and its residual
block. The Hessian evaluator groups traces by them and the report reads those groups back, so
this module needs no torch."""
import re

TEXT_ROOTS = ("text", "transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers|layer)\.(\d+)\.")


def tower_of(name: str) -> str:
    """visual / text / other for OpenCLIP's CLIP and CustomTextCLIP parameter names."""
    if name.startswith("visual."):
        return "visual"
    return "text" if name.split(".")[0] in TEXT_ROOTS else "other"


def block_of(name: str) -> str:
    """'visual.blocks.3' for a parameter inside the visual tower's 4th transformer block,
    'visual.other' for the rest of that tower (embeddings, norms, projection), 'other' for
    logit_scale / logit_bias."""
    tower = tower_of(name)
    if tower == "other":
        return "other"
    match = BLOCK_INDEX.search(name)
    return f"{tower}.blocks.{match.group(1)}" if match else f"{tower}.other"
