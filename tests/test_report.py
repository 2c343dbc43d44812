"""`cifar-cli report`: figures and report.md from hand-built run folders shaped as fit and test write them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cifar_cli.cli import main as cli_main
from cifar_cli.errors import UsageError
from cifar_cli.report import main, read_metrics, validations, write_report
from cifar_cli.resume import RUN_CONFIG_MARK

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VAL_ACC = [0.5, 0.8125, 0.75]  # best at epoch 1, not the last
VAL_LOSS = [1.5, 0.875, 1.0]
STEPS = 10  # per epoch
BEST = "runs/cifar-cli/abc123/checkpoints/epoch=1-step=20.ckpt"


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as Lightning's CSVLogger writes them: sorted columns, each row filling only its own cells."""
    columns = sorted({key for row in rows for key in row})
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def per_class(stage: str, epoch: int) -> dict[str, float]:
    cells = {}
    for index, name in enumerate(CLASSES):
        cells[f"{stage}_precision/{name}"] = 0.5 + index / 40 + epoch / 100
        cells[f"{stage}_recall/{name}"] = 0.6 + index / 40
        cells[f"{stage}_acc/{name}"] = 0.7 + index / 40
    return cells


def write_confusion(path: Path, classes: list[str], right: int = 80, wrong: int = 2) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["label", *classes])
        for i, name in enumerate(classes):
            writer.writerow([name, *(right if i == j else wrong for j in range(len(classes)))])


def write_mistakes(path: Path, count: int, channels: int = 3, classes: list[str] = CLASSES) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(classes), (count,), generator=generator)
    torch.save(
        {
            "images": torch.randint(0, 256, (count, channels, 32, 32), dtype=torch.uint8, generator=generator),
            "labels": labels,
            "predicted": (labels + 1) % len(classes),
            "confidence": torch.linspace(0.99, 0.5, count),
            "class_names": classes,
        },
        path,
    )


