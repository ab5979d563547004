"""OpenCLIP 3.3's own CPU training tests (tests/test_training_simple.py of mlfoundations/open_clip
at v3.3.0), each command line unchanged under nsoclip.main: OpenCLIP's outcome is a finished run
with epoch_1.pt, and so is ours. test_training_mt5 is left out: its mt5-base text tower is
downloaded from the Hugging Face hub.

These are full-size models (RN50, ViT-B-32, coca_ViT-B-32: 100-250M parameters) at 224 px, about
2 minutes each on a 2-core CPU, so they run only with NSOCLIP_OPENCLIP_COMMANDS=1 (the issue 18
report gives the times of a run)."""
import os

import pytest

from helpers import in_process

from nsoclip import main
from nsoclip.checkpoint import load_checkpoint

COMMON = ["--save-frequency", "1", "--zeroshot-frequency", "1", "--dataset-type", "synthetic",
          "--train-num-samples", "16", "--warmup", "1", "--batch-size", "4", "--lr", "1e-3", "--wd", "0.1",
          "--epochs", "1", "--workers", "2"]
COMMANDS = {
    "test_training": ["--model", "RN50"],
    "test_training_coca": ["--model", "coca_ViT-B-32"],
    "test_training_unfreezing_vit": ["--model", "ViT-B-32", "--lock-image", "--lock-image-unlocked-groups", "5",
                                     "--accum-freq", "2"],
    "test_training_clip_with_jit": ["--model", "ViT-B-32", "--torchscript"],
}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NSOCLIP_OPENCLIP_COMMANDS") != "1",
                    reason="full-size models, minutes each on CPU: set NSOCLIP_OPENCLIP_COMMANDS=1")
@pytest.mark.parametrize("test", COMMANDS)
def test_openclip_cpu_training_command_runs_unchanged(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the commands write ./logs/<date-and-settings>/, as in OpenCLIP
    assert in_process(main.main, COMMON + COMMANDS[test]) == 0
    run_dir, = (tmp_path / "logs").iterdir()
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "epoch_1.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == (2 if "--accum-freq" in COMMANDS[test] else 4)
    assert "precision: fp32" in (run_dir / "params.txt").read_text()  # OpenCLIP's default amp, on a CPU
