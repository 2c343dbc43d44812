"""`cifar-cli report RUN_DIR`: plots and a Markdown summary of a finished run, from the files in its folder alone
(no W&B): loss and accuracy curves against epoch and training time from `metrics.csv`, the confusion matrices
and the most confident mistakes of the last validation and of the test, and `report.md` with the best metrics,
training time, checkpoints, per-class scores, key config values and links to the figures. It writes what the
folder allows, skipping what is missing, and every file whole or not at all; written again, it replaces the
earlier report, whose figures it no longer draws included.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cifar_cli.atomic import (
    atomic_write,
    atomic_write_text,
    missing_folders,
    refuse_unsafe_load,
    remove_empty_folders,
)
from cifar_cli.errors import UsageError
from cifar_cli.resume import settings_changed, written_by_a_run

HEADLINE = ("train_loss_epoch", "train_acc_epoch", "val_loss", "val_acc", "test_loss", "test_acc")
STAGES = ("val", "test")
# The figures a report draws, by file name (without .png).
FIGURES = ("loss", "accuracy", *(f"{kind}_{stage}" for stage in STAGES for kind in ("confusion", "mistakes")))
DPI = 110
# Beyond these class counts the cell counts, then the class names, would overlap into a grey smear.
ANNOTATED_CLASSES = 20
LABELLED_CLASSES = 40
GRID_COLUMNS = 8
CAPTION_CHARS = 13  # a longer class name would spill into the neighbouring caption
CONFIG_KEYS = (
    ("model.net.class_path", ("model", "net", "class_path")),
    ("model.learning_rate", ("model", "learning_rate")),
    ("model.optimizer.class_path", ("model", "optimizer", "class_path")),
    ("data.class_path", ("data", "class_path")),
    ("data.batch_size", ("data", "init_args", "batch_size")),
    ("data.batch_size", ("data", "batch_size")),
    ("trainer.max_epochs", ("trainer", "max_epochs")),
    ("trainer.precision", ("trainer", "precision")),
    ("seed_everything", ("seed_everything",)),
)

Rows = list[dict[str, float]]


def read_metrics(path: Path) -> Rows:
    """The rows of a CSVLogger `metrics.csv`, each holding only its filled cells, as floats."""
    hint = "pass the folder of a run written by `cifar-cli fit` or `cifar-cli test`"
    try:
        with open(path, newline="") as file:
            rows = [
                # A diverged step logs nan, which would poison every min and max below.
                {key: number for key, cell in row.items() if key and cell and not math.isnan(number := float(cell))}
                for row in csv.DictReader(file)
            ]
    except FileNotFoundError:
        config = path.parent / "config.yaml"
        if written_by_a_run(str(config)):
            # A run's own folder: the run is in its first steps, or stopped within them (the hint said to pass the
            # folder of a run, which this is).
            hint = "the run has logged nothing yet (it is in its first steps, or stopped within them)"
        if (path.parent / "predictions.csv").is_file():
            # `predict` writes a run folder of its own, with no metrics.csv ever: not a run in its first steps.
            hint = "it is the folder of a `predict`, which logs no metrics: its output is predictions.csv"
        with contextlib.suppress(OSError, UnicodeDecodeError, yaml.YAMLError, LookupError, TypeError, AttributeError):
            # The folder of a run with `--trainer.logger false` (default_root_dir): its config.yaml, no metrics.
            if yaml.safe_load(config.read_text())["trainer"].get("logger") is False:
                hint = "a run with --trainer.logger false logs none: train with the default logger or CSVLogger"
        raise UsageError(f"{path.parent}: no metrics.csv in this folder; {hint}") from None
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as err:
        raise UsageError(f"{path}: unreadable ({err}); {hint}") from None
    if not any(rows):
        raise UsageError(f"{path} holds no metrics: the run logged nothing; pass a run that ended an epoch or a test")
    return rows


def per_epoch(
    rows: Rows, column: str, pick: Callable[[list[float]], float] = lambda values: values[-1]
) -> dict[int, float]:
    """`{epoch: value}` of `column`, reducing the values of the rows of one epoch with `pick` (the last, by
    default). Epochs count from 1, as every line cifar-cli prints does (metrics.csv, like the checkpoint names,
    counts from 0). Rows without an epoch (the learning-rate monitor's) are left out."""
    values: dict[int, list[float]] = {}
    for row in rows:
        if column in row and "epoch" in row:
            values.setdefault(int(row["epoch"]) + 1, []).append(row[column])
    return {epoch: pick(found) for epoch, found in sorted(values.items())}


def validations(rows: Rows, column: str) -> list[tuple[float, float, float | None]]:
    """`(epoch, value, fit_time)` of every row holding `column`, the epoch counted from 1 as `per_epoch` counts it,
    and a fraction of it where an epoch validated several times (`--trainer.val_check_interval 0.5`: 0.5, 1, 1.5,
    ...); fit_time None where the row has none.

    The fraction is the share of the epoch's steps done, where the steps of the epoch's end are known (its training
    metrics' row, and the previous epoch's): `--trainer.val_check_interval 7` in an epoch of 20 steps validates
    at 0.35 and 0.7, not 0.5 and 1. Else the epoch's validations are taken as evenly spaced."""
    by_epoch: dict[int, list[dict[str, float]]] = {}
    ends: dict[int, float] = {}  # the logged step of each epoch's last training step
    for row in rows:
        if "epoch" in row and "step" in row and any(key.endswith("_epoch") for key in row):
            ends[int(row["epoch"]) + 1] = row["step"]
        if column in row and "epoch" in row:
            by_epoch.setdefault(int(row["epoch"]) + 1, []).append(row)

    def position(epoch: int, i: int, found: list[dict[str, float]]) -> float:
        start, end, step = ends.get(epoch - 1, -1.0 if epoch == 1 else None), ends.get(epoch), found[i - 1].get("step")
        if start is None or end is None or step is None or not start < step <= end:
            return epoch - 1 + i / len(found)
        return epoch - 1 + (step - start) / (end - start)

    return [
        (position(epoch, i, found), row[column], row.get("fit_time"))
        for epoch, found in sorted(by_epoch.items())
        for i, row in enumerate(found, 1)
    ]


def last_value(rows: Rows, column: str) -> float | None:
    return next((row[column] for row in reversed(rows) if column in row), None)


def time_unit(seconds: float) -> tuple[float, str]:
    return (1.0, "s") if seconds < 120 else (60.0, "min") if seconds < 7200 else (3600.0, "h")


def plot_curves(rows: Rows, metric: str) -> Figure | None:
    """Train and val `metric` ("loss" or "acc") against epoch and, where `fit_time` was logged, against training
    time; the test value as a dashed line. None when there is no train or val curve (a test-only run)."""
    name = {"loss": "loss", "acc": "accuracy"}[metric]
    # Every validation, also where an epoch has several (at its own fit_time); the training metric at epoch ends.
    val = validations(rows, f"val_{metric}")
    lines = {"train": per_epoch(rows, f"train_{metric}_epoch"), "val": {x: v for x, v, _ in val}}
    lines = {label: line for label, line in lines.items() if line}
    if not lines:
        return None
    times = per_epoch(rows, "fit_time", max)
    timed = {
        "train": {times[e]: v for e, v in lines.get("train", {}).items() if e in times},
        "val": {t: v for _, v, t in val if t is not None},
    }
    timed = {label: line for label, line in timed.items() if line}
    fig = Figure(figsize=(10, 4) if timed else (5.5, 4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2 if timed else 1, squeeze=False)[0]
    scale, unit = time_unit(max(times.values())) if timed else (1.0, "")
    test = last_value(rows, f"test_{metric}")
    for ax, panel in zip(axes, [lines, timed]):
        for label, line in panel.items():
            ax.plot([x / (1 if ax is axes[0] else scale) for x in line], list(line.values()), marker="o", label=label)
        if test is not None:
            ax.axhline(test, linestyle="--", color="tab:red", label=f"test {test:.4f}")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("epoch")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = [epoch for line in lines.values() for epoch in line]
    if min(epochs) == max(epochs):  # one epoch: without a range, the epoch axis gets fractional ticks
        axes[0].set_xlim(epochs[0] - 1, epochs[0] + 1)
    axes[0].legend()
    if timed:
        axes[1].set_xlabel(f"training time ({unit})")
        axes[1].set_xlim(left=0)
    fig.suptitle(f"{name.capitalize()}")
    return fig


def read_confusion(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as file:
        table = [row for row in csv.reader(file) if row]
    names = table[0][1:]
    matrix = np.array([[int(float(cell)) for cell in row[1:]] for row in table[1:]], dtype=np.int64)
    if not names or matrix.shape != (len(names), len(names)):
        raise ValueError(f"expected {len(names)} rows of {len(names)} counts after the header")
    return names, matrix


def plot_confusion(names: list[str], matrix: np.ndarray, title: str) -> Figure:
    """A heatmap coloured by the share of each true class, with the counts written in the cells."""
    n = len(names)
    side = 8.0 if n > LABELLED_CLASSES else min(max(4.5, 0.45 * n + 2.5), 11.0)
    fig = Figure(figsize=(side + 1, side), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= LABELLED_CLASSES:
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), names)
    if n <= ANNOTATED_CLASSES:
        for (i, j), count in np.ndenumerate(matrix):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8 if n <= 12 else 6, color=color)
    ax.set_xlabel("predicted class" + ("" if n <= LABELLED_CLASSES else " (index)"))
    ax.set_ylabel("true class" + ("" if n <= LABELLED_CLASSES else " (index)"))
    total = int(matrix.sum())
    accuracy = f": accuracy {np.trace(matrix) / total:.2%} of {total} images" if total else ""
    ax.set_title(title + accuracy)
    return fig


def read_mistakes(path: Path) -> dict[str, Any]:
    refuse_unsafe_load(str(path))
    data = torch.load(path, map_location="cpu", weights_only=True)
    images = data["images"]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not len(images) == len(data["labels"]):
        raise ValueError(f"images of shape {tuple(images.shape)}, expected (N, 1 or 3, H, W) with N labels")
    return data


def plot_mistakes(data: dict[str, Any], title: str) -> Figure | None:
    """The wrong predictions in a grid, most confident first, captioned with prediction and label. None when the
    model made none."""
    images = data["images"].numpy()
    if not len(images):
        return None
    names = list(data["class_names"])

    def name(index: int) -> str:
        text = names[index] if 0 <= index < len(names) else str(index)
        return text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1] + "…"

    columns = min(GRID_COLUMNS, len(images))
    lines = math.ceil(len(images) / columns)
    fig = Figure(figsize=(1.6 * columns, 1.7 * lines + 0.4), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(lines, columns, squeeze=False).flat)
    for ax in axes:
        ax.set_axis_off()
    for ax, image, label, predicted, confidence in zip(
        axes, images, data["labels"].tolist(), data["predicted"].tolist(), data["confidence"].tolist()
    ):
        # Nearest neighbour keeps a 32x32 image's pixels sharp instead of smearing them when upscaled.
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(f"pred: {name(predicted)} ({confidence:.2f})\nlabel: {name(label)}", fontsize=7)
    fig.suptitle(title)
    return fig


