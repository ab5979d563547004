"""Bad input to the training, Hessian and zero-shot CLIs (docs/faults.md): each invocation ends
with exit 2 and exactly one `error:` line on stderr, no traceback, and no file that existed
before is changed. Checkpoints are loaded with weights_only=True: a file carrying pickled code
is refused without running it, and a bad checkpoint never half-loads into a model."""
import hashlib
import logging
import signal
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from helpers import CONFIGS

from nsoclip import hessian, main, zeroshot
from nsoclip.checkpoint import CheckpointError, latest_checkpoint, load_model_weights, save_checkpoint
from nsoclip.model import resolve_model_name

TINY = str(CONFIGS / "tiny-vit.json")


class CodeCarrier:
    """Unpickling this runs exec(): a stand-in for a checkpoint built to attack whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def tiny_state(config=TINY):
    torch.manual_seed(0)
    return open_clip.create_model(resolve_model_name(config), output_dict=True).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and data files, good and bad, shared by every case."""
    root = tmp_path_factory.mktemp("inputs")
    state = tiny_state()
    save_checkpoint({"state_dict": state, "step": 0}, root / "good.pt")
    good = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[:len(good) // 2])
    (root / "corrupt.pt").write_bytes(bytes(range(256)) * 64)
    (root / "text.pt").write_text("these are not weights\n")
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save({"note": "no weights here"}, root / "nostate.pt")
    save_checkpoint({"state_dict": tiny_state(str(CONFIGS / "micro-vit.json")), "step": 0}, root / "micro.pt")
    save_checkpoint({"state_dict": state, "step": 2, "epoch": 0, "batch": 2, "global_batch_size": 16},
                    root / "midepoch.pt")
    torch.save({"state_dict": state, "step": 5, "extra": CodeCarrier(root / "pwned")}, root / "code.pt")
    (root / "bad-config.json").write_text('{"embed_dim": 8}')
    for label in range(2):
        (root / "kinds" / str(label)).mkdir(parents=True)
        Image.new("RGB", (32, 32), (80 * label, 60, 90)).save(root / "kinds" / str(label) / "a.png")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "templates.txt").write_text("a photo of a {}.\n")
    return root


