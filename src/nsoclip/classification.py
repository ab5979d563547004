"""Zero-shot classification on labelled image folders, sharded across ranks.

Labels come from a canonical class list, never from the order of the folders on disk: ImageNet
folders are WordNet ids placed by timm's ImageNet-1k synset order (ImageNet-A/R by timm's 200-id
lists), ImageNetV2 folders are the class numbers. A folder holding only some classes is therefore
scored against the full classifier, as it should be.

Every rank embeds a share of the class names and scores a disjoint share of the images; the
classifier columns are gathered and the hit counts summed, so the result does not depend on the
number of ranks.
"""
import logging
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import open_clip
import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from .distributed import World, all_gather_rows, all_reduce_sum, broadcast_object
from .loader import Loader, collate_readable
from .precision import autocast, input_dtype
from .errors import NsoclipError

# open_clip's build_zero_shot_classifier embeds this many classes per text forward; shares of the
# classifier are whole blocks of it, so every rank runs exactly the forwards one process would.
CLASSES_PER_BLOCK = 10
# What OpenCLIP's --imagenet-v2 names: the folder imagenetv2_pytorch's ImageNetV2Dataset(location=...)
# downloads into, which holds this set folder with the class folders 0..999.
IMAGENET_V2_FOLDER = "ImageNetV2-matched-frequency"


class ZeroShotError(NsoclipError, ValueError):
    """A zero-shot folder or class/template file that cannot be evaluated as asked."""


@dataclass
class ZeroShotSet:
    prefix: str                      # metric keys are f"{prefix}-zeroshot-val-top1" etc.
    flag: str                        # the flag that named the folder, for error messages
    root: str
    classnames: List[str]
    templates: Optional[List[str]]   # None: OpenAI's 80 ImageNet prompts (lambdas, so not sent between ranks)
    samples: List[Tuple[str, int]]   # (image path, class index), in folder then file-name order

    @property
    def prompts(self) -> Sequence[Union[str, Callable[[str], str]]]:
        return OPENAI_IMAGENET_TEMPLATES if self.templates is None else self.templates


def imagenet_synsets(subset: str) -> List[str]:
    """WordNet ids in label order: ImageNet-1k from ImageNetInfo, ImageNet-A/R from timm's
    200-id lists (which ImageNetInfo does not expose as subsets)."""
    if subset == "imagenet-1k":
        return list(ImageNetInfo("imagenet-1k").label_names())
    name = {"imagenet-a": "imagenet_a_synsets.txt", "imagenet-r": "imagenet_r_synsets.txt"}[subset]
    return pkgutil.get_data("timm.data", f"_info/{name}").decode().split()


def imagenet_classnames(synsets: Sequence[str]) -> List[str]:
    index = {synset: i for i, synset in enumerate(imagenet_synsets("imagenet-1k"))}
    return [IMAGENET_CLASSNAMES[index[synset]] for synset in synsets]


def read_lines(path: str, flag: str) -> List[str]:
    if not os.path.isfile(path):
        raise ZeroShotError(f"{flag} {path}: file not found")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ZeroShotError(f"{flag} {path}: file is empty")
    return lines


def read_templates(path: str) -> List[str]:
    templates = read_lines(path, "--zeroshot-templates")
    for number, template in enumerate(templates, 1):
        try:
            filled = template.format("CLASS")
        except (IndexError, KeyError, ValueError):
            filled = ""
        if "CLASS" not in filled:
            raise ZeroShotError(f"--zeroshot-templates {path}: line {number} {template!r} needs exactly "
                                "one '{}' where the class name goes (and no other braces)")
    return templates


def class_folders(root: str, flag: str) -> List[str]:
    if not os.path.isdir(root):
        raise ZeroShotError(f"{flag} {root}: folder not found")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise ZeroShotError(f"{flag} {root}: no class folders (expected one sub-folder per class)")
    return folders


def list_images(root: str, flag: str, label_of: dict) -> List[Tuple[str, int]]:
    """Every image file below each class folder (recursively, as torchvision's ImageFolder)."""
    samples = []
    for folder, label in sorted(label_of.items()):
        for directory, subdirs, files in os.walk(os.path.join(root, folder), followlinks=True):
            subdirs.sort()
            samples.extend((os.path.join(directory, name), label) for name in sorted(files)
                           if name.lower().endswith(IMG_EXTENSIONS))
    if not samples:
        raise ZeroShotError(f"{flag} {root}: no images found (extensions {', '.join(IMG_EXTENSIONS)})")
    return samples


