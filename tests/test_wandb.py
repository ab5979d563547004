"""--report-to wandb / all as OpenCLIP: the wandb run is named and identified by --name, has
--wandb-project-name and --wandb-notes, logs the same train/ and val/ metrics as metrics.jsonl and
results.jsonl at the same steps, and a resumed run continues the same wandb run. wandb runs in
offline mode; the offline run's .wandb file is read with wandb's own reader (`wandb leet inspect
--json`). Skipped when wandb (an optional extra, nsoclip[wandb]) is not installed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, in_process, read_jsonl, write_eval_data

from nsoclip import main

wandb = pytest.importorskip("wandb")


def records(run_folder: Path) -> list:
    """Every record of an offline wandb run, as wandb's reader prints them."""
    wandb_file, = run_folder.glob("run-*.wandb")
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                            capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def history(run_records, prefix):
    """{step: {key: value}} of the history rows' keys that start with `prefix`."""
    rows = {}
    for record in run_records:
        if record.get("type") == "history":
            item = record["history"]["item"]
            rows.setdefault(item["_step"], {}).update({k: v for k, v in item.items() if k.startswith(prefix)})
    return {step: values for step, values in rows.items() if values}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb in offline mode writing under tmp_path. wandb reads its environment once per process
    (its setup singleton), so the singleton is torn down around the test, as a fresh process has it."""
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "wandb"
    wandb.teardown()


def test_wandb_run_matches_the_run_folder_and_resume_continues_it(tmp_path, offline):
    files = write_eval_data(tmp_path / "data")
    common = ["--dataset-type", "synthetic", "--train-num-samples", 8, "--model", TINY, "--batch-size", 4,
              "--workers", 0, "--device", "cpu", "--precision", "fp32", "--logs", tmp_path / "logs", "--name", "wb",
              "--warmup", 1, "--log-every-n-steps", 1, "--report-to", "all", "--wandb-project-name", "nso-tests",
              "--wandb-notes", "first try", "--zeroshot-data", files["zeroshot"], "--zeroshot-classnames",
              files["classnames"], "--zeroshot-templates", files["templates"], "--zeroshot-frequency", 1]
    assert in_process(main.main, common + ["--epochs", 1]) == 0
    assert in_process(main.main, common + ["--epochs", 2, "--resume", "latest"]) == 0
    run_dir = tmp_path / "logs" / "wb"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # 'all' is tensorboard too
    first, second = sorted(offline.glob("offline-run-*-wb"))
    train = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    results = {r["step"]: r["kinds-zeroshot-val-top1"] for r in read_jsonl(run_dir / "results.jsonl")}
    first_records = records(first)
    for run_records, steps in ((first_records, [1, 2]), (records(second), [3, 4])):
        run, = [r["run"] for r in run_records if r.get("type") == "run"]
        assert (run["run_id"], run["display_name"], run["project"], run["notes"]) == ("wb", "wb", "nso-tests",
                                                                                       "first try")
        logged = history(run_records, "train/")
        assert sorted(logged) == steps
        assert [logged[s]["train/loss"] for s in steps] == pytest.approx([train[s] for s in steps], rel=1e-6)
        evaluated = {s: v["val/kinds-zeroshot-val-top1"] for s, v in history(run_records, "val/").items()}
        assert evaluated == {steps[-1]: pytest.approx(results[steps[-1]])}
    config, = [r["run"]["config"]["update"] for r in first_records if r.get("type") == "run"]
    assert config["opt"] == "adamw" and config["batch_size"] == 4 and "nso_sigma" not in config
