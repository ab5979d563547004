"""Zero-shot classification: our top-1/top-5 against a direct open_clip computation, label
mapping through the canonical class lists, bad folders, and 2 ranks against 1."""
import dataclasses
import datetime
import pkgutil
import random
from argparse import Namespace
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from timm.data import ImageNetInfo

from helpers import CONFIGS, model_args, run_ranks
from nsoclip import classification
from nsoclip.loader import DataInfo
from nsoclip.distributed import World
from nsoclip.evaluate import evaluate
from nsoclip.model import create_model_and_transforms
from nsoclip.classification import ZeroShotError, class_share, run_zero_shot, zero_shot_classifier, zero_shot_sets

# Two prompts instead of OpenAI's 80 keep the 1000-class classifier cheap on CPU; that ImageNet
# sets do use the 80 is asserted separately.
SHORT_TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]
SYNSETS = ImageNetInfo("imagenet-1k").label_names()


def eval_args(**flags):
    args = dict(imagenet_val=None, imagenet_v2=None, imagenet_a=None, imagenet_r=None, zeroshot_data=None,
                zeroshot_classnames=None, zeroshot_templates=None, val_data=None,
                batch_size=3, workers=0, precision="fp32")
    args.update(flags)
    return Namespace(**args)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model, _, preprocess, tokenizer = create_model_and_transforms(
        model_args(str(CONFIGS / "tiny-vit.json")), torch.device("cpu"))
    return model.eval(), preprocess, tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def random_images(folder: Path, count: int, seed: int):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = (rng.randrange(24, 48), rng.randrange(24, 48))
        image = Image.frombytes("RGB", size, rng.randbytes(3 * size[0] * size[1]))
        paths.append(folder / f"img{i}.png")
        image.save(paths[-1])
    return paths


def direct_top5(tiny, classnames, templates, paths):
    """Top-5 class indices per image, straight from open_clip's classifier, one image at a time."""
    model, preprocess, tokenizer = tiny
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates)
        predictions = []
        for path in paths:
            features = model.encode_image(preprocess(Image.open(path).convert("RGB"))[None], normalize=True)
            predictions.append((100.0 * features @ classifier).topk(min(5, len(classnames)), dim=1).indices[0].tolist())
    return predictions


def labelled_folder(tiny, root: Path, classnames, templates, folder_name, num_images=9):
    """Images filed so that a third are top-1 hits, a third top-5-only hits and a third misses
    under the direct computation; returns the (top1, top5) that a correct scorer must report."""
    paths = random_images(root.parent / f"{root.name}-pool", num_images, seed=len(classnames))
    labels = []
    for i, predicted in enumerate(direct_top5(tiny, classnames, templates, paths)):
        if i % 3 == 0:
            labels.append(predicted[0])
        elif i % 3 == 1:
            labels.append(predicted[2])
        else:
            labels.append(next(c for c in range(len(classnames)) if c not in predicted))
    for i, (path, label) in enumerate(zip(paths, labels)):
        target = root / folder_name(label)
        target.mkdir(parents=True, exist_ok=True)
        path.rename(target / f"{i}.png")
    (root / folder_name(labels[0]) / "broken.jpg").write_bytes(b"not an image")
    return 3 / num_images, 6 / num_images


def test_imagenet_sets_use_openclip_classes_and_prompts(tmp_path):
    a_synsets = pkgutil.get_data("timm.data", "_info/imagenet_a_synsets.txt").decode().split()
    for synset in (SYNSETS[3], a_synsets[7]):
        random_images(tmp_path / "in" / synset, 1, seed=0)
    random_images(tmp_path / "a" / a_synsets[7], 1, seed=0)
    random_images(tmp_path / "v2" / "999", 1, seed=0)
    sets = zero_shot_sets(eval_args(imagenet_val=str(tmp_path / "in"), imagenet_v2=str(tmp_path / "v2"),
                                    imagenet_a=str(tmp_path / "a")), World())
    assert [s.prefix for s in sets] == ["imagenet", "imagenetv2", "imagenet-a"]
    for zs in sets:
        assert zs.prompts is OPENAI_IMAGENET_TEMPLATES
    assert sets[0].classnames == list(IMAGENET_CLASSNAMES)
    assert [label for _, label in sets[0].samples] == sorted([3, SYNSETS.index(a_synsets[7])])
    assert sets[1].samples[0][1] == 999
    assert sets[2].samples[0][1] == 7
    # ImageNet-A: timm's own index file says where each of its 200 classes sits in ImageNet-1k.
    a_indices = [int(i) for i in pkgutil.get_data("timm.data", "_info/imagenet_a_indices.txt").decode().split()]
    assert sets[2].classnames == [IMAGENET_CLASSNAMES[i] for i in a_indices]