@pytest.fixture(autouse=True)
def restore_process_state():
    """The CLIs run in this process: put back the logging set-up and SIGTERM handler they install."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sigterm = signal.getsignal(signal.SIGTERM)
    yield
    root.handlers[:], root.level = handlers, level
    signal.signal(signal.SIGTERM, sigterm)


def snapshot(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def assert_one_error_line(code: int, err: str, message: str, only_line=True):
    """The training CLI logs to stdout, so its stderr is the error alone; the evaluation CLIs
    show progress and logs on stderr, and the error is their one `error:` line, the last."""
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert len(lines) == 1 or not only_line, err
    assert message in errors[0], errors[0]
    assert "Traceback" not in err


def train_flags(logs, *extra):
    return ["--dataset-type", "synthetic", "--train-num-samples", "16", "--model", TINY, "--batch-size", "8",
            "--epochs", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--logs", str(logs),
            "--name", "bad", *extra]


def without(argv, flag, count=2):
    index = argv.index(flag)
    return argv[:index] + argv[index + count:]


TRAINING_CASES = {
    # run names and folders
    "name-with-slash": (["--name", "a/b"], "--name 'a/b'"),
    "name-dotdot": (["--name", ".."], "--name '..'"),
    "name-absolute": (["--name", "/tmp/elsewhere"], "the run folder must stay inside --logs"),
    "name-backslash": (["--name", "a\\b"], "no path separators"),
    "existing-run-without-resume": (["--name", "earlier"], "already exists: pass --resume latest"),
    # checkpoints given to --resume / --pretrained
    "resume-missing": (["--resume", "{files}/absent.pt"], "absent.pt: file not found"),
    "resume-corrupt": (["--resume", "{files}/corrupt.pt"], "corrupt.pt: corrupt or truncated"),
    "resume-truncated": (["--resume", "{files}/truncated.pt"], "truncated.pt: corrupt or truncated"),
    "resume-other-model": (["--resume", "{files}/micro.pt"], "micro.pt does not match the model: missing:"),
    "resume-pickled-code": (["--resume", "{files}/code.pt"], "code.pt: refused, it is not a plain tensor checkpoint"),
    "resume-other-global-batch": (["--resume", "{files}/midepoch.pt"], "stopped mid-epoch with a global batch of 16"),
    "pretrained-missing": (["--pretrained", "{files}/absent.pt"], "--pretrained {files}/absent.pt: file not found"),
    "pretrained-tensor": (["--pretrained", "{files}/tensor.pt"], "expected a dict, found Tensor"),
    "pretrained-no-state-dict": (["--pretrained", "{files}/nostate.pt"], "holds no model state_dict"),
    "pretrained-text-file": (["--pretrained", "{files}/text.pt"], "text.pt: corrupt or truncated"),
    "pretrained-pickled-code": (["--pretrained", "{files}/code.pt"], "code.pt: refused"),
    "pretrained-other-model": (["--pretrained", "{files}/micro.pt"], "micro.pt does not match the model"),
    # out-of-range values and conflicting flags
    "epochs-zero": (["--epochs", "0"], "--epochs 0: must be >= 1"),
    "negative-lr": (["--lr", "-1"], "--lr -1.0: must be >= 0"),
    "zero-clip-norm": (["--grad-clip-norm", "0"], "--grad-clip-norm 0.0: must be > 0"),
    "negative-sigma": (["--opt", "nso", "--nso-sigma", "-0.1"], "--nso-sigma -0.1: must be >= 0"),
    "negative-rho": (["--opt", "sam", "--sam-rho", "-1"], "--sam-rho -1.0: must be >= 0"),
    "sigma-group-no-sigma": (["--opt", "nso", "--nso-sigma-groups", "visual"],
                             "--nso-sigma-groups 'visual': must be pattern=sigma"),
    "sigma-group-not-a-number": (["--opt", "nso", "--nso-sigma-groups", "visual=x"], "sigma 'x' is not a number"),
    "sigma-group-negative": (["--opt", "nso", "--nso-sigma-groups", "text=-1"], "'text': sigma -1.0: must be"),
    "sigma-group-twice": (["--opt", "nso", "--nso-sigma-groups", "text=0.1,text=0.2"], "'text' is given twice"),
    "sigma-group-matches-nothing": (["--opt", "nso", "--nso-sigma-groups", "visual=0.01,vision=0.02"],
                                    "--nso-sigma-groups 'visual=0.01,vision=0.02': sigma group 'vision' matches "
                                    "no trainable parameter"),
    "nso-every-zero": (["--opt", "nso", "--nso-every", "0"], "--nso-every 0: must be >= 1"),
    "noise-scale-unknown": (["--opt", "nso", "--nso-noise-scale", "row"], "argument --nso-noise-scale: invalid choice"),
    "max-nonfinite-zero": (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps 0: must be >= 1"),
    "cooldown-too-long": (["--lr-scheduler", "const-cooldown", "--epochs-cooldown", "5"],
                          "--epochs-cooldown 5: must be in [0, --epochs)"),
    "upsampling-without-resampling": (["--train-data-upsampling-factors", "1::2"], "needs --dataset-resampled"),
    "zeroshot-data-without-names": (["--zeroshot-data", "{files}/kinds"], "needs --zeroshot-classnames"),
    "dist-timeout-zero": (["--dist-timeout", "0"], "--dist-timeout 0.0: must be > 0 minutes"),
    "device-unknown": (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
    "accum-beyond-epoch": (["--accum-freq", "4"], "--accum-freq 4 exceeds the 2 batches per epoch"),
    "too-few-samples": (["--train-num-samples", "4"], "make no full global batch"),
    "precision-unknown": (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
    "batch-not-a-number": (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    "unknown-flag": (["--foo", "1"], "unrecognized arguments: --foo 1"),
    "unsupported-openclip-flag": (["--horovod"], "--horovod: Horovod is not supported; launch the same command"),
    # models and data
    "model-config-missing": (["--model", "{files}/absent.json"], "absent.json: config file not found"),
    "model-config-incomplete": (["--model", "{files}/bad-config.json"], "model config lacks vision_cfg, text_cfg"),
    "model-unknown": (["--model", "NoSuchNet"], "--model NoSuchNet: not an OpenCLIP model name"),
    "train-csv-missing": (["--dataset-type", "auto", "--train-data", "{files}/absent.csv"],
                          "absent.csv: file not found"),
    "train-data-unknown-format": (["--dataset-type", "auto", "--train-data", "{files}/data.parquet"],
                                  "cannot infer the dataset type"),
}


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_training_cli(case, files, tmp_path, capsys):
    extra, message = TRAINING_CASES[case]
    fill = lambda s: s.replace("{files}", str(files))  # noqa: E731
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "out.log").write_text("an earlier run\n")
    (earlier / "checkpoints" / "epoch_1.pt").write_bytes((files / "good.pt").read_bytes())
    before, inputs_before = snapshot(tmp_path), snapshot(files)
    argv = [fill(a) for a in train_flags(tmp_path, *extra)]
    if "--name" in extra:
        argv = without(argv, "--name")  # the first one, from train_flags
    code = main.main(argv)
    assert_one_error_line(code, capsys.readouterr().err, fill(message))
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in before} == before, "a file that existed before was changed"
    assert snapshot(files) == inputs_before
    assert not (files / "pwned").exists(), "the pickled code ran"
    if case.startswith("name-"):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"], "a run folder escaped or was made"


def test_training_cli_synthetic_without_sample_count(tmp_path, capsys):
    code = main.main(without(train_flags(tmp_path), "--train-num-samples"))
    assert_one_error_line(code, capsys.readouterr().err, "--dataset-type synthetic needs --train-num-samples")


def test_training_cli_with_nothing_to_do(tmp_path, capsys):
    code = main.main(without(train_flags(tmp_path), "--dataset-type"))
    assert_one_error_line(code, capsys.readouterr().err, "nothing to do")


def hessian_flags(*extra):
    return ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", "16", "--workers", "0",
            "--device", "cpu", "--batch-size", "4", "--hessian-num-batches", "1", "--hessian-probes", "1",
            "--hessian-top-k", "0", *extra]


HESSIAN_CASES = {
    "top-k-above-iterations": (["--hessian-top-k", "5", "--hessian-max-iter", "2"],
                               "--hessian-max-iter 2: must be >= --hessian-top-k"),
    "sigmas-not-numbers": (["--noise-stability-sigmas", "small,large"], "expected comma-separated numbers"),
    "tensorboard-without-logs": (["--report-to", "tensorboard"], "--report-to tensorboard needs --logs"),
    "zero-batches": (["--hessian-num-batches", "0"], "--hessian-num-batches 0: must be >= 1"),
    "zero-block": (["--hessian-block-size", "0"], "--hessian-block-size 0: must be >= 1"),
    "dist-timeout-negative": (["--dist-timeout", "-1"], "--dist-timeout -1.0: must be > 0 minutes"),
    "resume-missing": (["--resume", "{files}/absent.pt"], "absent.pt: file not found"),
    "resume-corrupt": (["--resume", "{files}/corrupt.pt"], "corrupt.pt: corrupt or truncated"),
    "resume-pickled-code": (["--resume", "{files}/code.pt"], "code.pt: refused"),
    "reference-other-model": (["--reference-checkpoint", "{files}/micro.pt"], "--reference-checkpoint lacks"),
    "bottom-k-above-iterations": (["--hessian-bottom-k", "5", "--hessian-max-iter", "2"],
                                  "--hessian-max-iter 2: must be >= --hessian-bottom-k"),
    "target-stderr-zero": (["--hessian-target-rel-stderr", "0"], "--hessian-target-rel-stderr 0.0: must be > 0"),
    "target-stderr-hutchpp": (["--hessian-target-rel-stderr", "0.1", "--hessian-method", "hutchpp"],
                              "only --hessian-method hutchinson stops at a precision"),
    "density-no-steps": (["--hessian-density-steps", "0"], "--hessian-density-steps 0: must be >= 1"),
    "nothing-to-save": (["--hessian-save-eigenvectors", "{files}/eig.pt"], "no eigenvectors to save"),
    "landscape-3d": (["--landscape", "3d"], "invalid choice: '3d'"),
    "landscape-one-point": (["--landscape", "1d", "--landscape-points", "1"], "--landscape-points 1: must be >= 2"),
    "landscape-eigen-without-eigenvectors": (["--landscape", "2d", "--landscape-directions", "eigen",
                                              "--hessian-top-k", "1"], "needs --hessian-top-k >= 2"),
}


@pytest.mark.parametrize("case", HESSIAN_CASES)
def test_hessian_cli(case, files, capsys):
    extra, message = HESSIAN_CASES[case]
    fill = lambda s: s.replace("{files}", str(files))  # noqa: E731
    code = hessian.main([fill(a) for a in hessian_flags(*extra)])
    assert_one_error_line(code, capsys.readouterr().err, fill(message), only_line=False)
    assert not (files / "pwned").exists()


def test_hessian_cli_without_data(capsys):
    code = hessian.main(without(hessian_flags(), "--dataset-type"))
    assert_one_error_line(code, capsys.readouterr().err, "no data: give --train-data", only_line=False)


def zeroshot_flags(files, *extra):
    return ["--model", TINY, "--precision", "fp32", "--device", "cpu", "--workers", "0",
            "--zeroshot-data", str(files / "kinds"), "--zeroshot-classnames", str(files / "classes.txt"),
            "--zeroshot-templates", str(files / "templates.txt"), *extra]


ZEROSHOT_CASES = {
    "pretrained-pickled-code": (["--pretrained", "{files}/code.pt"], "code.pt: refused"),
    "pretrained-truncated": (["--pretrained", "{files}/truncated.pt"], "truncated.pt: corrupt or truncated"),
    "pretrained-text-file": (["--pretrained", "{files}/text.pt"], "text.pt: corrupt or truncated"),
    "batch-size-zero": (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    "classnames-missing": (["--zeroshot-classnames", "{files}/absent.txt"], "absent.txt"),
    "val-csv-missing": (["--val-data", "{files}/absent.csv"], "absent.csv: file not found"),
    "imagenet-folder-missing": (["--imagenet-val", "{files}/no-imagenet"], "no-imagenet: folder not found"),
}


@pytest.mark.parametrize("case", ZEROSHOT_CASES)
def test_zeroshot_cli(case, files, tmp_path, capsys):
    extra, message = ZEROSHOT_CASES[case]
    fill = lambda s: s.replace("{files}", str(files))  # noqa: E731
    output = tmp_path / "metrics.json"
    output.write_text("{}\n")
    code = zeroshot.main([fill(a) for a in zeroshot_flags(files, *extra, "--output", str(output))])
    assert_one_error_line(code, capsys.readouterr().err, fill(message), only_line=False)
    assert output.read_text() == "{}\n", "the earlier metrics file was overwritten"
    assert not (files / "pwned").exists()


@pytest.mark.parametrize("name", ["truncated.pt", "corrupt.pt", "text.pt", "tensor.pt", "nostate.pt", "micro.pt",
                                  "code.pt", "half-matching"])
def test_bad_checkpoint_leaves_model_weights_unchanged(name, files, tmp_path):
    """Any failure is raised before the first tensor is copied: no partial load."""
    torch.manual_seed(1)
    model = open_clip.create_model(resolve_model_name(TINY), output_dict=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = files / name
    if name == "half-matching":  # right keys, one tensor of the wrong size: the others must not load either
        state = dict(tiny_state())
        state["positional_embedding"] = torch.zeros(3, 3)
        source = tmp_path / "half.pt"
        save_checkpoint({"state_dict": state}, source)
    with pytest.raises(CheckpointError) as error:
        load_model_weights(model, source)
    assert len(str(error.value).splitlines()) == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def test_pickled_code_is_refused_and_never_runs(files, tmp_path):
    """The crafted file is live (a full unpickler runs its code), yet our loader refuses it,
    --resume latest never picks it, and the marker file never appears."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "step_99.pt").write_bytes((files / "code.pt").read_bytes())
    save_checkpoint({"state_dict": tiny_state(), "step": 3}, checkpoints / "step_3.pt")
    assert latest_checkpoint(checkpoints) == checkpoints / "step_3.pt"
    with pytest.raises(CheckpointError, match="refused"):
        load_model_weights(open_clip.create_model(resolve_model_name(TINY)), files / "code.pt")
    assert not (files / "pwned").exists()
    torch.load(files / "code.pt", weights_only=False)  # the control: an unsafe load runs the payload
    assert (files / "pwned").read_text() == "code ran"
    (files / "pwned").unlink()