@pytest.fixture
def fit_run(tmp_path: Path) -> Path:
    """A three-epoch fit run with everything a run folder can hold."""
    run = tmp_path / "runs" / "cifar-cli" / "abc123"
    (run / "checkpoints").mkdir(parents=True)
    rows: list[dict] = []
    for epoch in range(3):
        end = (epoch + 1) * STEPS - 1
        rows.append({"lr-SGD": 0.1 / (epoch + 1), "step": end - 5})  # the learning-rate monitor: no epoch
        rows.append({"epoch": epoch, "step": end - 5, "train_loss_step": 2.0 - epoch / 2, "train_acc_step": 0.4})
        val = {"val_acc": VAL_ACC[epoch], "val_loss": VAL_LOSS[epoch], **per_class("val", epoch)}
        rows.append({"epoch": epoch, "step": end, "fit_time": 60.0 * (epoch + 1) - 5, **val})
        train = {"train_loss_epoch": 1.8 - epoch / 2, "train_acc_epoch": 0.45 + epoch / 5}
        rows.append({"epoch": epoch, "step": end, "fit_time": 60.0 * (epoch + 1), **train})
    write_csv(run / "metrics.csv", rows)
    write_confusion(run / "confusion_val.csv", CLASSES)
    write_mistakes(run / "mistakes_val.pt", 12)
    summary = {
        "stage": "fit",
        "metrics": {"val_acc": VAL_ACC[-1], "val_loss": VAL_LOSS[-1]},
        "best_checkpoint": BEST,
        "monitor": "val_loss",
        "best_score": 0.875,
        "mode": "min",
        "last_checkpoint": "runs/cifar-cli/abc123/checkpoints/last.ckpt",
        "epochs": 3,
        "steps": 30,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    config = {
        "seed_everything": 42,
        "trainer": {"max_epochs": 3, "precision": "bf16-mixed"},
        "model": {"net": {"class_path": "cifar_cli.nets.TutorialCNN"}, "learning_rate": 0.0002},
        "data": {"class_path": "cifar_cli.data.CIFAR10DataModule", "init_args": {"batch_size": 64}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "checkpoints" / "epoch=1-step=20.ckpt").touch()
    (run / "checkpoints" / "last.ckpt").touch()
    return run


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        return image.size


def drawn_images(path: Path) -> bool:
    """Whether the PNG shows the random test images: far more colours than text and lines."""
    with Image.open(path) as image:
        return image.convert("RGB").getcolors(maxcolors=5000) is None


def test_fit_run(fit_run: Path) -> None:
    written = write_report(fit_run)
    out = fit_run / "report"
    names = ["loss.png", "accuracy.png", "confusion_val.png", "mistakes_val.png", "report.md"]
    assert written == [out / name for name in names]
    assert sorted(path.name for path in out.iterdir()) == sorted(names)  # no partial files left over
    assert png_size(out / "loss.png") == png_size(out / "accuracy.png") == (1100, 440)  # two panels
    assert png_size(out / "confusion_val.png") == (880, 770)
    assert png_size(out / "mistakes_val.png") == (1408, 418)  # 8 columns, 2 lines
    assert drawn_images(out / "mistakes_val.png")
    report = (out / "report.md").read_text()
    assert report.startswith("# Run abc123\n")
    # Epochs count from 1, as in every line cifar-cli prints (metrics.csv counts from 0, as the checkpoint names).
    assert re.search(r"\| val_acc \| max 0\.8125 \| 2 \| 0\.7500 \|", report)
    assert re.search(r"\| val_loss \| min 0\.8750 \| 2 \| 1\.0000 \|", report)
    assert re.search(r"\| train_loss_epoch \| min 0\.8000 \| 3 \|", report)
    assert "Training time: 3 min 00 s" in report
    assert f"best: `{BEST}` (val_loss min 0.8750)" in report
    assert "`epoch=1-step=20.ckpt`, 0.0 MiB (best)" in report and "`last.ckpt`, 0.0 MiB (last)" in report
    # Per-class rows in the dataset's class order, from the last validation.
    rows = [line for line in report.splitlines() if line.startswith(tuple(f"| {name} |" for name in CLASSES))]
    assert [line.split(" | ")[0][2:] for line in rows] == CLASSES
    assert "| cat | 0.5950 | 0.6750 | 0.7750 |" in report
    assert "- model.net.class_path: `cifar_cli.nets.TutorialCNN`" in report
    assert "- data.batch_size: `64`" in report and "- seed_everything: `42`" in report
    assert "![loss](loss.png)" in report and "![mistakes_val](mistakes_val.png)" in report


def test_a_report_written_again_leaves_no_figure_of_the_earlier_one(fit_run: Path, tmp_path: Path) -> None:
    """A run reported while it trained, then resumed until it made no validation mistake: report.md no longer
    showed mistakes_val.png, but the file of the first report stayed beside it, its mistakes long gone."""
    write_report(fit_run)
    write_mistakes(fit_run / "mistakes_val.pt", 0)
    written = write_report(fit_run)
    out = fit_run / "report"
    assert "mistakes_val.png" not in {path.name for path in written}
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in written)
    # A file of a figure's name that no report linked, in a folder of the user's, stays.
    mine = tmp_path / "figures" / "mistakes_val.png"
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own")
    write_report(fit_run, out=mine.parent)
    assert mine.read_bytes() == b"the user's own"


def test_a_run_restarted_with_other_settings_says_when_and_what_changed(fit_run: Path) -> None:
    """config.yaml holds a restarted run's latest settings: the report gave its learning rate as the run's, with no
    word that the first epochs trained at another (the restart kept their config as config-until-step-N.yaml)."""
    config = yaml.safe_load((fit_run / "config.yaml").read_text())
    config["trainer"]["max_epochs"], config["model"]["learning_rate"] = 1, 0.001
    (fit_run / "config-until-step-10.yaml").write_text(yaml.safe_dump(config))
    config["trainer"]["max_epochs"] = 2
    (fit_run / "config-until-step-20.yaml").write_text(yaml.safe_dump(config))
    report = (write_report(fit_run)[-1]).read_text()
    assert "- model.learning_rate: `0.0002`" in report
    assert (
        "## Restarts with other settings\n\n"
        "- at step 10: trainer.max_epochs 1 -> 2 (the settings before: `config-until-step-10.yaml`)\n"
        "- at step 20: model.learning_rate 0.001 -> 0.0002, trainer.max_epochs 2 -> 3 (the settings before: "
        "`config-until-step-20.yaml`)\n"
    ) in report


def test_test_only_run(tmp_path: Path) -> None:
    """A `cifar-cli test` folder: test columns only, no fit_time, a test confusion matrix; no curves to draw."""
    run = tmp_path / "test-run"
    run.mkdir()
    write_csv(run / "metrics.csv", [{"epoch": 0, "step": 0, "test_acc": 0.5676, "test_loss": 1.2239}])
    write_confusion(run / "confusion_test.csv", CLASSES, right=50, wrong=5)
    written = write_report(run)
    assert [path.name for path in written] == ["confusion_test.png", "report.md"]
    png_size(run / "report" / "confusion_test.png")
    report = (run / "report" / "report.md").read_text()
    assert "| test_acc | max 0.5676 |  | 0.5676 |" in report
    assert "Training time" not in report and "loss.png" not in report


def test_a_class_name_with_a_pipe_keeps_its_table_row(tmp_path: Path) -> None:
    """A class folder named `cats|dogs` (Linux allows it): its `|` split the Markdown table's row into one column
    more, shifting its precision, recall and accuracy under the wrong headings."""
    run = tmp_path / "test-run"
    run.mkdir()
    classes = ["cats|dogs", "fish"]
    cells = {f"test_{metric}/{name}": 0.5 for metric in ("precision", "recall", "acc") for name in classes}
    write_csv(run / "metrics.csv", [{"epoch": 0, "step": 0, "test_acc": 0.5, "test_loss": 1.0, **cells}])
    write_confusion(run / "confusion_test.csv", classes)
    write_report(run)
    report = (run / "report" / "report.md").read_text()
    assert "| cats\\|dogs | 0.5000 | 0.5000 | 0.5000 |" in report


def test_several_validations_an_epoch_are_all_drawn_and_scored(tmp_path: Path) -> None:
    """`--trainer.val_check_interval 0.5`: two validations an epoch. The report kept the last of each epoch, so the
    best (here the first epoch's middle one) was missed."""
    run = tmp_path / "half-epochs"
    run.mkdir()
    rows = []
    for epoch, (first, second) in enumerate([(0.70, 0.60), (0.65, 0.68)]):
        rows.append({"epoch": epoch, "step": 10 * epoch + 4, "val_acc": first, "fit_time": 20.0 * epoch + 9})
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "val_acc": second, "fit_time": 20.0 * epoch + 19})
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "train_acc_epoch": 0.5 + epoch / 10})
    write_csv(run / "metrics.csv", rows)
    assert validations(read_metrics(run / "metrics.csv"), "val_acc") == [
        (0.5, 0.70, 9.0), (1.0, 0.60, 19.0), (1.5, 0.65, 29.0), (2.0, 0.68, 39.0)
    ]  # fmt: skip
    write_report(run)
    report = (run / "report" / "report.md").read_text()
    assert re.search(r"\| val_acc \| max 0\.7000 \| 1 \| 0\.6800 \|", report), report