def shown(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def synset_labels(root: str, flag: str, synsets: Sequence[str], subset: str) -> dict:
    index = {synset: i for i, synset in enumerate(synsets)}
    folders = class_folders(root, flag)
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ZeroShotError(f"{flag} {root}: folders {shown(unknown)} are not {subset} WordNet ids "
                            f"(expected names like {synsets[0]})")
    return {folder: index[folder] for folder in folders}


def numbered_labels(root: str, flag: str, num_classes: int) -> dict:
    folders = class_folders(root, flag)
    bad = [f for f in folders if not (f.isdigit() and int(f) < num_classes)]
    if bad:
        raise ZeroShotError(f"{flag} {root}: folders {shown(bad)} are not class numbers 0..{num_classes - 1}")
    return {folder: int(folder) for folder in folders}


def named_labels(root: str, flag: str, classnames: Sequence[str]) -> dict:
    """Folders named 0..N-1, or named like the class-name lines, or else exactly N folders
    matched to the lines in sorted order (torchvision's ImageFolder convention)."""
    folders = class_folders(root, flag)
    if all(f.isdigit() for f in folders):
        return numbered_labels(root, flag, len(classnames))
    lines = {name: i for i, name in enumerate(classnames)}
    if all(f in lines for f in folders):
        return {folder: lines[folder] for folder in folders}
    if len(folders) == len(classnames):
        return {folder: i for i, folder in enumerate(folders)}
    raise ZeroShotError(f"{flag} {root}: {len(folders)} class folders but {len(classnames)} class names; "
                        "name the folders 0..N-1 or like the class-name lines, or give one folder per line")


def imagenet_v2_root(location: str) -> str:
    """--imagenet-v2 as OpenCLIP means it, the parent of ImageNetV2-matched-frequency/; the set
    folder itself (class folders 0..999) is accepted too. Nothing is downloaded."""
    inner = os.path.join(location, IMAGENET_V2_FOLDER)
    if os.path.isdir(inner):
        return inner
    if os.path.isdir(location) and any(entry.is_dir() and entry.name.isdigit() for entry in os.scandir(location)):
        return location
    raise ZeroShotError(f"--imagenet-v2 {location}: expected {inner}/ with class folders 0..999 (OpenCLIP's "
                        "layout, as imagenetv2_pytorch downloads it) or those class folders themselves; "
                        "nsoclip does not download it")


def requested_sets(args) -> List[Tuple[str, str, str]]:
    """(prefix, flag, folder) for each zero-shot set named on the command line."""
    v2 = imagenet_v2_root(args.imagenet_v2) if args.imagenet_v2 else None
    sets = [("imagenet", "--imagenet-val", args.imagenet_val), ("imagenetv2", "--imagenet-v2", v2),
            ("imagenet-a", "--imagenet-a", args.imagenet_a), ("imagenet-r", "--imagenet-r", args.imagenet_r)]
    if args.zeroshot_data:
        sets.append((Path(os.path.abspath(args.zeroshot_data)).name, "--zeroshot-data", args.zeroshot_data))
    return [s for s in sets if s[2]]


def load_set(args, prefix: str, flag: str, root: str) -> ZeroShotSet:
    if flag == "--imagenet-val":
        synsets = imagenet_synsets("imagenet-1k")
        classnames, templates = list(IMAGENET_CLASSNAMES), None
        label_of = synset_labels(root, flag, synsets, "ImageNet-1k")
    elif flag == "--imagenet-v2":
        classnames, templates = list(IMAGENET_CLASSNAMES), None
        label_of = numbered_labels(root, flag, len(classnames))
    elif flag in ("--imagenet-a", "--imagenet-r"):
        synsets = imagenet_synsets(prefix)
        classnames, templates = imagenet_classnames(synsets), None
        label_of = synset_labels(root, flag, synsets, "ImageNet-A" if prefix == "imagenet-a" else "ImageNet-R")
    else:
        if not (args.zeroshot_classnames and args.zeroshot_templates):
            raise ZeroShotError("--zeroshot-data needs --zeroshot-classnames and --zeroshot-templates")
        classnames = read_lines(args.zeroshot_classnames, "--zeroshot-classnames")
        templates = read_templates(args.zeroshot_templates)
        label_of = named_labels(root, flag, classnames)
    return ZeroShotSet(prefix, flag, root, classnames, templates, list_images(root, flag, label_of))


def zero_shot_sets(args, world: World) -> List[ZeroShotSet]:
    """The sets named on `args`, checked and listed. Rank 0 lists them and broadcasts the lists,
    so all ranks shard the same list even when a shared file system lags; an error there is
    raised on every rank rather than leaving the others waiting."""
    sets, error = None, None
    if world.is_master:
        try:
            sets = [load_set(args, *requested) for requested in requested_sets(args)]
        except ZeroShotError as caught:
            error = str(caught)
    sets, error = broadcast_object((sets, error))
    if error:
        raise ZeroShotError(error)
    for zs in sets:
        logging.info("Zero-shot set %s: %d classes, %d images in %s", zs.prefix, len(zs.classnames), len(zs.samples),
                     zs.root)
    return sets


class ImageFiles(Dataset):
    """(image, label); an unreadable file gives None, so it is skipped (and counted by the caller)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform, flag: str):
        self.samples, self.transform, self.flag = samples, transform, flag

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logging.warning("%s: skipped unreadable image %s (%s)", self.flag, path, error)
            return None


def class_share(num_classes: int, rank: int, world_size: int) -> List[int]:
    """This rank's classes: whole blocks of CLASSES_PER_BLOCK, dealt round-robin."""
    starts = range(0, num_classes, CLASSES_PER_BLOCK)[rank::world_size]
    return [c for start in starts for c in range(start, min(start + CLASSES_PER_BLOCK, num_classes))]


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates, world: World, precision: str,
                         progress: bool = False) -> torch.Tensor:
    """open_clip's classifier (embed_dim x classes, float32), each rank embedding its share of
    the classes. Equal to one process's build_zero_shot_classifier bit for bit: every text
    forward sees the same block of class names."""
    share = class_share(len(classnames), world.rank, world.world_size)
    rows = torch.empty(0, 0, device=world.device)
    if share:
        with torch.no_grad(), autocast(precision, world.device):
            part = open_clip.build_zero_shot_classifier(
                model, tokenizer, [classnames[c] for c in share], templates,
                num_classes_per_batch=CLASSES_PER_BLOCK, device=world.device, use_tqdm=progress and world.is_master)
        rows = part.T.float()
    gathered, _ = all_gather_rows(rows)
    order = [c for rank in range(world.world_size) for c in class_share(len(classnames), rank, world.world_size)]
    classifier = torch.empty_like(gathered)
    classifier[torch.tensor(order, device=gathered.device)] = gathered
    return classifier.T


