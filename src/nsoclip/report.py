"""Comparison report over run folders: `python -m nsoclip.report RUN_DIR [RUN_DIR ...] --output DIR`.

Reads each run's results.jsonl, metrics.jsonl, zeroshot*.json, TensorBoard scalars, hessian*.json and
params.txt; writes report.md (tables, commands, settings) with PNG plots, among them the Hessian's
eigenvalue density (runs overlaid) and loss landscapes (runs side by side). It reads JSON only: no
torch at import. Every number that has a standard error is shown with it, and a difference between
two runs is called significant only when it exceeds two combined standard errors,
sqrt(se1^2 + se2^2): the report never names a winner the error bars do not support. The first run
is the baseline the others are compared to.

Runs that differ only in their seed are grouped (`nsoclip.seeds`): accuracy, loss and Hessian
trace as mean +- standard error across seeds, and differences between settings tested at the
seed level (Welch's t). Runs whose training FLOPs agree within 5% are marked compute-matched.
"""
import argparse
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .checks import command_line
from .errors import NsoclipError
from .layout import tower_of
from .seeds import group_by_setting, group_label, mean_and_stderr, welch

SIGNIFICANCE = 2.0  # standard errors a difference must exceed
ZEROSHOT_SUFFIX = "-zeroshot-val-top1"
TOWERS = ("visual", "text", "other")
COMPUTE_MATCH = 0.05  # relative difference of training FLOPs within which runs are compute-matched
# Shown for every run whatever differs; other params.txt entries only where the runs differ.
KEY_SETTINGS = ("model", "opt", "nso_sigma", "nso_num_perturbs", "nso_two_point", "nso_lam", "sam_rho",
                "batch_size", "lr", "wd", "warmup", "epochs", "precision", "seed", "train_num_samples")
NOT_SETTINGS = ("name",)


class ReportError(NsoclipError, ValueError):
    """A run folder or one of its files cannot be read; the CLI prints it as one line."""


@dataclass(frozen=True)
class Estimate:
    value: Optional[float]
    stderr: Optional[float] = None


@dataclass
class Run:
    name: str
    path: Path
    results: List[dict] = field(default_factory=list)
    metrics: List[dict] = field(default_factory=list)  # metrics.jsonl, one record per logged step
    scalars: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    hessian: Optional[dict] = None
    hessian_source: Optional[str] = None
    params: Dict[str, str] = field(default_factory=dict)