def test_validations_every_n_steps_are_drawn_where_they_ran(tmp_path: Path) -> None:
    """`--trainer.val_check_interval 7` in epochs of 20 steps validates after steps 7 and 14 of each: 0.35 and 0.7
    of the epoch, which the report drew at 0.5 and 1, the second as if at the epoch's end."""
    run = tmp_path / "every-7-steps"
    run.mkdir()
    rows = []
    for epoch in range(2):
        for step in (7, 14):  # logged one step behind, as Lightning logs a validation
            rows.append({"epoch": epoch, "step": 20 * epoch + step - 1, "val_acc": 0.5 + step / 100})
        rows.append({"epoch": epoch, "step": 20 * epoch + 19, "train_acc_epoch": 0.5})
    write_csv(run / "metrics.csv", rows)
    positions = [x for x, _, _ in validations(read_metrics(run / "metrics.csv"), "val_acc")]
    assert positions == pytest.approx([0.35, 0.7, 1.35, 1.7])


def test_short_run_without_fit_time(tmp_path: Path) -> None:
    """One epoch, no fit_time: curves against epoch only; grayscale mistakes; 100 classes without cell text."""
    run = tmp_path / "short"
    run.mkdir()
    write_csv(run / "metrics.csv", [{"epoch": 0, "step": 4, "val_acc": 0.25, "val_loss": 2.5}])
    many = [f"class_with_a_long_name_{i}" for i in range(100)]
    write_confusion(run / "confusion_val.csv", many)
    write_mistakes(run / "mistakes_val.pt", 3, channels=1, classes=many)
    write_mistakes(run / "mistakes_test.pt", 0)  # no mistakes: no figure
    written = write_report(run)
    assert [path.name for path in written] == [
        "loss.png",
        "accuracy.png",
        "confusion_val.png",
        "mistakes_val.png",
        "report.md",
    ]
    assert png_size(run / "report" / "loss.png") == (605, 440)  # one panel
    assert png_size(run / "report" / "mistakes_val.png")[0] == 528  # 3 columns


