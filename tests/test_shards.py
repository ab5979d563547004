"""The shard writer: its three inputs, --maxcount and sizes.json, --resize, and its errors."""
import io
import json
import tarfile

import torch
from PIL import Image

from helpers import run_cli
from nsoclip.distributed import World
from nsoclip.params import parse_args
from nsoclip.shards import main, write_shards
from nsoclip.wds import get_wds_dataset


def save_image(path, size=(12, 10), color=(200, 30, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def shard_contents(folder):
    """{shard name: [(member names, caption), ...]} read with plain tarfile."""
    contents = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        contents[shard.name] = [(sorted(n for n in members if n.startswith(k + ".")),
                                 members[k + ".txt"].decode()) for k in keys]
    return contents


def test_captioned_folder_with_maxcount_writes_sizes_json_and_reads_back(tmp_path):
    images = tmp_path / "images"
    for i in range(7):
        image = save_image(images / f"img{i}.{'png' if i % 2 else 'jpg'}", color=(i * 30, 0, 0))
        image.with_suffix(".txt").write_text(f"caption number {i}\n")
    save_image(images / "uncaptioned.jpg")
    assert main(["--images", str(images), "--output", str(tmp_path / "out"), "--maxcount", "3"]) == 0

    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    contents = shard_contents(tmp_path / "out")
    captions = [caption for shard in contents.values() for _, caption in shard]
    assert captions == [f"caption number {i}" for i in range(7)]
    first = contents["shard-000000.tar"][1][0]
    assert first == ["000000001.png", "000000001.txt"]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:  # stored bytes are the original file's
        assert tar.extractfile("000000001.png").read() == (images / "img1.png").read_bytes()

    args = parse_args(["--val-data", str(tmp_path / "out" / "shard-{000000..000002}.tar"), "--batch-size", "4",
                       "--workers", "0"])
    info = get_wds_dataset(args, lambda image: torch.tensor(image.getpixel((0, 0))[0]), lambda texts: texts,
                           is_train=False, epoch=0, world=World())
    assert info.num_samples == 7
    pairs = [(round(pixel.item() / 30), text)
             for pixels, texts in info.dataloader for pixel, text in zip(pixels, texts)]
    assert sorted(pairs) == [(i, f"caption number {i}") for i in range(7)]


def test_csv_uses_openclip_columns_and_relative_paths(tmp_path):
    for i in range(3):
        save_image(tmp_path / "pics" / f"{i}.jpg")
    (tmp_path / "train.csv").write_text("filepath\ttitle\n" + "".join(f"pics/{i}.jpg\ta dog {i}\n" for i in range(3)))
    assert main(["--csv", str(tmp_path / "train.csv"), "--output", str(tmp_path / "out")]) == 0
    contents = shard_contents(tmp_path / "out")
    assert [caption for _, caption in contents["shard-000000.tar"]] == ["a dog 0", "a dog 1", "a dog 2"]

    (tmp_path / "comma.csv").write_text("path,text\npics/0.jpg,first\n")
    assert main(["--csv", str(tmp_path / "comma.csv"), "--csv-separator", ",", "--csv-img-key", "path",
                 "--csv-caption-key", "text", "--output", str(tmp_path / "out2")]) == 0
    assert shard_contents(tmp_path / "out2")["shard-000000.tar"][0][1] == "first"


def test_imagefolder_captions_from_template_and_classnames(tmp_path):
    for name in ("golden_retriever", "tabby"):
        for i in range(2):
            save_image(tmp_path / "tree" / name / f"{i}.png")
    assert main(["--imagefolder", str(tmp_path / "tree"), "--output", str(tmp_path / "out"),
                 "--template", "a blurry photo of a {}."]) == 0
    captions = [c for _, c in shard_contents(tmp_path / "out")["shard-000000.tar"]]
    assert captions == ["a blurry photo of a golden retriever."] * 2 + ["a blurry photo of a tabby."] * 2

    (tmp_path / "names.txt").write_text("dog\ncat\n")
    assert main(["--imagefolder", str(tmp_path / "tree"), "--output", str(tmp_path / "out2"),
                 "--classnames", str(tmp_path / "names.txt")]) == 0
    captions = [c for _, c in shard_contents(tmp_path / "out2")["shard-000000.tar"]]
    assert captions == ["a photo of a dog."] * 2 + ["a photo of a cat."] * 2


def test_resize_shrinks_large_images_only_and_write_shards_skips_unreadable(tmp_path):
    large, small = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(large, format="JPEG")
    Image.new("RGB", (8, 6), (10, 20, 30)).save(small, format="PNG")
    samples = [(large.getvalue(), "large"), (b"no image at all", "broken"), (small.getvalue(), "small"),
               (Image.new("RGB", (40, 20)), "pil")]
    sizes, skipped = write_shards(samples, tmp_path / "out", maxcount=10, prefix="demo", resize=16)
    assert sizes == {"demo-000000.tar": 3} and skipped == 1
    with tarfile.open(tmp_path / "out" / "demo-000000.tar") as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert Image.open(io.BytesIO(stored["000000000.jpg"])).size == (21, 16)
    assert stored["000000001.png"] == small.getvalue()
    assert Image.open(io.BytesIO(stored["000000002.jpg"])).size == (32, 16)
    assert stored["000000002.txt"] == b"pil"


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    save_image(tmp_path / "pics" / "0.jpg")
    (tmp_path / "pics" / "0.txt").write_text("x")
    assert main(["--images", str(tmp_path / "pics"), "--output", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    cases = [
        (["--images", str(tmp_path / "pics"), "--output", str(tmp_path / "out")], "already holds"),
        (["--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o1")], "not a folder"),
        (["--imagefolder", str(tmp_path / "pics"), "--output", str(tmp_path / "o2"), "--template", "no slot"],
         "needs '{}'"),
    ]
    (tmp_path / "bad.csv").write_text("filepath\ttitle\nmissing.jpg\tcaption\n")
    cases.append((["--csv", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "o3")], "line 2: image missing.jpg"))
    (tmp_path / "cols.csv").write_text("image\tcaption\n")
    cases.append((["--csv", str(tmp_path / "cols.csv"), "--output", str(tmp_path / "o4")], "--csv-img-key 'filepath'"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_module_entry_point_exits_2_on_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-000000.tar").write_bytes(b"")
    failed = run_cli(["--images", tmp_path, "--output", tmp_path / "out"], module="nsoclip.shards", check=False)
    assert failed.returncode == 2 and failed.stderr.startswith("error: --output")