@pytest.mark.parametrize("kind", ["imagenet-val", "imagenet-a", "imagenet-v2", "zeroshot-data"])
def test_accuracy_equals_direct_open_clip_computation(tiny, tmp_path, kind):
    root = tmp_path / "data"
    if kind == "imagenet-val":
        classnames, folder_name, flags = IMAGENET_CLASSNAMES, SYNSETS.__getitem__, dict(imagenet_val=str(root))
    elif kind == "imagenet-a":
        a_synsets = pkgutil.get_data("timm.data", "_info/imagenet_a_synsets.txt").decode().split()
        classnames = [IMAGENET_CLASSNAMES[SYNSETS.index(s)] for s in a_synsets]
        folder_name, flags = a_synsets.__getitem__, dict(imagenet_a=str(root))
    elif kind == "imagenet-v2":
        classnames, folder_name, flags = IMAGENET_CLASSNAMES, str, dict(imagenet_v2=str(root))
    else:
        classnames = [f"thing number {i}" for i in range(12)]
        (tmp_path / "classes.txt").write_text("\n".join(classnames) + "\n")
        (tmp_path / "templates.txt").write_text("\n".join(SHORT_TEMPLATES) + "\n")
        folder_name = classnames.__getitem__
        flags = dict(zeroshot_data=str(root), zeroshot_classnames=str(tmp_path / "classes.txt"),
                     zeroshot_templates=str(tmp_path / "templates.txt"))
    top1, top5 = labelled_folder(tiny, root, classnames, SHORT_TEMPLATES, folder_name)
    [zs] = zero_shot_sets(eval_args(**flags), World())
    zs = dataclasses.replace(zs, templates=SHORT_TEMPLATES)
    model, preprocess, tokenizer = tiny
    metrics = run_zero_shot(model, zs, tokenizer, preprocess, eval_args(), World())
    prefix = {"imagenet-val": "imagenet", "imagenet-a": "imagenet-a", "imagenet-v2": "imagenetv2",
              "zeroshot-data": "data"}[kind]
    assert metrics == {f"{prefix}-zeroshot-val-top1": top1, f"{prefix}-zeroshot-val-top5": top5,
                       f"{prefix}-zeroshot-val-skipped": 1}


def test_generic_folder_label_rules(tmp_path):
    (tmp_path / "classes.txt").write_text("zebra\napple\nmoon\n")
    (tmp_path / "templates.txt").write_text("a {}\n")
    files = dict(zeroshot_classnames=str(tmp_path / "classes.txt"), zeroshot_templates=str(tmp_path / "templates.txt"))
    layouts = {"numbered": (["2", "0"], [0, 2]), "named": (["moon", "apple"], [1, 2]),
               "sorted": (["a", "b", "c"], [0, 1, 2])}
    for name, (folders, labels) in layouts.items():
        for folder in folders:
            random_images(tmp_path / name / folder, 1, seed=0)
        [zs] = zero_shot_sets(eval_args(zeroshot_data=str(tmp_path / name), **files), World())
        assert zs.prefix == name
        assert sorted(label for _, label in zs.samples) == labels
    random_images(tmp_path / "odd" / "x", 1, seed=0)
    with pytest.raises(ZeroShotError, match="1 class folders but 3 class names"):
        zero_shot_sets(eval_args(zeroshot_data=str(tmp_path / "odd"), **files), World())


@pytest.mark.parametrize("problem, message", [
    ("missing", "--imagenet-val .*: folder not found"),
    ("no-folders", "no class folders"),
    ("no-images", "no images found"),
    ("not-wordnet", "folders 'cats' are not ImageNet-1k WordNet ids"),
    ("all-unreadable", "none of the 1 images could be read"),
])
def test_bad_imagenet_folder(tiny, tmp_path, problem, message):
    root = tmp_path / "val"
    if problem == "no-folders":
        root.mkdir()
    elif problem == "no-images":
        (root / SYNSETS[0]).mkdir(parents=True)
        (root / SYNSETS[0] / "notes.txt").write_text("no image here")
    elif problem == "not-wordnet":
        random_images(root / SYNSETS[0], 1, seed=0)
        random_images(root / "cats", 1, seed=0)
    elif problem == "all-unreadable":
        (root / SYNSETS[0]).mkdir(parents=True)
        (root / SYNSETS[0] / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ZeroShotError, match=message):
        [zs] = zero_shot_sets(eval_args(imagenet_val=str(root)), World())
        model, preprocess, tokenizer = tiny
        run_zero_shot(model, dataclasses.replace(zs, templates=["{}"]), tokenizer, preprocess, eval_args(), World())


