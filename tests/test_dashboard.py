"""What a run shows on W&B and in its folder: prediction tables, confusion matrices, per-class scores, model
artifacts, gradient histograms, sweeps' arguments, metrics.csv beside W&B, and `cifar-cli report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_image_folder
from wandb_offline import read_run

from cifar_cli.callbacks import TABLE_MAX_ROWS, table_rows
from cifar_cli.classifier import class_scores
from cifar_cli.cli import main
from cifar_cli.data import CIFAR10DataModule

REPO = Path(__file__).resolve().parents[1]
NAMES = list(CIFAR10DataModule.names)


def finish_wandb() -> None:
    import wandb

    wandb.finish()
    wandb.teardown()  # waits for the W&B service to write out every record and media file


def offline_runs() -> dict[str, Path]:
    """The offline W&B runs under runs/wandb, by run id."""
    return {p.name.rsplit("-", 1)[1]: p for p in Path("runs/wandb").glob("offline-run-*")}


def read_confusion(path: Path) -> tuple[list[str], torch.Tensor]:
    with open(path, newline="") as file:
        header, *rows = list(csv.reader(file))
    assert header[0] == "label" and [row[0] for row in rows] == header[1:]
    return header[1:], torch.tensor([[int(x) for x in row[1:]] for row in rows])


def last_row_with(path: Path, key: str) -> dict[str, str]:
    with open(path, newline="") as file:
        return [row for row in csv.DictReader(file) if row.get(key)][-1]


def test_predict_logs_its_photos_with_their_predictions_to_wandb(image_folder: Path, tmp_path: Path, capfd) -> None:
    """`predict` on W&B: a table of the photos with what the model predicted, the rows of predictions.csv (its W&B
    run held only the config)."""
    folder = ["--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30"]
    main(["fit", *folder, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    finish_wandb()
    fitted = set(offline_runs())
    photos = tmp_path / "photos"
    write_image_folder(photos, {"a": 3, "b": 2}, size=48, seed=2)
    capfd.readouterr()
    main(["predict", "--ckpt_path", "last", "--data.predict_root", str(photos)])
    finish_wandb()
    out = capfd.readouterr().out
    ((run_id, run_folder),) = [(i, f) for i, f in offline_runs().items() if i not in fitted]
    table = read_run(run_folder).table("predictions")
    # Where the run is, and the command that uploads it, as test and validate end.
    assert f"Run folder: runs/cifar-cli/{run_id}\n" in out and f"wandb sync {run_folder}" in out
    assert not Path("runs/cifar-cli", run_id, "summary.json").exists()
    with open(Path("runs/cifar-cli", run_id, "predictions.csv"), newline="") as file:
        written = list(csv.DictReader(file))
    assert table["columns"] == ["image", "file", "predicted", "confidence"]
    assert [row[1:] for row in table["data"]] == [
        [row["image"], row["predicted"], pytest.approx(float(row["confidence"]), abs=1e-4)] for row in written
    ]
    for row in table["data"]:
        image = row[0]
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == (32, 32)
        assert Path(table["files"][image["path"]]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_scores_from_a_confusion_matrix() -> None:
    # rows: true class; columns: predicted. Class 2 is never predicted, class 1 never right.
    matrix = torch.tensor([[3, 1, 0], [2, 0, 0], [1, 1, 0]])
    scores = class_scores(matrix)
    assert torch.allclose(scores["precision"], torch.tensor([3 / 6, 0 / 2, 0.0]))
    assert torch.allclose(scores["recall"], torch.tensor([3 / 4, 0 / 2, 0 / 2]))
    assert torch.equal(scores["acc"], scores["recall"])


def test_fit_and_test_runs_hold_tables_confusion_matrices_artifacts_and_config(fake_cifar10: Path) -> None:
    common = ["--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--trainer.max_epochs", "2", "--data.batch_size", "64"])
    finish_wandb()
    ((fit_id, fit_folder),) = offline_runs().items()
    run_folder = Path("runs/cifar-cli", fit_id)
    run = read_run(fit_folder)

    # The full resolved config, as config.yaml in the run folder holds it.
    saved = yaml.safe_load((run_folder / "config.yaml").read_text())
    for key in ("seed_everything", "trainer", "model", "data", "last_checkpoint"):
        assert run.config[key] == saved[key], key
    # The CLI hands --optimizer to the model (config.yaml's top-level entry is then empty); the run's `optimizer`
    # is the model's hyperparameter, the one that trained.
    assert run.config["optimizer"] == saved["model"]["optimizer"]

    # The prediction table of the last validation: every one of the 40 images, with its picture.
    table = run.table("val_predictions")
    assert table["columns"][:6] == ["index", "image", "label", "predicted", "confidence", "correct"]
    assert table["columns"][6:] == [f"p_{n}" for n in NAMES]
    assert sorted(row[0] for row in table["data"]) == list(range(40))
    for row in table["data"]:
        image = row[1]
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == (32, 32)
        assert Path(table["files"][image["path"]]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # staged for sync
        probabilities = row[6:]
        assert sum(probabilities) == pytest.approx(1, abs=1e-3)
        assert row[3] == NAMES[max(range(10), key=probabilities.__getitem__)]
        assert row[4] == pytest.approx(max(probabilities), abs=1e-4) and row[5] == (row[2] == row[3])

    # W&B's confusion-matrix chart after each validation, counting every validation image once.
    charts = [row for row in run.history if "val_confusion_matrix_table/_type" in row]
    assert len(charts) == 2
    panel = run.config["_wandb/visualize/val_confusion_matrix"]["panel_config"]
    assert panel["panelDefId"] == "wandb/confusion_matrix/v1"
    chart = run.table("val_confusion_matrix_table")
    assert chart["columns"] == ["Actual", "Predicted", "nPredictions"] and len(chart["data"]) == 100
    assert sum(row[2] for row in chart["data"]) == 40

    # The same matrix in the run folder; per-class scores and the accuracy agree with it.
    names, matrix = read_confusion(run_folder / "confusion_val.csv")
    assert names == NAMES and int(matrix.sum()) == 40
    assert float(matrix.diagonal().sum()) / 40 == pytest.approx(run.summary["val_acc"], abs=1e-6)
    scores = class_scores(matrix)
    for i, name in enumerate(NAMES):
        assert run.summary[f"val_recall/{name}"] == pytest.approx(float(scores["recall"][i]), abs=1e-6)
        assert run.summary[f"val_precision/{name}"] == pytest.approx(float(scores["precision"][i]), abs=1e-6)
        assert run.summary[f"val_acc/{name}"] == pytest.approx(float(scores["acc"][i]), abs=1e-6)

    # Metrics as CSV in the same run folder, beside W&B: the epoch values and the per-class scores.
    metrics = run_folder / "metrics.csv"
    assert float(last_row_with(metrics, "val_acc")["val_acc"]) == pytest.approx(run.summary["val_acc"], abs=1e-6)
    assert float(last_row_with(metrics, "val_recall/cat")["val_recall/cat"]) == pytest.approx(
        run.summary["val_recall/cat"], abs=1e-6
    )
    # The per-class scores at the step of the validation's other metrics (a row each: one per logger call).
    with open(metrics) as file:
        rows = list(csv.DictReader(file))
    steps = [(row["step"], row["epoch"]) for row in rows if row["val_acc"]]
    assert steps == [(row["step"], row["epoch"]) for row in rows if row["val_recall/cat"]] and len(steps) == 2

    # The most confident mistakes, with their images, for `cifar-cli report`.
    mistakes = torch.load(run_folder / "mistakes_val.pt", weights_only=True)
    assert len(mistakes["index"]) == int(matrix.sum() - matrix.diagonal().sum())
    assert bool((mistakes["predicted"] != mistakes["labels"]).all())
    assert mistakes["confidence"].tolist() == sorted(mistakes["confidence"].tolist(), reverse=True)
    assert mistakes["images"].shape == (len(mistakes["index"]), 3, 32, 32)

    # The best and the last checkpoint as model artifacts, with their aliases and the metrics that made them.
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert {a["name"] for a in models} == {f"model-{fit_id}"}
    aliases = {alias: a for alias, a in run.aliases.items() if a["type"] == "model"}
    assert set(aliases) == {"best", "latest"}
    best = aliases["best"]["metadata"]
    (best_file,) = (run_folder / "checkpoints").glob("epoch=*.ckpt")
    checkpoint = torch.load(best_file, weights_only=True)
    (callback_state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert best["monitor"] == "val_loss" and best["score"] == pytest.approx(float(callback_state["best_model_score"]))
    assert best["metrics"]["val_loss"] == pytest.approx(best["score"]) and best["file"] == best_file.name
    assert aliases["latest"]["metadata"]["file"] == "last.ckpt"
    for artifact in models:
        (staged,) = artifact["files"].values()
        source = best_file if "best" in artifact["aliases"] else run_folder / "checkpoints" / "last.ckpt"
        assert Path(staged).read_bytes() == source.read_bytes()

    # `cifar-cli report` of the W&B run, from its folder: metrics.csv written beside W&B.
    main(["report", str(run_folder)])
    figures = {p.name for p in (run_folder / "report").iterdir()}
    assert figures == {"loss.png", "accuracy.png", "confusion_val.png", "mistakes_val.png", "report.md"}

    # `test` on the best checkpoint: its own run, with the test split's table and matrix.
    main(["test", "--ckpt_path", str(best_file), "--trainer.enable_progress_bar", "false"])
    finish_wandb()
    ((test_id, test_folder),) = [(k, v) for k, v in offline_runs().items() if k != fit_id]
    test_run = read_run(test_folder)
    assert len(test_run.table("test_predictions")["data"]) == 50
    _, test_matrix = read_confusion(Path("runs/cifar-cli", test_id, "confusion_test.csv"))
    assert int(test_matrix.sum()) == 50
    assert float(test_matrix.diagonal().sum()) / 50 == pytest.approx(test_run.summary["test_acc"], abs=1e-6)


def first_is_best_run(tmp_path: Path, fake_cifar10: Path, *args: str) -> tuple[str, Path, Path]:
    """A fit whose ModelCheckpoint keeps the lowest fit_time, the first validation's (fit_time only grows), beside
    the model artifacts and the timer: its run id, offline W&B folder and best checkpoint."""
    config = tmp_path / "first-is-best.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "fit_time", "mode": "min", "save_top_k": 1}},
        {"class_path": "cifar_cli.dashboard.ModelArtifacts"},
        {"class_path": "cifar_cli.callbacks.FitTimer"},
    ]}}))  # fmt: skip
    main(["fit", "--config", str(config), "--data.data_dir", str(fake_cifar10), "--data.val_size", "40",
          "--trainer.enable_progress_bar", "false", *args])  # fmt: skip
    finish_wandb()
    ((run_id, folder),) = offline_runs().items()
    (best_file,) = Path("runs/cifar-cli", run_id, "checkpoints").glob("epoch=*.ckpt")
    return run_id, folder, best_file


def test_best_model_artifact_carries_the_epoch_and_step_of_its_checkpoint(fake_cifar10: Path, tmp_path: Path) -> None:
    """The best checkpoint is the first epoch's (fit_time only grows), the last is the third's: the `best` version's
    metadata gives the epoch and step that made it, not those of the run's end."""
    _, folder, best_file = first_is_best_run(tmp_path, fake_cifar10, "--data.batch_size", "64",
                                             "--trainer.max_epochs", "3")  # fmt: skip
    saved = torch.load(best_file, weights_only=True)
    last = torch.load(best_file.with_name("last.ckpt"), weights_only=True)
    assert saved["epoch"] == 0 and last["epoch"] == 2
    aliases = read_run(folder).aliases
    best, latest = aliases["best"]["metadata"], aliases["latest"]["metadata"]
    assert best["file"] == best_file.name and latest["file"] == "last.ckpt"
    # Epochs done when each was saved (the run's end: 3), and the step in its name.
    assert (best["epoch"], best["step"]) == (1, saved["global_step"])
    assert (latest["epoch"], latest["step"]) == (3, last["global_step"])
    assert best["metrics"]["fit_time"] == pytest.approx(best["score"])


