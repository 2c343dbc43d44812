"""Transfer with `--model.init_from`: pretrain on five CIFAR-10 classes, fine-tune on the other five from a few
images per class, against the same fine-tuning from scratch. Offline: the JPEG copy is all it needs.

The fine-tuning folders hold `shots` training images per class, 200 validation and 1,000 test images per class,
all different images, as links into the JPEG copy; both runs see the same images in the same order (same seed).
"""

from __future__ import annotations

import random
from pathlib import Path

from bench.common import CONFIGS, SMOKE_DEVICE, best_checkpoint, cifar_cli, csv_logger, metrics

# Fine-tuning: a few hundred images take a few steps an epoch at the fast recipe's batch of 512.
FINETUNE = ["--data.batch_size", "64", "--model.learning_rate", "0.1", "--model.lr_schedule.restarts", "[]"]


def link_split(target: Path, files: dict[str, list[Path]]) -> None:
    for name, paths in files.items():
        (target / name).mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = target / name / path.name
            if not link.exists():
                link.symlink_to(path.resolve())


def folders(root: Path, out: Path, shots: int, val: int, test: int) -> tuple[Path, Path]:
    """The pretraining folder (every training image of the first half of the classes, in sorted order: airplane to
    deer in CIFAR-10) and the fine-tuning one (the other half: `shots`, `val` and `test` images per class)."""
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    half = len(classes) // 2
    images = {name: sorted((root / "train" / name).iterdir()) for name in classes}
    pretrain, finetune = out / "pretrain", out / f"finetune-{shots}"
    link_split(pretrain / "train", {n: images[n] for n in classes[:half]})
    rng = random.Random(0)
    picks = {n: rng.sample(images[n], len(images[n])) for n in classes[half:]}
    for split, (start, end) in {"train": (0, shots), "val": (shots, shots + val),
                                "test": (shots + val, shots + val + test)}.items():  # fmt: skip
        link_split(finetune / split, {n: picks[n][start:end] for n in classes[half:]})
    return pretrain, finetune


def bench_transfer(root: Path, out: Path, smoke: bool, shots: tuple[int, ...] = (50, 500)) -> dict:
    """Pretrain FastNet (configs/fast-cpu.yaml, one cycle) on five classes; then, for each `shots`, fine-tune on
    the other five from the pretrained weights and from scratch, same recipe, epochs and seed; test accuracy."""
    folder = out / "transfer"
    shots, val, test = ((5,), 5, 10) if smoke else (shots, 200, 1000)
    base = ["--config", str(CONFIGS / "cifar10-jpg.yaml"), "--config", str(CONFIGS / "fast-cpu.yaml")]
    # A smoke run's pretraining is a few batches too: a whole epoch on half the JPEG copy took minutes.
    base += [*SMOKE_DEVICE, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"] if smoke else []
    pretrain_root, _ = folders(root, folder, shots[0], val, test)
    epochs = "1" if smoke else "8"
    _, output = cifar_cli(
        ["fit", *base, "--data.root", str(pretrain_root), "--data.val_size", "20" if smoke else "2500",
         "--data.test_size", "0", "--trainer.max_epochs", epochs, "--model.lr_schedule.restarts", "[]",
         *csv_logger("logs")],
        folder / "pretrain-run", in_process=smoke,
    )  # fmt: skip
    pretrained = str((folder / "pretrain-run" / best_checkpoint(output)).resolve())
    validations = [r for r in metrics(folder / "pretrain-run" / "logs") if "val_acc" in r]
    result: dict = {"pretrain_val_acc": validations[-1]["val_acc"], "pretrain_epochs": int(epochs)}
    for n in shots:
        result |= finetune(root, folder, base, pretrained, n, val, test, smoke)
    return result


def finetune(root: Path, folder: Path, base: list[str], pretrained: str, shots: int, val: int, test: int,
             smoke: bool) -> dict[str, float]:  # fmt: skip
    """Test accuracy after fine-tuning on `shots` images per class from scratch and from `pretrained`."""
    _, finetune_root = folders(root, folder, shots, val, test)
    result = {}
    for start, extra in (("scratch", []), ("pretrained", ["--model.init_from", pretrained])):
        run = folder / f"{start}-{shots}"
        args = [*base, "--data.root", str(finetune_root), *FINETUNE, "--trainer.max_epochs", "2" if smoke else "40"]
        _, output = cifar_cli(["fit", *args, *extra, *csv_logger("logs")], run, in_process=smoke)
        evaluate = ["test", *args, "--ckpt_path", best_checkpoint(output), *csv_logger("test")]
        cifar_cli(evaluate, run, in_process=smoke)
        result[f"{start}_{shots}"] = metrics(run / "test")[-1]["test_acc"]
    return result
