"""Shared fixtures: the tiny model configs, one thread per test process, logging put back after
in-process CLI runs. Helpers live in helpers.py."""
import logging

import pytest
import torch

from helpers import CONFIGS

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_logging():
    """CLIs called in-process set up logging on streams pytest closes after the test: put the
    root logger back so later tests log to live streams."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def tiny_config() -> str:
    """A 2-layer ViT CLIP with OpenCLIP's tokenizer vocabulary: trains in seconds on CPU."""
    return str(CONFIGS / "tiny-vit.json")


@pytest.fixture
def micro_config() -> str:
    """A CLIP small enough (a few hundred parameters) for exact Hessians."""
    return str(CONFIGS / "micro-vit.json")