@pytest.mark.parametrize("flags, message", [
    (dict(imagenet_v2="v2"), "folders '1000', 'abc' are not class numbers 0..999"),
    (dict(zeroshot_data="gen", zeroshot_templates="t.txt", zeroshot_classnames="c.txt"), "line 2 'a photo' needs"),
    (dict(zeroshot_data="gen", zeroshot_templates="missing.txt", zeroshot_classnames="c.txt"),
     "--zeroshot-templates .*missing.txt: file not found"),
    (dict(zeroshot_data="gen"), "--zeroshot-data needs --zeroshot-classnames and --zeroshot-templates"),
])
def test_bad_sets(tmp_path, flags, message):
    for folder in ("1000", "abc", "7"):
        random_images(tmp_path / "v2" / folder, 1, seed=0)
    random_images(tmp_path / "gen" / "0", 1, seed=0)
    (tmp_path / "t.txt").write_text("a {}\na photo\n")
    (tmp_path / "c.txt").write_text("dog\n")
    flags = {k: str(tmp_path / v) for k, v in flags.items()}
    with pytest.raises(ZeroShotError, match=message):
        zero_shot_sets(eval_args(**flags), World())


def test_class_shares_are_whole_blocks_covering_every_class_once():
    for num_classes, world_size in ((1000, 2), (200, 3), (4, 2), (25, 8)):
        shares = [class_share(num_classes, rank, world_size) for rank in range(world_size)]
        assert sorted(c for share in shares for c in share) == list(range(num_classes))
        for share in shares:
            blocks = {c // classification.CLASSES_PER_BLOCK for c in share}
            assert len(share) == sum(min(classification.CLASSES_PER_BLOCK, num_classes - b * classification.CLASSES_PER_BLOCK)
                                     for b in blocks)


# --- two gloo ranks against one process -------------------------------------------------------

def retrieval_batches(tokenizer, count=14, batch_size=4, seed=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    texts = tokenizer([f"a picture of item {i} in colour {i * 7 % 5}" for i in range(count)])
    return [(images[i:i + batch_size], texts[i:i + batch_size]) for i in range(0, count, batch_size)]


def distributed_worker(rank, world_size, port, folder, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        classification.OPENAI_IMAGENET_TEMPLATES = SHORT_TEMPLATES
        world = World(rank=rank, world_size=world_size)
        model, preprocess, tokenizer = tiny_model()
        model.load_state_dict(torch.load(Path(out_dir) / "weights.pt"))
        model.train()
        batches = retrieval_batches(tokenizer)[rank::world_size]
        metrics = evaluate(model, distributed_args(folder), world, tokenizer, preprocess,
                           val_data=DataInfo(batches, len(batches), 0))
        restored_training_mode = model.training
        classifier = zero_shot_classifier(model.eval(), tokenizer, IMAGENET_CLASSNAMES, SHORT_TEMPLATES, world, "fp32")
        torch.save({"metrics": metrics, "classifier": classifier, "training": restored_training_mode},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def distributed_args(folder):
    folder = Path(folder)
    return eval_args(imagenet_val=str(folder / "imagenet"), zeroshot_data=str(folder / "generic"),
                     zeroshot_classnames=str(folder / "classes.txt"), zeroshot_templates=str(folder / "templates.txt"))


@pytest.mark.slow
def test_two_processes_equal_one(tiny, tmp_path):
    for i, synset in enumerate((SYNSETS[1], SYNSETS[500], SYNSETS[998])):
        random_images(tmp_path / "imagenet" / synset, 5, seed=i)
    (tmp_path / "imagenet" / SYNSETS[500] / "broken.png").write_bytes(b"")
    for c in range(3):   # 3 classes: rank 1 embeds none of them (one block of 10 classes)
        random_images(tmp_path / "generic" / str(c), 3, seed=10 + c)
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "templates.txt").write_text("\n".join(SHORT_TEMPLATES) + "\n")
    model, preprocess, tokenizer = tiny
    torch.save(model.state_dict(), tmp_path / "weights.pt")

    run_ranks(distributed_worker, 2, str(tmp_path), str(tmp_path), timeout=240)

    zs_sets = [dataclasses.replace(zs, templates=zs.templates or SHORT_TEMPLATES)
               for zs in zero_shot_sets(distributed_args(tmp_path), World())]
    batches = retrieval_batches(tokenizer)
    single = evaluate(model, distributed_args(tmp_path), World(), tokenizer, preprocess,
                      val_data=DataInfo(batches, len(batches), 0), sets=zs_sets)
    direct_classifier = open_clip.build_zero_shot_classifier(model, tokenizer, IMAGENET_CLASSNAMES, SHORT_TEMPLATES)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["training"] is True
        loss = result["metrics"].pop("clip_val_loss")
        assert loss == pytest.approx(single["clip_val_loss"], rel=1e-12)
        assert result["metrics"] == {k: v for k, v in single.items() if k != "clip_val_loss"}
        assert torch.equal(result["classifier"], direct_classifier)
    assert single["imagenet-zeroshot-val-skipped"] == 1 and single["num_samples"] == 14
