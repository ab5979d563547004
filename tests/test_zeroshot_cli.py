"""`python -m nsoclip.zeroshot`: loads a DDP (`module.`-prefixed) checkpoint, agrees with the
in-process evaluation, gives the same JSON under torchrun, and fails with one line on bad input."""
import json
import logging
import random
import re

import pytest
import torch
from PIL import Image

from helpers import CONFIGS, model_args, run_cli
from nsoclip import zeroshot
from nsoclip.data import get_data
from nsoclip.distributed import World
from nsoclip.evaluate import evaluate
from nsoclip.model import create_model_and_transforms

TINY = str(CONFIGS / "tiny-vit.json")
CLASSNAMES = [f"kind {i}" for i in range(10)]


def tiny_model(seed):
    torch.manual_seed(seed)
    model, _, preprocess, tokenizer = create_model_and_transforms(
        model_args(TINY), torch.device("cpu"))
    return model.eval(), preprocess, tokenizer


def top1_predictions(model, preprocess, tokenizer, paths):
    import open_clip
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSNAMES, ["a photo of a {}."])
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        return (model.encode_image(images, normalize=True) @ classifier).argmax(dim=1).tolist()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A labelled folder on which the checkpoint's weights score top-1 = 1.0 (and other weights
    do not), a csv of captioned images, and the checkpoint saved as DDP would name its keys."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    paths = []
    for i in range(6):
        path = root / f"pool{i}.png"
        Image.frombytes("RGB", (36, 36), rng.randbytes(3 * 36 * 36)).save(path)
        paths.append(path)
    model, preprocess, tokenizer = tiny_model(seed=1)
    for i, (path, label) in enumerate(zip(paths, top1_predictions(model, preprocess, tokenizer, paths))):
        (root / "kinds" / str(label)).mkdir(parents=True, exist_ok=True)
        (root / "kinds" / str(label) / f"{i}.png").write_bytes(path.read_bytes())
    (root / "classes.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "templates.txt").write_text("a photo of a {}.\n")
    rows = [f"{p}\ta {['red', 'green', 'blue'][i % 3]} thing number {i}" for i, p in enumerate(paths)]
    (root / "val.csv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, root / "epoch_3.pt")
    return root


def cli_flags(root, *extra):
    return ["--model", TINY, "--pretrained", str(root / "epoch_3.pt"), "--precision", "fp32", "--device", "cpu",
            "--zeroshot-data", str(root / "kinds"), "--zeroshot-classnames", str(root / "classes.txt"),
            "--zeroshot-templates", str(root / "templates.txt"), "--val-data", str(root / "val.csv"),
            "--batch-size", "3", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def single_process_result(workspace):
    run_cli(cli_flags(workspace, "--output", str(workspace / "one.json")), module="nsoclip.zeroshot")
    return json.loads((workspace / "one.json").read_text())


def test_cli_loads_ddp_checkpoint_and_matches_in_process_evaluation(workspace, single_process_result):
    args = zeroshot.parse_args(cli_flags(workspace))
    model, _, preprocess, tokenizer = create_model_and_transforms(args, torch.device("cpu"))
    val_data = get_data(args, (None, preprocess), tokenizer, World())["val"]
    expected = evaluate(model, args, World(), tokenizer, preprocess, val_data)
    result = dict(single_process_result)
    assert result.pop("clip_val_loss") == pytest.approx(expected.pop("clip_val_loss"), rel=1e-6)
    assert result == expected
    assert result["kinds-zeroshot-val-top1"] == 1.0
    # Other weights score below 1.0 here, so the 1.0 above shows the checkpoint was loaded.
    other = evaluate(tiny_model(seed=0)[0], args, World(), tokenizer, preprocess)
    assert other["kinds-zeroshot-val-top1"] < 1.0


@pytest.mark.slow
def test_cli_under_torchrun_equals_single_process(workspace, single_process_result):
    run_cli(cli_flags(workspace, "--output", str(workspace / "two.json")), nproc=2, module="nsoclip.zeroshot")
    result = json.loads((workspace / "two.json").read_text())
    assert result.pop("clip_val_loss") == pytest.approx(single_process_result["clip_val_loss"], rel=1e-12)
    assert result == {k: v for k, v in single_process_result.items() if k != "clip_val_loss"}


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    result = run_cli(["--model", TINY, "--imagenet-val", str(tmp_path / "nowhere"), "--device", "cpu"],
                     module="nsoclip.zeroshot", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --imagenet-val {tmp_path / 'nowhere'}: folder not found"]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize("case, message", [
    ("nothing", "nothing to evaluate"),
    ("unknown-flag", "unrecognized arguments: --epochs"),
    ("train-data", "nsoclip-zeroshot does not train"),
    ("templates", "--zeroshot-templates .*templates-bad.txt: line 1 'a photo' needs exactly one '{}'"),
    ("missing-checkpoint", "--pretrained .*missing.pt: file not found"),
    ("mismatched-checkpoint", "--pretrained .*micro.pt does not match the model: missing: transformer.resblocks.1.*; "
                              "shape mismatch: ln_final.bias"),
    ("empty-folder", "--zeroshot-data .*empty: no class folders"),
])
def test_bad_input_in_process(workspace, tmp_path, capsys, restore_logging, case, message):
    (tmp_path / "templates-bad.txt").write_text("a photo\n")
    (tmp_path / "empty").mkdir()
    micro = create_model_and_transforms(
        model_args(str(CONFIGS / "micro-vit.json")), torch.device("cpu"))[0]
    torch.save({"state_dict": {f"module.{k}": v for k, v in micro.state_dict().items()}}, tmp_path / "micro.pt")
    base = ["--model", TINY, "--precision", "fp32", "--device", "cpu", "--workers", "0"]
    zeroshot_data = ["--zeroshot-data", str(workspace / "kinds"), "--zeroshot-classnames",
                     str(workspace / "classes.txt"), "--zeroshot-templates", str(workspace / "templates.txt")]
    argv = {
        "nothing": base,
        "unknown-flag": base + zeroshot_data + ["--epochs", "3"],
        "train-data": base + zeroshot_data + ["--train-data", "x.csv"],
        "templates": base + zeroshot_data[:4] + ["--zeroshot-templates", str(tmp_path / "templates-bad.txt")],
        "missing-checkpoint": base + zeroshot_data + ["--pretrained", str(tmp_path / "missing.pt")],
        "mismatched-checkpoint": base + zeroshot_data + ["--pretrained", str(tmp_path / "micro.pt")],
        "empty-folder": base + ["--zeroshot-data", str(tmp_path / "empty")] + zeroshot_data[2:],
    }[case]
    assert zeroshot.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.search(message, errors[0]), errors[0]