def test_unreadable_extras_are_left_out(fit_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each in one line on stderr; as Python warnings they showed report.py's path and a line of its source."""
    (fit_run / "confusion_val.csv").write_text("label,cat,dog\ncat,1\n")
    (fit_run / "mistakes_val.pt").write_bytes(b"not a pickle")
    (fit_run / "summary.json").write_text("{")
    written = write_report(fit_run)
    assert [path.name for path in written] == ["loss.png", "accuracy.png", "report.md"]
    lines = capsys.readouterr().err.splitlines()
    assert sorted(line.split(": unreadable (")[0] for line in lines) == [
        f"cifar-cli: {fit_run / name}" for name in ("confusion_val.csv", "mistakes_val.pt", "summary.json")
    ]
    assert all(line.endswith("); left out of the report") for line in lines), lines


def test_bad_run_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UsageError, match=re.escape(str(missing))):
        write_report(missing)
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path}: no metrics.csv")):
        write_report(tmp_path)
    (tmp_path / "metrics.csv").write_text("")
    with pytest.raises(UsageError, match="holds no metrics"):
        write_report(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch,val_acc\n0,high\n")
    with pytest.raises(UsageError, match="unreadable"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_folder_of_a_run_without_a_logger(tmp_path: Path) -> None:
    """`--trainer.logger false` writes checkpoints and config.yaml, no metrics.csv: the line told the user to pass
    a folder written by `cifar-cli fit`, which this one was."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("trainer:\n  logger: false\n")
    with pytest.raises(UsageError, match=r"no metrics\.csv in this folder; a run with --trainer\.logger false logs "):
        write_report(tmp_path)
    # A config.yaml of another shape, or one no run wrote: the general hint.
    for config in ("trainer:\n  logger: {class_path: WandbLogger}\n", "[1, 2]\n", "trainer: 3\n", ": :\n"):
        (tmp_path / "config.yaml").write_text(config)
        with pytest.raises(UsageError, match=r"no metrics\.csv in this folder; pass the folder of a run written by"):
            write_report(tmp_path)
    # The folder of a run with a logger, in its first steps or stopped within them: it said to pass a run's folder.
    (tmp_path / "config.yaml").write_text(RUN_CONFIG_MARK + "trainer:\n  logger: {class_path: WandbLogger}\n")
    with pytest.raises(UsageError, match=r"in this folder; the run has logged nothing yet \(it is in its first steps"):
        write_report(tmp_path)


def test_folder_of_a_predict_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`predict` writes its own run folder (config.yaml, predictions.csv) and logs no metrics: the line said the run
    had logged nothing yet, as if it were still in its first steps."""
    (tmp_path / "config.yaml").write_text(RUN_CONFIG_MARK + "trainer:\n  logger: {class_path: WandbLogger}\n")
    (tmp_path / "predictions.csv").write_text("image,predicted,confidence,label\nx/0000.jpg,cat,0.9000,\n")
    line = cli_fails(capsys, str(tmp_path))
    assert line == (
        f"cifar-cli: error: {tmp_path}: no metrics.csv in this folder; it is the folder of a `predict`, which logs "
        "no metrics: its output is predictions.csv"
    )
    assert not (tmp_path / "report").exists()


def test_main(fit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(fit_run)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Wrote {fit_run / 'report' / 'loss.png'}"
    assert lines[-1] == f"Wrote {fit_run / 'report' / 'report.md'}" and len(lines) == 5
    elsewhere = tmp_path / "elsewhere"
    main([str(fit_run), "--out", str(elsewhere)])
    assert capsys.readouterr().out.splitlines()[-1] == f"Wrote {elsewhere / 'report.md'}"
    assert (elsewhere / "loss.png").is_file()


def cli_fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """`cifar-cli report ARGS` expecting bad input: exit code 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert not captured.out
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: run_dir"),
        (["a", "b"], "unrecognized arguments: b"),
        (["a", "--out"], "argument --out: expected one argument"),
        (["a", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_parse_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert cli_fails(capsys, *args) == f"cifar-cli: error: {message}"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cifar-cli report [--out OUT] run_dir\n")
    assert "Plots and a Markdown summary" in out and "--out OUT" in out and "run_dir" in out


def test_run_folder_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "my.yaml"
    config.write_text("trainer: {}\n")
    assert cli_fails(capsys, str(config)) == (
        f"cifar-cli: error: {config} is a file, not a run folder; pass the folder of a run, e.g. runs/cifar-cli/RUN_ID"
    )
    assert sorted(tmp_path.iterdir()) == [config] and config.read_text() == "trainer: {}\n"


def test_out_that_cannot_be_a_folder(fit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hint = "pass --out with a folder to write the report in"
    taken = tmp_path / "my.yaml"
    taken.write_text("kept\n")
    assert cli_fails(capsys, str(fit_run), "--out", str(taken)) == (
        f"cifar-cli: error: {taken} is a file, not a folder for the report; {hint}"
    )
    assert taken.read_text() == "kept\n"
    under_a_file = taken / "report"
    assert cli_fails(capsys, str(fit_run), "--out", str(under_a_file)) == (
        f"cifar-cli: error: {under_a_file}: cannot make the report's folder there (Not a directory); {hint}"
    )
    # The folders above the one that fails are made first: none is left behind.
    too_long = tmp_path / "new" / ("a" * 300)
    assert cli_fails(capsys, str(fit_run), "--out", str(too_long)) == (
        f"cifar-cli: error: {too_long}: cannot make the report's folder there (File name too long); {hint}"
    )
    assert not (tmp_path / "new").exists()
    if Path("/proc/self").is_dir():  # Linux: no folder can be made in /proc
        assert cli_fails(capsys, str(fit_run), "--out", "/proc/x") == (
            f"cifar-cli: error: /proc/x: cannot make the report's folder there (No such file or directory); {hint}"
        )
    assert not (fit_run / "report").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["my.yaml", "runs"]


def test_training_time_under_a_minute_is_given_once(tmp_path: Path) -> None:
    """It read "Training time: 30.3 s (30.3 s).": the seconds, then the same seconds again."""
    run = tmp_path / "short-fit"
    run.mkdir()
    write_csv(run / "metrics.csv", [{"epoch": 0, "step": 9, "val_acc": 0.5, "fit_time": 30.25}])
    write_report(run)
    assert "\nTraining time: 30.2 s.\n" in (run / "report" / "report.md").read_text()


def test_validate_run_has_no_epochs(tmp_path: Path) -> None:
    """A `cifar-cli validate` folder: its metrics.csv reads epoch 0 whatever the checkpoint's epoch, so the report
    drew one point at epoch 1 and named epoch 1 as the best's, for a checkpoint of epoch 3."""
    run = tmp_path / "validate-run"
    run.mkdir()
    write_csv(run / "metrics.csv", [{"epoch": 0, "step": 0, "val_acc": 0.8125, "val_loss": 0.875}])
    write_confusion(run / "confusion_val.csv", CLASSES)
    summary = {"stage": "validate", "metrics": {"val_acc": 0.8125}, "checkpoint": BEST, "epochs": 0, "steps": 0}
    (run / "summary.json").write_text(json.dumps(summary))
    written = write_report(run)
    assert [path.name for path in written] == ["confusion_val.png", "report.md"]
    report = (run / "report" / "report.md").read_text()
    assert f"Stage: validate of `{BEST}`." in report
    assert "| val_acc | max 0.8125 |  | 0.8125 |" in report and "| val_loss | min 0.8750 |  | 0.8750 |" in report
