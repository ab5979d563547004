"""--remote-sync through fsspec, on a local file:// target: the run folder's files appear there,
checkpoints through a temporary name, `checkpoints/latest.json` names the newest; `--resume
latest` with an empty local folder downloads that one and continues exactly as an uninterrupted
run; a local checkpoint newer than the remote one wins; bad targets are one line at start-up."""
import filecmp
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY, assert_same_weights, in_process, logged_losses, weights

from nsoclip import main
from nsoclip.checkpoint import save_checkpoint
from nsoclip.distributed import World
from nsoclip.remote import RemoteSync, fetch_latest


def flags(logs, name, *extra, epochs=1):
    return ["--dataset-type", "synthetic", "--train-num-samples", 8, "--model", TINY, "--batch-size", 4,
            "--epochs", epochs, "--workers", 0, "--device", "cpu", "--precision", "fp32", "--logs", logs,
            "--name", name, "--warmup", 1, "--lr-scheduler", "const", "--log-every-n-steps", 1, "--seed", 5, *extra]


def test_checkpoints_appear_remotely_and_resume_latest_fetches_the_newest(tmp_path):
    remote = tmp_path / "bucket"
    sync = ["--remote-sync", f"file://{remote}", "--remote-sync-protocol", "fsspec"]
    assert in_process(main.main, flags(tmp_path / "logs", "run", *sync, epochs=2)) == 0
    local, copy = tmp_path / "logs" / "run", remote / "run"
    for name in ("checkpoints/epoch_1.pt", "checkpoints/epoch_2.pt", "params.txt", "out.log", "metrics.jsonl"):
        assert filecmp.cmp(local / name, copy / name, shallow=False), name
    assert json.loads((copy / "checkpoints" / "latest.json").read_text()) == {"checkpoint": "epoch_2.pt", "step": 4}
    assert not [p for p in copy.rglob("*") if ".tmp-" in p.name]

    shutil.rmtree(local)  # a new machine: the run folder is gone, the remote copy is not
    assert in_process(main.main, flags(tmp_path / "logs", "run", *sync, "--resume", "latest", epochs=3)) == 0
    assert "Resumed from" in (local / "out.log").read_text()
    assert in_process(main.main, flags(tmp_path / "logs", "straight", epochs=3)) == 0
    assert logged_losses(local)[-2:] == pytest.approx(logged_losses(tmp_path / "logs" / "straight")[-2:], rel=1e-6)
    assert_same_weights(weights(local, "epoch_3.pt"), weights(tmp_path / "logs" / "straight", "epoch_3.pt"))
    assert filecmp.cmp(local / "checkpoints" / "epoch_3.pt", copy / "checkpoints" / "epoch_3.pt", shallow=False)


def test_sync_uploads_what_changed_and_mirrors_removed_checkpoints(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "checkpoints").mkdir(parents=True)
    (local / "out.log").write_text("one\n")
    save_checkpoint({"step": 3}, local / "checkpoints" / "step_3.pt")
    (local / "checkpoints" / ".step_9.pt.tmp-1").write_bytes(b"half a checkpoint")
    sync = RemoteSync(local, f"file://{remote}", "run", "fsspec", frequency=0.1)
    uploads = []
    put_file = sync.fs.put_file
    sync.fs.put_file = lambda source, target, **kw: (uploads.append(Path(source).name), put_file(source, target, **kw))
    sync.first_sync()
    assert sorted(uploads) == ["out.log", "step_3.pt"]
    assert not (remote / "run" / "checkpoints" / ".step_9.pt.tmp-1").exists()
    sync.sync()
    assert sorted(uploads) == ["out.log", "step_3.pt"]  # nothing changed, nothing sent
    (local / "out.log").write_text("one\ntwo\n")
    save_checkpoint({"step": 6}, local / "checkpoints" / "epoch_1.pt")
    (local / "checkpoints" / "step_3.pt").unlink()
    sync.start()  # the periodic thread picks the changes up
    deadline = time.monotonic() + 30
    while (remote / "run" / "checkpoints" / "step_3.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    sync.close()
    assert sorted(p.name for p in (remote / "run" / "checkpoints").iterdir()) == ["epoch_1.pt", "latest.json"]
    assert (remote / "run" / "out.log").read_text() == "one\ntwo\n"
    assert json.loads((remote / "run" / "checkpoints" / "latest.json").read_text())["step"] == 6


def test_a_newer_local_checkpoint_wins_over_the_remote_one(tmp_path):
    (tmp_path / "remote" / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "remote" / "run" / "checkpoints" / "latest.json").write_text('{"checkpoint": "epoch_1.pt", "step": 4}')
    url = f"file://{tmp_path / 'remote'}"
    assert fetch_latest(url, "run", "fsspec", tmp_path / "local", World(), local_step=8) is None
    save_checkpoint({"step": 4}, tmp_path / "remote" / "run" / "checkpoints" / "epoch_1.pt")
    fetched = fetch_latest(url, "run", "fsspec", tmp_path / "local", World(), local_step=2)
    assert fetched == tmp_path / "local" / "epoch_1.pt" and torch.load(fetched)["step"] == 4


@pytest.mark.parametrize("target,protocol,message", [
    ("/plain/folder", "s3", "--remote-sync-protocol s3 needs an s3:// URL"),
    ("nosuchprotocol://bucket/x", "fsspec", "--remote-sync nosuchprotocol://bucket/x:"),
])
def test_bad_remote_targets_are_one_line_before_anything_runs(tmp_path, capsys, target, protocol, message):
    code = in_process(main.main, flags(tmp_path, "run", "--remote-sync", target, "--remote-sync-protocol", protocol))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()