def number(value) -> Optional[float]:
    """A finite float, or None for anything else (missing, null, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Reading run folders

def read_results(path: Path) -> List[dict]:
    records = []
    if not path.is_file():
        return records
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}:{line_number}: not a JSON object")
        records.append(record)
    return records


def read_metrics(path: Path) -> List[dict]:
    """metrics.jsonl records by step; when a requeued run logs a step again, the later record wins."""
    by_step = {}
    for record in read_results(path):
        if number(record.get("step")) is not None:
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def read_scalars(tensorboard_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """All scalars of every event-file folder below tensorboard_dir, by tag, sorted by step. When a
    requeued run logs a step again, the value written last wins."""
    if not tensorboard_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    folders = sorted({event_file.parent for event_file in tensorboard_dir.rglob("events.out.tfevents*")})
    by_tag: Dict[str, Dict[int, float]] = {}
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            for event in accumulator.Scalars(tag):
                by_tag.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(values.items()) for tag, values in by_tag.items()}


def read_standalone_evaluations(run_dir: Path) -> List[dict]:
    """zeroshot*.json files (`nsoclip.zeroshot --output`, as scripts/zeroshot_imagenet.sh names them),
    oldest first. They count as later than results.jsonl: they evaluate checkpoints after training."""
    records = []
    for path in sorted(run_dir.glob("zeroshot*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: not valid JSON ({error.msg})") from None
        if not isinstance(metrics, dict):
            raise ReportError(f"{path}: expected a JSON object")
        records.append(metrics)
    return records


def read_hessian(run_dir: Path, results: List[dict]) -> Tuple[Optional[dict], Optional[str]]:
    """The newest hessian*.json of the run (written by `nsoclip.hessian --hessian-output`); else the
    last Hessian measured during training (--hessian-frequency) from results.jsonl."""
    files = sorted(run_dir.glob("hessian*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    if files:
        try:
            report = json.loads(files[-1].read_text())
        except json.JSONDecodeError as error:
            raise ReportError(f"{files[-1]}: not valid JSON ({error.msg})") from None
        if not isinstance(report, dict):
            raise ReportError(f"{files[-1]}: expected a JSON object")
        return report, files[-1].name
    for record in reversed(results):
        if "hessian/trace" in record:
            towers = {tower: record[f"hessian/trace_{tower}"] for tower in TOWERS
                      if f"hessian/trace_{tower}" in record}
            eigenvalue = record.get("hessian/top_eigenvalue")
            return ({"trace": record["hessian/trace"], "stderr": record.get("hessian/trace_stderr"),
                     "per_tower": towers, "top_eigenvalues": [] if eigenvalue is None else [eigenvalue]},
                    f"results.jsonl (epoch {record.get('epoch', '?')})")
    return None, None


def read_params(path: Path) -> Dict[str, str]:
    params = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, separator, value = line.partition(": ")
            if separator:
                params[name.strip()] = value.strip()
    return params


def load_run(path, name: str) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such run folder")
    results = read_results(path / "results.jsonl") + read_standalone_evaluations(path)
    hessian, source = read_hessian(path, results)
    run = Run(name=name, path=path, results=results, metrics=read_metrics(path / "metrics.jsonl"),
              scalars=read_scalars(path / "tensorboard"), hessian=hessian, hessian_source=source,
              params=read_params(path / "params.txt"))
    if not (run.results or run.metrics or run.scalars or run.hessian or run.params):
        raise ReportError(f"{path}: no results.jsonl, metrics.jsonl, tensorboard/ events, hessian*.json, "
                          "zeroshot*.json or params.txt")
    return run


def run_names(paths: Sequence[Path]) -> List[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [Path(p).name or str(p) for p in paths]
    return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]


# ---------------------------------------------------------------------------------------------
# Numbers

def last_result(run: Run, key: str) -> Optional[float]:
    for record in reversed(run.results):
        if key in record:
            return number(record[key])
    return None


def zeroshot_keys(runs: Sequence[Run]) -> List[str]:
    return sorted({key for run in runs for record in run.results for key in record if key.endswith(ZEROSHOT_SUFFIX)})


def final_scalar(run: Run, tag: str) -> Optional[float]:
    values = run.scalars.get(tag)
    return number(values[-1][1]) if values else None


def final_loss(run: Run) -> Optional[float]:
    """The last logged training loss: TensorBoard's train/loss, else metrics.jsonl's."""
    loss = final_scalar(run, "train/loss")
    if loss is None and run.metrics:
        loss = number(run.metrics[-1].get("loss"))
    return loss


def train_flops(run: Run) -> Optional[float]:
    """Cumulative training FLOPs at the last logged step (nsoclip.compute)."""
    return number(run.metrics[-1].get("train_flops")) if run.metrics else None


def compute_matched(runs: Sequence[Run]) -> Dict[str, List[str]]:
    """For each run, the runs of other settings whose training FLOPs are within COMPUTE_MATCH of its own."""
    setting = {runs[i].name: g for g, indices in enumerate(group_by_setting([run.params for run in runs]))
               for i in indices}
    flops = {run.name: train_flops(run) for run in runs}
    return {run.name: [other.name for other in runs
                       if setting[other.name] != setting[run.name] and flops[run.name] and flops[other.name]
                       and abs(flops[other.name] / flops[run.name] - 1) <= COMPUTE_MATCH]
            for run in runs}


def step_time(run: Run) -> Estimate:
    """Mean wall time per optimizer step over the logged windows, with its standard error. The
    first window (start-up, compilation, first data) is left out when three or more were logged."""
    values = [v for _, v in run.scalars.get("train/step_time", []) if number(v) is not None]
    if len(values) >= 3:
        values = values[1:]
    return mean_estimate(values)


def mean_estimate(values: Sequence[float]) -> Estimate:
    return Estimate(*mean_and_stderr(values))


def traces_with_errors(hessian: dict, key: str) -> Dict[str, Estimate]:
    """{group: Estimate} from `key` (floats, or dicts with trace/mean and stderr) and `key_stderr`."""
    groups = hessian.get(key)
    if not isinstance(groups, dict):
        return {}
    errors = hessian.get(f"{key}_stderr") if isinstance(hessian.get(f"{key}_stderr"), dict) else {}
    estimates = {}
    for group, entry in groups.items():
        if isinstance(entry, dict):
            value = entry.get("trace", entry.get("mean"))
            estimates[group] = Estimate(number(value), number(entry.get("stderr")))
        else:
            estimates[group] = Estimate(number(entry), number(errors.get(group)))
    return estimates


def tower_traces(hessian: dict) -> Dict[str, Estimate]:
    towers = traces_with_errors(hessian, "per_tower")
    if towers:
        return towers
    blocks = traces_with_errors(hessian, "per_block")
    if not blocks:
        return {}
    sums: Dict[str, float] = {}
    for block, estimate in blocks.items():
        if estimate.value is not None:
            sums[tower_of(block)] = sums.get(tower_of(block), 0.0) + estimate.value
    # Block estimates share their probes, so their errors are correlated: no standard error here.
    return {tower: Estimate(value) for tower, value in sums.items()}


def noise_stability(hessian: dict) -> Dict[str, Estimate]:
    """{sigma as text: Estimate} from a list of {"sigma", "mean", "stderr"} (nsoclip.hessian) or a
    mapping {sigma: {"mean", "stderr"}} / {sigma: value}."""
    entries = hessian.get("noise_stability")
    if isinstance(entries, list):
        pairs = [(entry.get("sigma"), entry) for entry in entries if isinstance(entry, dict)]
    elif isinstance(entries, dict):
        pairs = list(entries.items())
    else:
        return {}
    stability = {}
    for sigma, entry in pairs:
        try:
            label = f"{float(sigma):g}"
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict):
            stability[label] = Estimate(number(entry.get("mean")), number(entry.get("stderr")))
        else:
            stability[label] = Estimate(number(entry))
    return stability


def final_weights_loss(run: Run) -> Optional[float]:
    """L(w) at the checkpoint the Hessian was measured at (nsoclip.hessian's noise_stability
    records it): unlike the logged training loss, for NSO and SAM too the loss at w itself."""
    entries = (run.hessian or {}).get("noise_stability")
    if isinstance(entries, list):
        for entry in entries:
            if isinstance(entry, dict) and number(entry.get("loss")) is not None:
                return number(entry["loss"])
    return None


def extreme_eigenvalue(hessian: dict, key: str = "top_eigenvalues") -> Optional[float]:
    """The largest of `top_eigenvalues`, or the smallest of `bottom_eigenvalues`."""
    raw = hessian.get(key)
    eigenvalues = [number(v) for v in (raw if isinstance(raw, list) else [raw]) if number(v) is not None]
    if not eigenvalues:
        return None
    return min(eigenvalues) if key == "bottom_eigenvalues" else max(eigenvalues)


def numbers(values) -> Optional[List[float]]:
    """A non-empty list of finite numbers, else None."""
    if not isinstance(values, list) or not values:
        return None
    converted = [number(v) for v in values]
    return None if any(v is None for v in converted) else converted


def density_curve(hessian: dict) -> Optional[Tuple[List[float], List[float]]]:
    """(grid, density) of the SLQ density (`nsoclip.hessian --hessian-density`), if any."""
    density = hessian.get("density")
    if not isinstance(density, dict):
        return None
    grid, values = numbers(density.get("grid")), numbers(density.get("density"))
    return (grid, values) if grid and values and len(grid) == len(values) else None


def landscape_grid(hessian: dict, dims: int) -> Optional[dict]:
    """The `landscape` of a Hessian report when it is `dims`-dimensional and well formed."""
    landscape = hessian.get("landscape")
    if not isinstance(landscape, dict) or landscape.get("dims") != dims:
        return None
    coordinates = numbers(landscape.get("coordinates"))
    loss = landscape.get("loss")
    rows = [numbers(loss)] if dims == 1 else (loss if isinstance(loss, list) else [])
    rows = [numbers(row) for row in rows]
    if not coordinates or len(rows) != (1 if dims == 1 else len(coordinates)) \
            or any(row is None or len(row) != len(coordinates) for row in rows):
        return None
    return {"coordinates": coordinates, "loss": rows[0] if dims == 1 else rows,
            "directions": str(landscape.get("directions", "?"))}


def compare(what: str, baseline: str, base: Estimate, name: str, other: Estimate) -> str:
    """One line: the difference other - base with its combined standard error and the verdict of
    the two-standard-error rule."""
    head = f"{name} vs {baseline} {what} difference:"
    if base.value is None or other.value is None:
        return f"{head} n/a (missing in {baseline if base.value is None else name})"
    difference = other.value - base.value
    if base.stderr is None or other.stderr is None:
        return f"{head} {difference:+.3g} ± n/a (no error bar: not tested)"
    combined = math.hypot(base.stderr, other.stderr)
    if abs(difference) > SIGNIFICANCE * combined:
        verdict = f"significant: {name} is {'lower' if difference < 0 else 'higher'}"
    else:
        verdict = "not significant"
    return f"{head} {difference:+.3g} ± {combined:.2g} ({verdict})"


# ---------------------------------------------------------------------------------------------
# Formatting

def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def fmt_estimate(estimate: Estimate) -> str:
    if estimate.value is None:
        return "n/a"
    return f"{estimate.value:.4g} ± {'n/a' if estimate.stderr is None else f'{estimate.stderr:.2g}'}"


def fmt_percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas through Figure: no display, no pyplot global state)

def new_figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    return figure, figure.add_subplot()


def plot_curves(curves, path: Path, xlabel: str, ylabel: str, title: str, marker: str = ".") -> bool:
    """One line per (label, [(x, y), ...]); False (no file) when there is none."""
    curves = [(label, points) for label, points in curves if points]
    if not curves:
        return False
    figure, axes = new_figure()
    for label, points in curves:
        axes.plot([x for x, _ in points], [y for _, y in points], marker=marker, label=label)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return True


def loss_curve(run: Run, x: str) -> List[Tuple[float, float]]:
    """(step or cumulative FLOPs, training loss): TensorBoard's train/loss by step when logged,
    metrics.jsonl otherwise and for FLOPs."""
    if x == "step" and run.scalars.get("train/loss"):
        return run.scalars["train/loss"]
    key = "step" if x == "step" else "train_flops"
    return [(number(r[key]), number(r["loss"])) for r in run.metrics
            if number(r.get(key)) is not None and number(r.get("loss")) is not None]


def zeroshot_curves(runs: Sequence[Run], keys: Sequence[str], x: str):
    """(label, [(step or FLOPs at the evaluation, top-1 in %)]) per run and data set."""
    x_key = "step" if x == "step" else "train_flops"
    curves = []
    for run in runs:
        for key in keys:
            by_x = {number(r[x_key]): 100 * number(r[key]) for r in run.results
                    if number(r.get(key)) is not None and number(r.get(x_key)) is not None}
            label = run.name if len(keys) == 1 else f"{run.name}: {key[:-len(ZEROSHOT_SUFFIX)]}"
            curves.append((label, sorted(by_x.items())))
    return curves


def plot_training_loss(runs: Sequence[Run], path: Path, x: str = "step") -> bool:
    return plot_curves([(run.name, loss_curve(run, x)) for run in runs], path,
                       "optimizer step" if x == "step" else "training FLOPs (cumulative)",
                       "training loss (mean over ranks)", f"Training loss vs {'step' if x == 'step' else 'FLOPs'}")


def plot_zeroshot(runs: Sequence[Run], keys: Sequence[str], path: Path, x: str = "step") -> bool:
    return plot_curves(zeroshot_curves(runs, keys, x), path,
                       "optimizer step" if x == "step" else "training FLOPs (cumulative)", "zero-shot top-1 (%)",
                       f"Zero-shot accuracy vs {'step' if x == 'step' else 'FLOPs'}", marker="o")


def plot_hessian_blocks(runs: Sequence[Run], path: Path) -> bool:
    per_run = [(run.name, traces_with_errors(run.hessian, "per_block")) for run in runs if run.hessian]
    per_run = [(name, blocks) for name, blocks in per_run if blocks]
    if not per_run:
        return False
    # Visual tower first, then the text tower, then the rest (logit_scale), blocks in numeric order.
    blocks = sorted({block for _, estimates in per_run for block in estimates},
                    key=lambda b: (not b.startswith("visual"), b == "other", natural_key(b)))
    width = 0.8 / len(per_run)
    figure, axes = new_figure(width=max(7.0, 0.45 * len(blocks) * max(1, len(per_run) / 2)), height=4.5)
    for index, (name, estimates) in enumerate(per_run):
        positions = [b + (index - (len(per_run) - 1) / 2) * width for b in range(len(blocks))]
        values = [estimates.get(block, Estimate(None)).value for block in blocks]
        errors = [estimates.get(block, Estimate(None)).stderr for block in blocks]
        has_errors = any(e is not None for e in errors)
        axes.bar(positions, [v if v is not None else math.nan for v in values], width, capsize=2, label=name,
                 yerr=[e if e is not None else 0.0 for e in errors] if has_errors else None)
    axes.set_xticks(range(len(blocks)), blocks, rotation=60, ha="right", fontsize=8)
    axes.set(ylabel="Hessian trace of the block", title="Per-block Hessian trace (± standard error)")
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


def plot_density(runs: Sequence[Run], path: Path) -> bool:
    curves = [(run.name, density_curve(run.hessian)) for run in runs if run.hessian]
    curves = [(name, curve) for name, curve in curves if curve]
    if not curves:
        return False
    figure, axes = new_figure()
    for name, (grid, values) in curves:
        axes.plot(grid, values, label=name)
    peak = max(max(values) for _, (_, values) in curves)
    axes.set_yscale("log")
    # The broadened density falls to zero between and beyond the Ritz values: show six decades.
    axes.set_ylim(bottom=peak * 1e-6, top=peak * 2)
    axes.set(xlabel="Hessian eigenvalue", ylabel="density (log scale)",
             title="Hessian eigenvalue density (stochastic Lanczos quadrature)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return True


DIRECTION_LABELS = {"eigen": "along the top eigenvector{s} (parameter units)",
                    "random": "along filter-normalised random direction{s}"}


def plot_landscape(runs: Sequence[Run], dims: int, path: Path) -> bool:
    """One panel per run, side by side on shared axes: loss curves (1d) or contours at shared
    levels (2d), so the panels compare directly."""
    panels = [(run.name, landscape_grid(run.hessian, dims)) for run in runs if run.hessian]
    panels = [(name, grid) for name, grid in panels if grid]
    if not panels:
        return False
    from matplotlib.figure import Figure
    figure = Figure(figsize=(4.2 * len(panels) + 0.8, 4.0), dpi=100)
    grid_axes = figure.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    losses = [v for _, grid in panels for v in (grid["loss"] if dims == 1 else sum(grid["loss"], []))]
    levels = [min(losses) + (max(losses) - min(losses)) * i / 14 for i in range(15)] if max(losses) > min(losses) \
        else None
    for axes, (name, grid) in zip(grid_axes, panels):
        where = DIRECTION_LABELS.get(grid["directions"], "{s}").format(s="" if dims == 1 else "s")
        if dims == 1:
            axes.plot(grid["coordinates"], grid["loss"], marker=".")
            axes.set(xlabel=f"step {where}", ylabel="training loss")
            axes.grid(alpha=0.3)
        else:
            columns = [list(column) for column in zip(*grid["loss"])]  # rows over y for contour()
            drawn = axes.contour(grid["coordinates"], grid["coordinates"], columns, levels=levels)
            axes.clabel(drawn, fontsize=7)
            axes.plot([0.0], [0.0], "k+", markersize=10)  # w itself
            axes.set(xlabel=f"x {where}", ylabel="y")
        axes.set_title(name)
    figure.suptitle(f"Training loss {'on a line' if dims == 1 else 'on a plane'} through w")
    figure.tight_layout()
    figure.savefig(path)
    return True


# ---------------------------------------------------------------------------------------------
# The report

def summary_section(runs: Sequence[Run], keys: Sequence[str]) -> List[str]:
    has_val_loss = any(last_result(run, "clip_val_loss") is not None for run in runs)
    matched = compute_matched(runs)
    header = ["Run", *(f"{key[:-len(ZEROSHOT_SUFFIX)]} zero-shot top-1 (last)" for key in keys),
              "final training loss", "loss at the final weights", *(["clip val loss (last)"] if has_val_loss else []),
              "wall time per step (s)", "training FLOPs", "compute-matched with"]
    rows = []
    for run in runs:
        flops = train_flops(run)
        rows.append([run.name, *(fmt_percent(last_result(run, key)) for key in keys),
                     fmt(final_loss(run)), fmt(final_weights_loss(run)),
                     *([fmt(last_result(run, "clip_val_loss"))] if has_val_loss else []),
                     fmt_estimate(step_time(run)), fmt(flops),
                     "n/a" if flops is None else ", ".join(matched[run.name]) or "none"])
    if not keys:
        header.insert(1, "zero-shot top-1 (last)")
        for row in rows:
            row.insert(1, "n/a")
    return ["## Summary", "", *table(header, rows),
            "Zero-shot accuracy and losses are single evaluations without error bars; the report does not "
            "test their differences between single runs (see Seeds for runs repeated over seeds). The "
            "training loss is the loss each optimizer steps on: for NSO and SAM the mean loss at the "
            "perturbed weights, not the loss at w. The loss at the final weights is L(w) of the checkpoint on "
            "the Hessian's batches (from hessian*.json), the same quantity for every optimizer. Wall time per step: mean over the logged windows (the "
            "first left out when three or more) ± standard error. Training FLOPs: cumulative at the last "
            "logged step, measured with torch's FLOP counter (matrix products, convolutions, attention); "
            f"runs of other settings within {100 * COMPUTE_MATCH:g}% of each other's FLOPs are compute-matched.", ""]


def seed_groups(runs: Sequence[Run]) -> List[Tuple[str, List[Run]]]:
    """(label, runs) per setting: runs whose params.txt differ only in seed, name, logs, resume."""
    groups = [[runs[i] for i in indices] for indices in group_by_setting([run.params for run in runs])]
    return [(group_label([run.name for run in group]), group) for group in groups]


def seed_quantities(runs: Sequence[Run], keys: Sequence[str]):
    """(what, percent?, {run name: value}) for the quantities compared across seeds."""
    quantities = [(f"{key[:-len(ZEROSHOT_SUFFIX)]} zero-shot top-1", True, lambda run, key=key: last_result(run, key))
                  for key in keys]
    quantities += [("final training loss", False, final_loss),
                   ("Hessian trace", False, lambda run: number((run.hessian or {}).get("trace")))]
    return [(what, percent, {run.name: value(run) for run in runs}) for what, percent, value in quantities]


def fmt_seed_estimate(values: Sequence[float], percent: bool) -> str:
    mean, stderr = mean_and_stderr(values)
    if mean is None:
        return "n/a"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    error = "" if stderr is None else f" ± {scale * stderr:.2g}{unit}"
    return f"{scale * mean:.4g}{unit}{error} (n={len(values)})"


def seeds_section(runs: Sequence[Run], keys: Sequence[str]) -> List[str]:
    groups = seed_groups(runs)
    lines = ["## Seeds", "",
             "Runs that differ only in seed (their params.txt agree but for seed, name, logs and resume) form "
             "one setting: mean ± standard error across seeds (n = seeds with the value).", ""]
    if all(len(group) < 2 for _, group in groups):
        return lines + ["n/a (no two runs differ only in seed)", ""]
    quantities = seed_quantities(runs, keys)
    header = ["Setting", "runs", *(what for what, _, _ in quantities), "training FLOPs (mean)"]
    rows = []
    for label, group in groups:
        flops = [f for f in (train_flops(run) for run in group) if f is not None]
        rows.append([label, ", ".join(run.name for run in group),
                     *(fmt_seed_estimate([v for v in (values[run.name] for run in group) if v is not None], percent)
                       for _, percent, values in quantities),
                     fmt(mean_and_stderr(flops)[0])])
    lines += table(header, rows)
    base_label, base = groups[0]
    lines += ["### Seed-level comparisons", "",
              f"Each setting against `{base_label}`: difference of the means ± sqrt(se1² + se2²), with the "
              "standard errors across seeds; significant only when |difference| exceeds the two-sided 95% "
              "Student-t quantile (Welch-Satterthwaite degrees of freedom, rounded down) times that error: "
              "4.30 errors with 2 seeds per setting, 2.78 with 3. Settings with fewer than 2 seeds are not "
              "tested.", ""]
    if len(groups) < 2:
        return lines + ["n/a (one setting)", ""]
    for label, group in groups[1:]:
        for what, percent, values in quantities:
            base_values, values = [values[run.name] for run in base], [values[run.name] for run in group]
            lines.append(f"- {seed_comparison(what, percent, base_label, base_values, label, values)}")
    return lines + [""]


def seed_comparison(what: str, percent: bool, base_label: str, base: Sequence, label: str, other: Sequence) -> str:
    head = f"{label} vs {base_label} {what} difference:"
    base, other = [v for v in base if v is not None], [v for v in other if v is not None]
    if not base or not other:
        return f"{head} n/a (missing in {base_label if not base else label})"
    result = welch(base, other)
    if result is None:
        return f"{head} n/a (needs two seeds in both; {len(base)} and {len(other)})"
    scale, unit = (100.0, " points") if percent else (1.0, "")
    if not result.significant:
        verdict = "not significant" if result.stderr > 0 else "not tested: no seed-to-seed variation"
    else:
        verdict = f"significant: {label} is {'lower' if result.difference < 0 else 'higher'}"
    return (f"{head} {scale * result.difference:+.3g} ± {scale * result.stderr:.2g}{unit} "
            f"(threshold {scale * result.threshold:.3g}, {result.degrees_of_freedom:.2g} df; {verdict})")


def confound_lines(base: Run, run: Run) -> List[str]:
    """When two runs end at different losses, the flatter one may just be the less trained one."""
    base_loss, loss = final_weights_loss(base), final_weights_loss(run)
    if base_loss is None or loss is None or f"{base_loss:.4g}" == f"{loss:.4g}":
        return []
    less, more = (run, base) if loss > base_loss else (base, run)
    return [f"- loss at the final weights: {run.name} {loss:.4g} vs {base.name} {base_loss:.4g}: {less.name} is also "
            f"less trained than {more.name}. A less-fitted model can be flatter, so the flatness differences "
            "above do not separate flatness from fit."]


def flatness_section(runs: Sequence[Run]) -> List[str]:
    sigmas = sorted({s for run in runs if run.hessian for s in noise_stability(run.hessian)}, key=float)
    header = ["Run", "Hessian trace", *(f"{tower} trace" for tower in TOWERS), "top eigenvalue",
              "smallest eigenvalue", *(f"noise stability σ={s}" for s in sigmas), "source"]
    rows = []
    for run in runs:
        hessian = run.hessian or {}
        towers = tower_traces(hessian)
        stability = noise_stability(hessian)
        rows.append([run.name, fmt_estimate(Estimate(number(hessian.get("trace")), number(hessian.get("stderr")))),
                     *(fmt_estimate(towers.get(tower, Estimate(None))) for tower in TOWERS),
                     fmt(extreme_eigenvalue(hessian)), fmt(extreme_eigenvalue(hessian, "bottom_eigenvalues")),
                     *(fmt_estimate(stability.get(s, Estimate(None))) for s in sigmas),
                     run.hessian_source or "n/a"])
    return ["## Flatness", "", *table(header, rows),
            "Traces are Hutchinson/Hutch++ estimates ± standard error; noise stability is "
            "E[L(w+e)] - L(w), e ~ N(0, σ²I), ± standard error over draws. Tower traces summed from "
            "per-block traces carry no error bar (the blocks share probes).", ""]


def comparison_section(runs: Sequence[Run]) -> List[str]:
    lines = ["## Comparisons", "",
             f"Each run against the baseline `{runs[0].name}`: difference ± combined standard error "
             f"sqrt(se1² + se2²); significant only when |difference| > {SIGNIFICANCE:g} × combined standard error. "
             "These errors are those of each run's own estimates (Hutchinson probes, noise draws), not of the "
             "seed: a difference between two single runs need not survive a change of seed (see Seeds).", ""]
    if len(runs) < 2:
        return lines + ["n/a (one run)", ""]
    base = runs[0]
    base_hessian = base.hessian or {}
    for run in runs[1:]:
        hessian = run.hessian or {}
        pairs = [("Hessian trace", Estimate(number(base_hessian.get("trace")), number(base_hessian.get("stderr"))),
                  Estimate(number(hessian.get("trace")), number(hessian.get("stderr"))))]
        base_towers, towers = tower_traces(base_hessian), tower_traces(hessian)
        pairs += [(f"{tower} trace", base_towers[tower], towers[tower]) for tower in TOWERS
                  if tower in base_towers and tower in towers]
        base_stability, stability = noise_stability(base_hessian), noise_stability(hessian)
        pairs += [(f"noise stability (σ={s})", base_stability[s], stability[s])
                  for s in sorted(set(base_stability) & set(stability), key=float)]
        lines += [f"- {compare(what, base.name, a, run.name, b)}" for what, a, b in pairs]
        lines += confound_lines(base, run)
    return lines + ["", "Wall times per step are not compared: runs that took turns on a shared machine saw "
                        "different load; `python -m nsoclip.bench nso` measures the step-time ratio side by side.", ""]


def plots_section(output_dir: Path, runs: Sequence[Run], keys: Sequence[str]) -> List[str]:
    plots = [("Training loss vs step", "train_loss.png", lambda p: plot_training_loss(runs, p),
              "no train/loss scalars or metrics.jsonl losses"),
             ("Training loss vs FLOPs", "train_loss_flops.png", lambda p: plot_training_loss(runs, p, "flops"),
              "no metrics.jsonl records with train_flops"),
             ("Zero-shot accuracy vs step", "zeroshot_accuracy.png", lambda p: plot_zeroshot(runs, keys, p),
              "no *-zeroshot-val-top1 results"),
             ("Zero-shot accuracy vs FLOPs", "zeroshot_accuracy_flops.png",
              lambda p: plot_zeroshot(runs, keys, p, "flops"), "no *-zeroshot-val-top1 results with train_flops"),
             ("Per-block Hessian trace", "hessian_blocks.png", lambda p: plot_hessian_blocks(runs, p),
              "no per_block traces"),
             ("Hessian eigenvalue density", "hessian_density.png", lambda p: plot_density(runs, p),
              "no density"),
             ("Loss landscape, 1d", "landscape_1d.png", lambda p: plot_landscape(runs, 1, p),
              "no 1d landscape"),
             ("Loss landscape, 2d", "landscape_2d.png", lambda p: plot_landscape(runs, 2, p),
              "no 2d landscape")]
    lines = ["## Plots", ""]
    for title, filename, draw, missing in plots:
        path = output_dir / filename
        if draw(path):
            lines += [f"![{title}]({filename})", ""]
        else:
            path.unlink(missing_ok=True)
            lines += [f"{title}: n/a ({missing} in any run)", ""]
    return lines


def commands_section(commands) -> List[str]:
    if not commands:
        return []
    items = commands.items() if isinstance(commands, Mapping) else [(None, c) for c in commands]
    lines = ["## Commands", ""]
    for label, command in items:
        text = command if isinstance(command, str) else shlex.join(str(word) for word in command)
        if label is not None:
            lines.append(f"{label}:")
            lines.append("")
        lines += ["```bash", text, "```", ""]
    return lines


def settings_section(settings) -> List[str]:
    if not settings:
        return []
    return ["## Settings", "", *table(["setting", "value"], [[k, v] for k, v in settings.items()])]


def run_settings_section(runs: Sequence[Run]) -> List[str]:
    if not any(run.params for run in runs):
        return ["## Run settings (params.txt)", "", "n/a (no params.txt in any run)", ""]
    names = set().union(*(run.params for run in runs))
    differing = {n for n in names if len({run.params.get(n) for run in runs}) > 1}
    shown = [n for n in KEY_SETTINGS if n in names] + sorted(differing - set(KEY_SETTINGS) - set(NOT_SETTINGS))
    rows = [[n, *(run.params.get(n, "n/a") for run in runs)] for n in shown]
    return ["## Run settings (params.txt)", "",
            "The main settings, then every other one that differs between runs.", "",
            *table(["setting", *(run.name for run in runs)], rows)]


def write_report(run_dirs: Sequence, output_dir, commands=None, settings=None) -> Path:
    """Write output_dir/report.md and its PNG plots for these run folders (the first is the
    baseline of the comparisons); `commands` ({label: command} or a list; a command is a string
    or an argv list) and `settings` ({name: value}) are shown as given. Returns report.md's path."""
    if not run_dirs:
        raise ReportError("no run folders given")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(path, name) for path, name in zip(paths, run_names(paths))]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    keys = zeroshot_keys(runs)
    lines = ["# nsoclip comparison report", "",
             *(f"- `{run.name}`: {run.path}" for run in runs), "",
             *summary_section(runs, keys), *seeds_section(runs, keys), *flatness_section(runs),
             *comparison_section(runs),
             *plots_section(output_dir, runs, keys), *commands_section(commands), *settings_section(settings),
             *run_settings_section(runs)]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n")
    return report


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m nsoclip.report",
                    description="Compare runs: table with error bars, significance at two standard errors, plots.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="Run folders ({logs}/{name}); the first is the baseline of the comparisons.")
    parser.add_argument("--output", required=True, help="Folder for report.md and the PNG plots.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(command_line(argv))
    try:
        report = write_report(args.run_dirs, args.output)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