def read_optional(path: Path, load: Callable[[Path], Any]) -> Any:
    """`load(path)`, or None when the file is missing or unreadable (said in one line on stderr: the rest of the
    report can still be written)."""
    if not path.is_file():
        return None
    try:
        return load(path)
    except UsageError:
        raise
    except Exception as err:
        # A line of its own, not a warning: Python's shows this module's path and source line beneath it.
        reason = " ".join(str(err).split())
        print(f"cifar-cli: {path}: unreadable ({reason}); left out of the report", file=sys.stderr)
        return None


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "–" if value is None else str(value)


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def metrics_lines(rows: Rows, evaluation: bool = False) -> list[str]:
    """The best and final value of each headline metric, with the epoch of the best; none for an `evaluation`
    (`validate` or `test`), which restores no loop state: its epoch reads 0."""
    lines = ["| metric | best | epoch | final |", "|---|---|---|---|"]
    for column in HEADLINE:
        values = [(x, v) for x, v, _ in validations(rows, column)]  # every validation, and each epoch's training
        if values:
            kind = "min" if "loss" in column else "max"
            best_x, best = (min if kind == "min" else max)(values, key=lambda xv: xv[1])
            epoch = "" if evaluation or column.startswith("test_") else math.ceil(best_x)
            lines.append(f"| {column} | {kind} {fmt(best)} | {epoch} | {fmt(values[-1][1])} |")
    return lines if len(lines) > 2 else []