def test_validation_panels_share_the_step_of_the_validation_metrics(fake_cifar10: Path) -> None:
    """On W&B's x-axis (trainer/global_step) the example images, the confusion matrix and the last validation's
    prediction table sit at the step of the val_acc they show, as the per-class scores do: Lightning logs a
    validation's metrics one step behind global_step, and the panels were one step ahead of their val_acc."""
    main(["fit", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--data.batch_size", "64",
          "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finish_wandb()
    (folder,) = offline_runs().values()
    history = read_run(folder).history

    def steps(key: str) -> list[int]:
        return [row["trainer/global_step"] for row in history if key in row]

    validations = steps("val_acc")
    assert len(validations) == 2
    assert steps("val_recall/cat") == validations
    assert steps("examples/_type") == validations
    assert steps("val_confusion_matrix_table/_type") == validations
    assert steps("val_predictions/_type") == validations[-1:]


def test_confusion_matrix_of_many_classes_keeps_every_count(tmp_path: Path) -> None:
    """101 classes make 10,201 cells, more than the 10,000 rows wandb writes of a table into the run's files (the
    rest dropped with a log line nobody sees): the chart's table holds every count the run folder's matrix does."""
    root = tmp_path / "many"
    write_image_folder(root / "train", {f"class{i:03d}": 3 for i in range(101)})
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(root), "--data.val_size", "101",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finish_wandb()
    ((run_id, folder),) = offline_runs().items()
    names, matrix = read_confusion(Path("runs/cifar-cli", run_id, "confusion_val.csv"))
    assert len(names) == 101 and int(matrix.sum()) == 101
    counts = {(i, j): int(n) for (i, j), n in zip(torch.cartesian_prod(torch.arange(101), torch.arange(101)).tolist(),
                                                  matrix.flatten().tolist()) if n}  # fmt: skip
    (saved,) = (folder / "files" / "media" / "table").glob("val_confusion_matrix_table_*.table.json")
    for table in (json.loads(saved.read_text()), read_run(folder).table("val_confusion_matrix_table")):
        assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
        logged = {(names.index(a), names.index(p)): n for a, p, n in table["data"] if n}
        assert logged == counts


def test_tables_of_large_splits_are_drawn_from_the_whole_split_within_wandbs_row_limit() -> None:
    """W&B keeps at most 200,000 rows of a table (its artifact, which the app shows; the run's media copy holds
    10,000): a 250,000-image split (or `table_rows` above the limit) gets 200,000 rows drawn from all of it, the
    same each time, where wandb kept the first 200,000 (an image folder's splits list their classes in order, so
    whole classes went missing)."""
    import wandb

    assert TABLE_MAX_ROWS == wandb.Table.MAX_ARTIFACT_ROWS
    for rows in (None, 300_000):
        chosen = table_rows(250_000, (3, 32, 32), rows)
        assert len(chosen) == 200_000 and len(set(chosen.tolist())) == 200_000
        assert chosen.max() > 200_000 and torch.equal(chosen, chosen.sort().values)
        assert torch.equal(chosen, table_rows(250_000, (3, 32, 32), rows))
    assert torch.equal(table_rows(20_000, (3, 32, 32)), torch.arange(20_000))  # within the limit: every image
    assert len(table_rows(250_000, (3, 224, 224))) == 1000


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command a `wandb agent` runs for one run of `sweep` with these parameter values: wandb's own code
    formats the arguments (`--name=value`), and the macros are filled in as the agent fills them."""
    from wandb.sdk.launch.sweeps import utils

    args = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros = {**args, "env": ["/usr/bin/env"], "program": [sweep["program"]], "interpreter": ["python"]}
    command = []
    for part in utils.create_sweep_command(list(sweep["command"])):
        command += macros[part[2:-1]] if part.startswith("${") and part.endswith("}") else [part]
    return command


def test_sweep_agent_arguments_reach_the_model_and_the_run_config(fake_cifar10: Path) -> None:
    sweep = yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text())
    assert set(sweep["parameters"]) == {
        "model.learning_rate", "data.batch_size", "model.label_smoothing", "trainer.max_epochs"
    }  # fmt: skip
    values = {"model.learning_rate": 0.73, "data.batch_size": 512, "model.label_smoothing": 0.1,
              "trainer.max_epochs": 2}  # fmt: skip
    command = agent_command(sweep, values)
    assert command[:3] == ["/usr/bin/env", "cifar-cli", "fit"]
    assert command[-4:] == [f"--{k}={v}" for k, v in values.items()]
    # The agent's command, on this machine: the fast recipe's GPU config on the CPU, a few tiny steps, and
    # offline (no W&B server here); the sweep's own arguments stay last and unchanged.
    args = command[2:]
    args[args.index("configs/fast.yaml")] = str(REPO / "configs" / "fast.yaml")
    args.remove("--trainer.logger.offline=false")
    tiny = ["--trainer.accelerator", "cpu", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40",
            "--trainer.limit_train_batches", "1", "--trainer.enable_progress_bar", "false",
            "--model.net.widths", "[8, 16, 16]"]  # fmt: skip
    main(args[:-4] + tiny + args[-4:])
    finish_wandb()
    ((run_id, folder),) = offline_runs().items()
    run = read_run(folder)
    assert run.config["model"]["learning_rate"] == 0.73 and run.config["model"]["label_smoothing"] == 0.1
    assert run.config["data"]["init_args"]["batch_size"] == 512 and run.config["trainer"]["max_epochs"] == 2
    assert run.config["trainer"]["check_val_every_n_epoch"] == 2
    (best,) = Path("runs/cifar-cli", run_id, "checkpoints").glob("epoch=*.ckpt")
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hyper_parameters"]["learning_rate"] == 0.73
    assert checkpoint["hyper_parameters"]["label_smoothing"] == 0.1
    assert checkpoint["epoch"] == 1 and "val_acc" in run.summary  # validated at the end of the last epoch


def test_watch_model_logs_gradients_and_parameters_every_log_freq_steps(fake_cifar10: Path) -> None:
    """At every `log_freq`-th step, at that step. Through `wandb.watch`, W&B kept a histogram only with the next row
    Lightning logged (every `log_every_n_steps`): with 2 and 5, histograms showed at steps 4 and 9 alone."""
    main(["fit", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--data.batch_size", "32",
          "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "5",
          "--trainer.callbacks+=cifar_cli.dashboard.WatchModel", "--trainer.callbacks.log=all",
          "--trainer.callbacks.log_freq=2"])  # fmt: skip
    finish_wandb()
    (folder,) = offline_runs().values()
    history = read_run(folder).history
    keys = {key for row in history for key in row}
    assert {"gradients/net.conv1.weight/values", "parameters/net.conv1.weight/values"} <= keys
    assert {"gradients/net.fc3.bias/bins", "parameters/net.fc3.bias/bins"} <= keys
    drawn = [row for row in history if "gradients/net.fc3.bias/values" in row]
    assert [row["trainer/global_step"] for row in drawn] == [0, 2, 4, 6, 8]  # 10 steps
    for row in drawn:
        for kind in ("gradients", "parameters"):
            counts, edges = row[f"{kind}/net.fc3.bias/values"], row[f"{kind}/net.fc3.bias/bins"]
            assert sum(counts) == 10 and len(edges) == len(counts) + 1 == 65  # the 10 classes' biases


def test_report_of_a_csv_logger_run(image_folder: Path, capsys) -> None:
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "2", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    (metrics,) = Path("runs").glob("**/metrics.csv")
    run_folder = metrics.parent
    assert {p.name for p in run_folder.iterdir()} >= {"metrics.csv", "confusion_val.csv", "mistakes_val.pt",
                                                      "summary.json", "config.yaml"}  # fmt: skip
    _, matrix = read_confusion(run_folder / "confusion_val.csv")
    assert int(matrix.sum()) == 30
    capsys.readouterr()
    main(["report", str(run_folder)])
    written = [Path(line.removeprefix("Wrote ")) for line in capsys.readouterr().out.splitlines()]
    assert {p.name for p in written} >= {"loss.png", "accuracy.png", "confusion_val.png", "report.md"}
    assert all(p.parent == run_folder / "report" and p.stat().st_size > 0 for p in written)
    report = (run_folder / "report" / "report.md").read_text()
    assert "val_acc" in report and "![accuracy](accuracy.png)" in report


def test_report_of_a_missing_folder_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "runs/nothing-here"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifar-cli: error: ") and "runs/nothing-here" in err[0]


def test_best_model_artifact_of_a_validation_within_an_epoch(fake_cifar10: Path, tmp_path: Path) -> None:
    """`--trainer.val_check_interval 0.5`: the best checkpoint is the first validation's, halfway through the only
    epoch. Its metadata gave the step and metrics of the epoch's end, noted when fit ended."""
    args = ["--data.batch_size", "32", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "0.5"]
    run_id, folder, best_file = first_is_best_run(tmp_path, fake_cifar10, *args)
    saved = torch.load(best_file, weights_only=True)
    last = torch.load(best_file.with_name("last.ckpt"), weights_only=True)
    assert 0 < saved["global_step"] < last["global_step"]
    best = read_run(folder).aliases["best"]["metadata"]
    assert best["file"] == best_file.name
    assert (best["epoch"], best["step"]) == (0, saved["global_step"])
    assert best["metrics"]["fit_time"] == pytest.approx(best["score"])
    with open(Path("runs/cifar-cli", run_id, "metrics.csv"), newline="") as file:
        first = next(row for row in csv.DictReader(file) if row["val_acc"])
    assert best["metrics"]["val_acc"] == pytest.approx(float(first["val_acc"]))


@pytest.fixture
def corner_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A network that reads one corner pixel, so that every view of an image may be classed otherwise."""
    (tmp_path / "cornernet.py").write_text(
        "from torch import nn\n\n\n"
        "class Corner(nn.Module):\n"
        "    def __init__(self, num_classes: int, image_shape: tuple[int, int, int]) -> None:\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(image_shape[0], num_classes, 1)\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x[:, :, :1, :1]).flatten(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cornernet.Corner"


def assert_captions_are_the_tables() -> None:
    """The `examples` panel's captions are the predictions of the validation it sits beside, as the prediction table
    gives them."""
    finish_wandb()
    (folder,) = offline_runs().values()
    run = read_run(folder)
    (examples,) = [row for row in run.history if "examples/captions" in row]
    table = run.table("val_predictions")
    columns = table["columns"]
    rows = {row[columns.index("index")]: row for row in table["data"]}
    sample = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:32].tolist()  # as the logger draws it
    expected = [
        f"Pred: {rows[i][columns.index('predicted')]}, Label: {rows[i][columns.index('label')]}" for i in sample
    ]
    assert examples["examples/captions"] == expected


def test_example_images_are_captioned_with_the_predictions_validation_scores(fake_cifar10: Path, corner_net: str):
    """With `--model.tta flip-shift` the captions came from the network without test-time augmentation."""
    main(["fit", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--data.batch_size", "64",
          "--model.net", corner_net, "--model.tta", "flip-shift", "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert_captions_are_the_tables()


def test_example_images_are_captioned_with_the_averaged_weights_validation_scores(
    fake_cifar10: Path, corner_net: str, tmp_path: Path
) -> None:
    """With EMA listed before the logger, as in configs/fast.yaml, the captions came from the trained weights, which
    EMA had put back at the validation's end, not from the average the validation scored (here the weights before
    training: no update within the run)."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "cifar_cli.averaging.EMA", "init_args": {"update_every_n_steps": 1000}},
        {"class_path": "cifar_cli.callbacks.ImagePredictionLogger"},
        {"class_path": "cifar_cli.dashboard.EvaluationLogger"},
    ]}}))  # fmt: skip
    main(["fit", "--config", str(callbacks), "--data.data_dir", str(fake_cifar10), "--data.val_size", "40",
          "--data.batch_size", "64", "--model.net", corner_net, "--model.learning_rate", "0.5",
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert_captions_are_the_tables()


def test_resuming_a_run_that_had_ended_logs_no_model_versions_again(fake_cifar10: Path) -> None:
    """The same command again with `--ckpt_path last` after the run ended trains nothing; it logged the best and
    the last checkpoint again, `latest` with no metrics."""
    run = ["fit", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--data.batch_size", "64",
           "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--ckpt_path", "last"]  # fmt: skip
    main(run)
    finish_wandb()
    main(run)
    finish_wandb()
    (first,) = sorted(Path("runs/wandb").glob("offline-run-*"))  # the second start made no W&B part
    assert {alias for a in read_run(first).artifacts if a["type"] == "model" for alias in a["aliases"]} == {
        "best",
        "latest",
    }


def test_a_csv_logger_beside_wandb_leaves_metrics_in_the_run_folder(image_folder: Path, capsys) -> None:
    """`--trainer.logger+=CSVLogger` writes its own folder; the W&B run's folder still gets its metrics.csv."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "2", "--trainer.logger+=CSVLogger", "--trainer.logger.save_dir", "csv",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finish_wandb()
    (run_folder,) = Path("runs/cifar-cli").iterdir()
    (own,) = Path("csv").glob("**/metrics.csv")
    assert run_folder.name in offline_runs()

    def validations(path: Path) -> list[str]:
        with open(path, newline="") as file:
            return [row["val_acc"] for row in csv.DictReader(file) if row.get("val_acc")]

    assert len(validations(run_folder / "metrics.csv")) == 2
    assert validations(run_folder / "metrics.csv") == validations(own)
    capsys.readouterr()
    main(["report", str(run_folder)])
    assert (run_folder / "report" / "accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("logger", ["--trainer.logger+=CSVLogger", "--trainer.logger+=TensorBoardLogger"])
def test_a_logger_added_without_its_folder_writes_under_runs(image_folder: Path, logger: str) -> None:
    """`--trainer.logger+=CSVLogger` alone, as the README gives it: the class requires a `save_dir`, which a logger
    added to the list gets from nothing, and the run was refused before it started with jsonargparse's "the
    following arguments are required: save_dir Expected a <class 'bool'>". It writes its own folder under runs/."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", logger, "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finish_wandb()
    (run_folder,) = Path("runs/cifar-cli").iterdir()
    assert run_folder.name in offline_runs()
    (own,) = Path("runs/lightning_logs").iterdir()
    assert own.name == "version_0" and (own / "hparams.yaml").is_file()
    assert (run_folder / "metrics.csv").is_file()


def test_a_tensorboard_run_warns_of_no_deletion(image_folder: Path, recwarn) -> None:
    """The CSV writer cifar-cli adds beside TensorBoard writes into TensorBoard's run folder, which holds its event
    file by then: Lightning's warning that the folder "exists and is not empty. Previous log files in this directory
    will be deleted" came with every TensorBoard run, though nothing was there to delete."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "runs",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert not [str(w.message) for w in recwarn if "exists and is not empty" in str(w.message)]
    assert Path("runs/version_0/metrics.csv").is_file()


def test_a_logger_in_place_of_none_writes_under_runs(image_folder: Path, capsys, tmp_path: Path) -> None:
    """`--trainer.logger CSVLogger` after configs/debug.yaml, whose `logger: false` leaves the class no `save_dir`
    to take over (W&B's gives it one): the run was refused with jsonargparse's "the following arguments are
    required: save_dir Expected a <class 'collections.abc.Iterable'> Expected a <class 'bool'>", and the printed
    config held `save_dir: null`, which failed so too."""
    replaced = ["--config", "configs/debug.yaml", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "logs"]
    for args in (["--trainer.logger", "false", "--trainer.logger=TensorBoardLogger"], replaced):
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        logger = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
        assert logger["init_args"]["save_dir"] == ("logs" if "logs" in args else "runs"), args
    # A logger's own folder, from a config, is still the one the class takes over.
    mine = tmp_path / "mine.yaml"
    mine.write_text("trainer:\n  logger: {class_path: WandbLogger, init_args: {save_dir: elsewhere}}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/debug.yaml", "--config", str(mine), "--trainer.logger", "CSVLogger",
              "--print_config"])  # fmt: skip
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]["save_dir"] == "elsewhere"
    main(["fit", "--config", "configs/debug.yaml", "--data", "ImageFolderDataModule", "--data.root",
          str(image_folder), "--data.val_size", "30", "--trainer.logger", "CSVLogger"])  # fmt: skip
    (metrics,) = Path("runs/debug/runs").glob("**/metrics.csv")  # runs/ under the config's default_root_dir
    with open(metrics, newline="") as file:
        assert len([row for row in csv.DictReader(file) if row["val_acc"]]) == 1  # the one validation, logged
