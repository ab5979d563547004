"""The demo's data preparation (split, images, captions, shards, zero-shot tree), its output
folder rules and its stage runner's progress and failure reporting. The demo end to end is not
run here: its 8 torchrun jobs take several minutes even with 1 epoch (see docs/demo.md)."""
import argparse
import io
import json
import re
import string
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsoclip import demo
from nsoclip.shards import main as shards_main
from nsoclip.classification import load_set

TEST_SIZE = 300
SEED = 0


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The demo's image folders and shards, written once for the module."""
    output = tmp_path_factory.mktemp("demo")
    train_dir, num_train, zeroshot_dir, classnames, templates = demo.write_image_folders(output, 32, TEST_SIZE, SEED)
    shards = output / "shards"
    assert shards_main(demo.shard_flags(train_dir, shards, num_train, 4)) == 0
    return argparse.Namespace(output=output, train_dir=train_dir, num_train=num_train, zeroshot_dir=zeroshot_dir,
                              classnames=classnames, templates=templates, shards=shards)


def shard_samples(shards: Path):
    """{shard name: [(png bytes, caption), ...]} read back with plain tarfile."""
    contents = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        contents[shard.name] = [(members[f"{k}.png"], members[f"{k}.txt"].decode()) for k in keys]
    return contents


def label_of_caption(caption: str) -> int:
    for phrasing in demo.TRAIN_PHRASINGS:
        for label in range(10):
            if caption == phrasing.format(digit=label, word=demo.DIGIT_WORDS[label]):
                return label
    raise AssertionError(f"caption {caption!r} matches no training phrasing")


def sentence_shape(text: str) -> str:
    """The text with its class slot and punctuation removed: 'a photo of the number {}.' and
    'a photo of the number 7' have the same shape."""
    text = re.sub(r"\{\w*\}", "", text)
    return " ".join(text.translate(str.maketrans("", "", string.punctuation)).split())


def test_split_is_disjoint_stratified_and_fixed_by_the_seed():
    digits, train, test = demo.split_digits(TEST_SIZE, SEED)
    assert len(digits.target) == 1797
    assert len(test) == TEST_SIZE and len(train) == 1797 - TEST_SIZE
    assert not set(train) & set(test) and set(train) | set(test) == set(range(1797))
    assert set(Counter(digits.target[test]).values()) <= {29, 30, 31}
    again = demo.split_digits(TEST_SIZE, SEED)
    assert np.array_equal(again[1], train) and np.array_equal(again[2], test)
    assert not np.array_equal(demo.split_digits(TEST_SIZE, SEED + 1)[2], test)


def test_digit_image_is_upscaled_rgb_and_contrast_stretched():
    pixels = np.zeros((8, 8))
    pixels[2:6, 3] = 9.0
    image = demo.digit_image(pixels, 32)
    assert image.size == (32, 32) and image.mode == "RGB"
    array = np.asarray(image)
    assert array.min() == 0 and array.max() == 255
    assert np.array_equal(array[..., 0], array[..., 2])


def test_shards_hold_every_training_scan_with_its_caption(written):
    digits, train, _ = demo.split_digits(TEST_SIZE, SEED)
    contents = shard_samples(written.shards)
    assert len(contents) == 4 and written.num_train == len(train)
    assert sum(map(len, contents.values())) == len(train)
    # Every shard mixes all classes (a rank or worker never sees only some digits).
    for samples in contents.values():
        assert {label_of_caption(caption) for _, caption in samples} == set(range(10))
    # Each stored image is the demo's rendering of a training scan of the caption's class.
    expected = Counter()
    for index in train:
        rendered = np.asarray(demo.digit_image(digits.images[index], 32))
        expected[(rendered.tobytes(), int(digits.target[index]))] += 1
    stored = Counter()
    for samples in contents.values():
        for png, caption in samples:
            stored[(np.asarray(Image.open(io.BytesIO(png))).tobytes(), label_of_caption(caption))] += 1
    assert stored == expected


def test_captions_use_several_phrasings_with_numerals_and_words(written):
    captions = [caption for samples in shard_samples(written.shards).values() for _, caption in samples]
    shapes = Counter(sentence_shape(re.sub(r"\b(\d|" + "|".join(demo.DIGIT_WORDS) + r")\b", "{}", c))
                     for c in captions)
    assert len(shapes) == len(demo.TRAIN_PHRASINGS) >= 4
    assert min(shapes.values()) > len(captions) / len(demo.TRAIN_PHRASINGS) / 2
    assert any(re.search(r"\d", c) for c in captions) and any("seven" in c for c in captions)


def test_zero_shot_tree_holds_exactly_the_test_scans_and_templates_are_unseen(written):
    digits, train, test = demo.split_digits(TEST_SIZE, SEED)
    args = argparse.Namespace(zeroshot_classnames=str(written.classnames), zeroshot_templates=str(written.templates))
    zs = load_set(args, "digits", "--zeroshot-data", str(written.zeroshot_dir))
    assert zs.prefix == demo.ZEROSHOT_SET and zs.classnames == list(demo.DIGIT_WORDS)
    assert sorted(int(Path(path).stem) for path, _ in zs.samples) == sorted(test)
    assert all(label == digits.target[int(Path(path).stem)] for path, label in zs.samples)
    # No prompt has the sentence shape of a training caption, nor equals one once filled in.
    train_shapes = {sentence_shape(p) for p in demo.TRAIN_PHRASINGS}
    assert not {sentence_shape(t) for t in zs.templates} & train_shapes
    captions = {p.format(digit=d, word=w) for p in demo.TRAIN_PHRASINGS for d, w in enumerate(demo.DIGIT_WORDS)}
    assert not {t.format(name) for t in zs.templates for name in [*demo.DIGIT_WORDS, *map(str, range(10))]} & captions