def checkpoint_lines(run_dir: Path, summary: dict[str, Any] | None) -> list[str]:
    summary = summary if isinstance(summary, dict) else {}
    best, last = summary.get("best_checkpoint"), summary.get("last_checkpoint")
    lines = []
    if best:
        score = f" ({summary.get('monitor')} {summary.get('mode') or ''} {fmt(summary.get('best_score'))})"
        lines.append(f"- best: `{best}`" + (score if summary.get("monitor") else ""))
    if last:
        lines.append(f"- last: `{last}`")
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        marks = [mark for mark, named in (("best", best), ("last", last)) if named and Path(named).name == path.name]
        lines.append(f"- `{path.name}`, {path.stat().st_size / 2**20:.1f} MiB" + "".join(f" ({m})" for m in marks))
    return lines


def per_class_lines(rows: Rows, stage: str, order: list[str]) -> list[str]:
    """The last per-class precision, recall and accuracy of `stage`, in the confusion matrix's class order."""
    prefixes = [f"{stage}_{metric}/" for metric in ("precision", "recall", "acc")]
    columns = [key for row in rows for key in row if key.startswith(tuple(prefixes))]
    classes = list(dict.fromkeys(order + [column.split("/", 1)[1] for column in columns]))
    classes = [name for name in classes if any(f"{prefix}{name}" in columns for prefix in prefixes)]
    if not classes:
        return []
    lines = ["| class | precision | recall | acc |", "|---|---|---|---|"]
    for name in classes:
        # A `|` in a class folder's name would end its cell: the row's numbers went under the wrong headings.
        cell = name.replace("|", "\\|")
        lines.append(f"| {cell} | " + " | ".join(fmt(last_value(rows, p + name)) for p in prefixes) + " |")
    return lines


