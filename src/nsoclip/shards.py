"""Write (image, caption) webdataset shards for `--dataset-type webdataset`, with the sizes.json
that OpenCLIP and nsoclip read the epoch size from.

    python -m nsoclip.shards --images DIR --output OUT            # a.jpg + a.txt pairs
    python -m nsoclip.shards --csv train.csv --output OUT         # OpenCLIP's csv columns
    python -m nsoclip.shards --imagefolder DIR --output OUT       # class folders, captions from --template

Images are stored as they are (JPEG, PNG and WebP bytes untouched, other formats as PNG) unless
--resize asks to shrink them. Files PIL cannot identify are skipped and counted.
"""
import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import webdataset as wds
from PIL import Image

from .checks import command_line
from .cli import run_command
from .data import separator_hint
from .errors import NsoclipError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ShardError(NsoclipError, ValueError):
    """Inputs or output folder that cannot give shards; the CLI prints it as one line."""


def encode_image(image, resize=None):
    """(bytes, tar extension) for a PIL image, encoded image bytes or an image path; None when PIL
    cannot read it. With `resize`, a shorter side above `resize` pixels is shrunk to it."""
    if isinstance(image, Image.Image):
        opened, data, extension = image, None, "jpg"
    else:
        data = bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        try:
            opened = Image.open(io.BytesIO(data))
        except (OSError, SyntaxError):
            return None
        extension = STORED_FORMATS.get(opened.format, "png")
    shrink = resize is not None and min(opened.size) > resize
    if data is not None and opened.format in STORED_FORMATS and not shrink:
        return data, extension
    try:
        if shrink:
            scale = resize / min(opened.size)
            opened = opened.resize((max(1, round(opened.width * scale)), max(1, round(opened.height * scale))),
                                   Image.Resampling.BICUBIC)
        if extension == "jpg" and opened.mode != "RGB":
            opened = opened.convert("RGB")
        buffer = io.BytesIO()
        opened.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[extension], quality=95)
    except (OSError, ValueError, SyntaxError):
        return None
    return buffer.getvalue(), extension


def write_shards(samples, output_dir, maxcount: int = 1000, prefix: str = "shard", resize=None):
    """Write (image, caption) pairs into OUTPUT_DIR/PREFIX-000000.tar, ... and sizes.json.

    `image` is a PIL image (stored as JPEG), encoded image bytes or an image path. Returns
    (sizes {shard file name: samples}, number of skipped unreadable images)."""
    if maxcount < 1:
        raise ShardError(f"--maxcount {maxcount}: must be >= 1")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if any(output.glob(f"{prefix}-*.tar")):
        raise ShardError(f"--output {output} already holds {prefix}-*.tar shards: choose an empty folder")
    sizes, skipped, written = {}, 0, 0
    writer = None

    def record(path):
        sizes[os.path.basename(path)] = writer.count

    try:
        for image, caption in samples:
            encoded = encode_image(image, resize)
            if encoded is None:
                skipped += 1
                label = image if isinstance(image, (str, Path)) else f"sample {written + skipped - 1}"
                print(f"skipped unreadable image: {label}", file=sys.stderr)
                continue
            if writer is None:
                writer = wds.ShardWriter(str(output / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0,
                                         post=record, encoder=False, mtime=0)
            data, extension = encoded
            writer.write({"__key__": f"{written:09d}", extension: data, "txt": caption.encode("utf-8")})
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if written == 0:
        raise ShardError(f"no readable (image, caption) pair to write ({skipped} unreadable images skipped)")
    (output / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return sizes, skipped


def captioned_folder(folder):
    """(image path, caption) for every image with a same-stem .txt beside it, in path order."""
    root = Path(folder)
    if not root.is_dir():
        raise ShardError(f"--images {folder}: not a folder")
    for path in sorted(root.rglob("*")):
        caption_file = path.with_suffix(".txt")
        if path.suffix.lower() in IMAGE_SUFFIXES and caption_file.is_file():
            yield path, caption_file.read_text(encoding="utf-8").strip()


def csv_rows(csv_file, img_key: str, caption_key: str, separator: str):
    """(image path, caption) per row, as OpenCLIP's --csv-* flags read it. Relative image paths
    are taken from the current folder, as OpenCLIP does, or else from the csv file's folder."""
    path = Path(csv_file)
    if not path.is_file():
        raise ShardError(f"--csv {csv_file}: file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in (reader.fieldnames or []):
                raise ShardError(f"{flag} {key!r}: no such column in {csv_file} (columns: {reader.fieldnames})"
                                 f"{separator_hint(reader.fieldnames, separator)}")
        for line, row in enumerate(reader, start=2):
            image = Path(row[img_key])
            if not image.is_file() and not image.is_absolute() and (path.parent / image).is_file():
                image = path.parent / image
            if not image.is_file():
                raise ShardError(f"{csv_file} line {line}: image {row[img_key]} not found")
            yield image, row[caption_key]


def image_folder(folder, template: str, classnames_file=None):
    """(image path, caption) from an ImageFolder tree; the caption is the template filled with
    the class name (the folder name with '_' as spaces, or the matching line of --classnames)."""
    root = Path(folder)
    if not root.is_dir():
        raise ShardError(f"--imagefolder {folder}: not a folder")
    if "{}" not in template:
        raise ShardError(f"--template {template!r}: needs '{{}}' where the class name goes")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    names = [name.replace("_", " ") for name in classes]
    if classnames_file:
        lines = Path(classnames_file).read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip()]
        if len(names) != len(classes):
            raise ShardError(f"--classnames {classnames_file}: {len(names)} names for {len(classes)} class folders")
    for folder_name, name in zip(classes, names):
        for path in sorted((root / folder_name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                yield path, template.format(name)


def build_parser():
    parser = argparse.ArgumentParser(prog="nsoclip-shards", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="Folder of images, each with a same-stem .txt caption.")
    source.add_argument("--csv", help="CSV/TSV with image path and caption columns.")
    source.add_argument("--imagefolder", help="ImageFolder tree (one folder per class).")
    parser.add_argument("--output", required=True, help="Folder for the shards and sizes.json.")
    parser.add_argument("--maxcount", type=int, default=1000, help="Samples per shard.")
    parser.add_argument("--prefix", default="shard", help="Shard file names: PREFIX-000000.tar, ...")
    parser.add_argument("--resize", type=int, default=None, help="Shrink images so the shorter side is N pixels.")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--template", default="a photo of a {}.", help="Caption for --imagefolder; '{}' is the class.")
    parser.add_argument("--classnames", default=None,
                        help="Class names for --imagefolder, one per line, in sorted folder order.")
    return parser


def main(argv=None) -> int:
    argv = command_line(argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        if args.resize is not None and args.resize < 1:
            raise ShardError(f"--resize {args.resize}: must be >= 1")
        if args.images:
            samples = captioned_folder(args.images)
        elif args.csv:
            samples = csv_rows(args.csv, args.csv_img_key, args.csv_caption_key, args.csv_separator)
        else:
            samples = image_folder(args.imagefolder, args.template, args.classnames)
        try:
            sizes, skipped = write_shards(samples, args.output, args.maxcount, args.prefix, args.resize)
        except OSError as error:  # an input that vanished or cannot be read, an output that cannot be written
            raise ShardError(f"{error.filename or args.output}: {error.strerror or error}") from None
        print(f"wrote {sum(sizes.values())} samples in {len(sizes)} shards to {args.output}"
              + (f" ({skipped} unreadable images skipped)" if skipped else ""))
        return 0

    return run_command(body, argv)


if __name__ == "__main__":
    sys.exit(main())