def run_zero_shot(model, zs: ZeroShotSet, tokenizer, preprocess, args, world: World,
                  progress: bool = False) -> dict:
    """Top-1/top-5 accuracy of `model` (in eval mode) on one set; the same dict on every rank."""
    classifier = zero_shot_classifier(model, tokenizer, zs.classnames, zs.prompts, world, args.precision, progress)
    shard = zs.samples[world.rank::world.world_size]
    loader = Loader(ImageFiles(shard, preprocess, zs.flag), batch_size=args.batch_size, workers=args.workers,
                    device=world.device, persistent=False, collate_fn=collate_readable)
    k = min(5, len(zs.classnames))
    top1 = top5 = scored = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"{zs.prefix} zero-shot", unit="batch",
                          disable=not (progress and world.is_master)):
            if batch is None:
                continue
            images, labels = batch
            images = images.to(world.device, dtype=input_dtype(args.precision), non_blocking=True)
            labels = labels.to(world.device, non_blocking=True)
            with autocast(args.precision, world.device):
                features = model.encode_image(images, normalize=True)
                logits = 100.0 * features @ classifier.to(features.dtype)
            hits = logits.topk(k, dim=1).indices == labels[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=1).sum())
            scored += len(labels)
    counts = all_reduce_sum(torch.tensor([top1, top5, scored, len(shard) - scored], device=world.device))
    top1, top5, scored, skipped = (int(c) for c in counts.tolist())
    if scored == 0:
        raise ZeroShotError(f"{zs.flag} {zs.root}: none of the {len(zs.samples)} images could be read")
    metrics = {f"{zs.prefix}-zeroshot-val-top1": top1 / scored, f"{zs.prefix}-zeroshot-val-top5": top5 / scored}
    if skipped:
        metrics[f"{zs.prefix}-zeroshot-val-skipped"] = skipped
    logging.info("%s: %d images scored, %d unreadable skipped, top-1 %.4f, top-5 %.4f",
                 zs.prefix, scored, skipped, top1 / scored, top5 / scored)
    return metrics