def config_lines(config: Any) -> list[str]:
    lines: dict[str, str] = {}
    for label, keys in CONFIG_KEYS:
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and label not in lines:
            lines[label] = f"- {label}: `{value}`"
    return list(lines.values())


def restart_lines(run_dir: Path, config: Any) -> list[str]:
    """Each restart that changed the run's settings, from the earlier configs it kept (`config-until-step-N.yaml`):
    its step and the changes, as its line named them. config.yaml, which the Config section reads, holds the
    latest settings alone: a run restarted with another learning rate read as trained at that rate throughout."""
    kept = sorted(
        (int(match[1]), path)
        for path in run_dir.glob("config-until-step-*.yaml")
        if (match := re.fullmatch(r"config-until-step-(\d+)\.yaml", path.name))
    )
    configs = [read_optional(path, lambda path: yaml.safe_load(path.read_text())) for _, path in kept] + [config]
    lines = []
    for (step, path), earlier, later in zip(kept, configs, configs[1:]):
        if isinstance(earlier, dict) and isinstance(later, dict) and (changes := settings_changed(earlier, later)):
            lines.append(f"- at step {step:,}: {', '.join(changes)} (the settings before: `{path.name}`)")
    return lines


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    summary = read_optional(run_dir / "summary.json", lambda path: json.loads(path.read_text()))
    return summary if isinstance(summary, dict) else None


def is_evaluation(summary: dict[str, Any] | None) -> bool:
    """Whether the run is a `validate` or `test` of a checkpoint: its metrics.csv reads epoch 0, whatever epoch the
    checkpoint was saved at."""
    return summary is not None and summary.get("stage") in ("validate", "test")


def write_markdown(
    run_dir: Path, rows: Rows, figures: list[str], classes: dict[str, list[str]], summary: dict[str, Any] | None
) -> str:
    config = read_optional(run_dir / "config.yaml", lambda path: yaml.safe_load(path.read_text()))
    out = [f"# Run {run_dir.resolve().name}", ""]
    if summary is not None and summary.get("stage"):
        if summary["stage"] == "fit":
            out += [f"Stage: fit, {summary.get('epochs')} epochs, {summary.get('steps')} steps.", ""]
        else:  # test and validate restore no loop state: their epoch and step read 0
            evaluated = f" of `{summary['checkpoint']}`" if summary.get("checkpoint") else ""
            out += [f"Stage: {summary['stage']}{evaluated}.", ""]
    fit_time = max((row["fit_time"] for row in rows if "fit_time" in row), default=None)
    if fit_time is not None:
        seconds = f" ({fit_time:.1f} s)" if fit_time >= 60 else ""  # under a minute, duration() gives the seconds
        out += [f"Training time: {duration(fit_time)}{seconds}.", ""]
    sections = [
        ("Metrics", metrics_lines(rows, is_evaluation(summary))),
        ("Checkpoints", checkpoint_lines(run_dir, summary)),
    ]
    sections += [(f"Per class ({stage})", per_class_lines(rows, stage, classes.get(stage, []))) for stage in STAGES]
    sections += [
        ("Config", config_lines(config)),
        ("Restarts with other settings", restart_lines(run_dir, config)),
        ("Figures", [f"![{Path(name).stem}]({name})\n" for name in figures]),  # one paragraph each, not a row
    ]
    for heading, lines in sections:
        if lines:
            out += [f"## {heading}", "", *lines, ""]
    return "\n".join(out)