def test_output_folder_from_an_earlier_demo_is_replaced_and_others_refused(tmp_path):
    demo.prepare_output(tmp_path / "out")
    (tmp_path / "out" / "old.txt").write_text("x")
    demo.prepare_output(tmp_path / "out")
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "logs").is_dir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(demo.OutputFolderError, match="not made by the demo"):
        demo.prepare_output(foreign)
    assert (foreign / "keep.txt").exists()
    assert demo.main(["--output", str(foreign / "keep.txt")]) == 2


def test_failed_stage_reports_its_command_and_output_tail(tmp_path):
    """The child's one-line `error:` stays in the message even when a long traceback follows it
    (as torchrun's does)."""
    command = [sys.executable, "-c", "import sys; print('loading'); print('error: --epochs 0: must be >= 1', "
               "flush=True); [print('traceback line', i) for i in range(100)]; sys.exit('boom: bad shard')"]
    with pytest.raises(demo.DemoError) as caught:
        demo.run_stage("failing stage", command, tmp_path / "stage.log", timeout=60)
    message = str(caught.value)
    assert "exited with status 1" in message and "sys.exit" in message and "boom: bad shard" in message
    assert message.endswith("error: --epochs 0: must be >= 1") and "traceback line 50" not in message
    assert "loading" in (tmp_path / "stage.log").read_text()


def test_hanging_stage_is_killed_at_its_timeout(tmp_path):
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    with pytest.raises(demo.DemoError, match="timed out after 1 s"):
        demo.run_stage("hanging stage", command, tmp_path / "stage.log", timeout=1)


def test_progress_lines_summarise_epochs_and_zero_shot(tmp_path):
    records = [{"epoch": 2, "step": 27, "batch": 5, "batches": 11, "loss": 4.5},
               {"epoch": 2, "step": 33, "batch": 11, "batches": 11, "loss": 4.4536}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "results.jsonl").write_text(json.dumps({"epoch": 3, "step": 33, "digits-zeroshot-val-top1": 0.34,
                                                        "digits-zeroshot-val-top5": 0.8}) + "\n")
    assert demo.epoch_lines(tmp_path) == ["    epoch 3: step 33, training loss 4.454",
                                          "    zero-shot top-1 on held-out digits: 34.0%"]
    hessian = ('{"trace": 4792.1, "stderr": 331.0, "num_hvps": 16, "top_eigenvalues": [957.0], '
               '"noise_stability": [{"sigma": 0.005, "mean": 0.0694, "stderr": 0.017, "loss": 2.8903}]}')
    assert demo.hessian_summary(json.loads(hessian)) == ("    Hessian trace 4792 ± 3.3e+02, top eigenvalue 957, "
                                           "noise stability (sigma 0.005) 0.0694, loss at the checkpoint 2.890")
    assert demo.hessian_summary({"trace": None, "stderr": None, "top_eigenvalues": []}) == \
        "    Hessian trace n/a ± n/a, top eigenvalue n/a"



def test_arms_seeds_and_flags_of_the_comparison(tmp_path):
    """Two training seeds per arm, run folders named so that the report groups them; the
    compute-matched AdamW arm on request; every Hessian on the data seed's batches."""
    args = demo.build_parser().parse_args([])
    assert args.seeds == [0, 1] and not args.compute_matched
    assert [(arm.name, arm.epochs) for arm in demo.arms(args)] == [("adamw", 12), ("nso", 12)]
    matched = demo.build_parser().parse_args(["--compute-matched", "--epochs", "3", "--seeds", "4,7,9"])
    assert [(arm.name, arm.epochs) for arm in demo.arms(matched)] == [("adamw", 3), ("nso", 3), ("adamw-2x-steps", 6)]
    assert matched.seeds == [4, 7, 9]
    for bad in ("0,x", "1,1"):
        with pytest.raises(SystemExit):
            demo.build_parser().parse_args(["--seeds", bad])
    data = demo.DemoData(train_pattern="shards/{0..3}.tar", num_train=1497, zeroshot_dir=tmp_path,
                         classnames=tmp_path / "c.txt", templates=tmp_path / "t.txt")
    arm = demo.arms(matched)[2]
    flags = [str(f) for f in demo.train_flags(matched, data, "demo.json", tmp_path, "adamw-2x-steps-seed7", arm, 7)]
    assert flags[flags.index("--seed") + 1] == "7" and flags[flags.index("--epochs") + 1] == "6"
    assert flags[flags.index("--save-frequency") + 1] == "6"
    hessian = [str(f) for f in demo.hessian_flags(matched, data, "demo.json", tmp_path / "run", 6)]
    assert hessian[hessian.index("--seed") + 1] == str(matched.seed)
    assert hessian[hessian.index("--resume") + 1].endswith("checkpoints/epoch_6.pt")