def make_folder(out: Path) -> None:
    """Make the output folder `out` and the folders above it that are missing; a path that cannot be one is refused
    in one line, leaving none of them made."""
    hint = "pass --out with a folder to write the report in"
    if out.exists() and not out.is_dir():
        what = "a file, not a folder" if out.is_file() else "not a folder"
        raise UsageError(f"{out} is {what} for the report; {hint}")
    missing = missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_empty_folders(missing)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # cifar-cli's own line for a full disk
        raise UsageError(f"{out}: cannot make the report's folder there ({err.strerror}); {hint}") from None


def write_report(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the figures and `report.md` of the run in `run_dir` into `out` (`run_dir/report` by default);
    returns the paths written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        hint = "pass the folder of a run, e.g. runs/cifar-cli/RUN_ID"
        if run_dir.is_file():
            raise UsageError(f"{run_dir} is a file, not a run folder; {hint}")
        if run_dir.exists():
            raise UsageError(f"{run_dir} is not a folder; {hint}")
        raise UsageError(f"{run_dir}: no such folder; {hint}")
    rows = read_metrics(run_dir / "metrics.csv")
    out = Path(out) if out is not None else run_dir / "report"
    make_folder(out)
    summary = read_summary(run_dir)
    figures: dict[str, Figure | None] = {}
    if not is_evaluation(summary):  # a validate's one point would be drawn at epoch 1, not the checkpoint's epoch
        figures.update(loss=plot_curves(rows, "loss"), accuracy=plot_curves(rows, "acc"))
    classes: dict[str, list[str]] = {}
    for stage in STAGES:
        title = {"val": "Validation", "test": "Test"}[stage]
        confusion = read_optional(run_dir / f"confusion_{stage}.csv", read_confusion)
        if confusion is not None:
            classes[stage] = confusion[0]
            figures[f"confusion_{stage}"] = plot_confusion(*confusion, f"{title} confusion")
        mistakes = read_optional(run_dir / f"mistakes_{stage}.pt", read_mistakes)
        if mistakes is not None:
            figures[f"mistakes_{stage}"] = plot_mistakes(mistakes, f"{title}: most confident mistakes")
    written = []
    for name, fig in figures.items():
        if fig is not None:
            path = out / f"{name}.png"
            atomic_write(path, lambda file, fig=fig: fig.savefig(file, format="png"))
            written.append(path)
    # A figure the earlier report.md here showed and this one does not draw (the mistakes of a run that since made
    # none): left beside the new report.md, it showed what the run no longer holds. Only the figures that report
    # linked: a file of the same name in an `--out` folder of the user's, which no report wrote, stays.
    earlier = read_optional(out / "report.md", lambda path: path.read_text(encoding="utf-8")) or ""
    for name in FIGURES:
        path = out / f"{name}.png"
        if path not in written and f"]({name}.png)" in earlier and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
    markdown = write_markdown(run_dir, rows, [path.name for path in written], classes, summary)
    atomic_write_text(out / "report.md", markdown)
    return [*written, out / "report.md"]


def main(argv: list[str] | None = None) -> None:
    # Parse errors are raised, not printed and exited on: `cifar-cli`'s main prints them in one line, as for fit.
    parser = ArgumentParser(
        prog="cifar-cli report",
        description="Plots and a Markdown summary of a finished run, without W&B.",
        exit_on_error=False,
    )
    parser.add_argument("run_dir", type=str, help="the run's folder, e.g. runs/cifar-cli/RUN_ID")
    parser.add_argument("--out", type=str | None, default=None, help="folder for the outputs (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    for path in write_report(Path(args.run_dir), Path(args.out) if args.out else None):
        print(f"Wrote {path}")
