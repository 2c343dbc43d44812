"""ImageClassifier: loss on logits, one metric per stage, predictions, optimizer."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import faults
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins import MixedPrecision
from test_cli import CSV_LOGGER, REPO, cifar_args, metrics_rows, values
from test_resume import FAST, cifar
from torch import nn

from cifar_cli.classifier import ImageClassifier
from cifar_cli.cli import main
from cifar_cli.nets import FastNet, TutorialCNN
from cifar_cli.optim import WarmupLinearDecay, param_groups


def make(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(TutorialCNN(num_classes=3), class_names=["a", "b", "c"], **kwargs)


def test_one_metric_object_per_stage() -> None:
    model = make()
    metrics = [model.train_acc, model.val_acc, model.test_acc, model.train_loss, model.val_loss, model.test_loss]
    assert len({id(m) for m in metrics}) == 6


def test_training_loss_is_cross_entropy_on_logits() -> None:
    model = make(label_smoothing=0.1)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    loss = model.training_step((images, labels), 0)
    expected = F.cross_entropy(model(images), labels, label_smoothing=0.1)
    assert torch.allclose(loss, expected)
    assert model.train_acc.update_count == 1 and model.val_acc.update_count == 0
    assert torch.allclose(model.train_loss.compute(), expected) and model.val_loss.update_count == 0


def test_predict_step_gives_class_confidence_and_label() -> None:
    model = make().eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, -1])
    out = model.predict_step((images, labels, torch.tensor([5, 6, 7, 8])), 0)
    probabilities = model(images).softmax(1)
    assert torch.equal(out["predicted"], probabilities.argmax(1))
    assert torch.allclose(out["confidence"], probabilities.max(1).values)
    assert torch.equal(out["label"], labels) and out["index"].tolist() == [5, 6, 7, 8]


def test_default_optimizer_is_adam_with_learning_rate() -> None:
    optimizer = make(learning_rate=1e-3).configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("bf16-mixed", True), ("16-mixed", None)])
def test_optimizer_is_fused_except_under_a_loss_scaler(precision: str, fused: bool | None) -> None:
    # 16-mixed scales the loss: Lightning unscales the gradients before clipping them, unless the optimizer says
    # it unscales them itself, as a fused one does; so that clipping and gradient plots see true gradients, no
    # fused optimizer there.
    model = make()
    # On a CPU Lightning turns 16-mixed into bf16-mixed; the plugin, as a GPU run would build it, keeps the scaler.
    chosen = {"plugins": [MixedPrecision(precision, "cpu")]} if precision == "16-mixed" else {"precision": precision}
    model.trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **chosen)
    optimizer = model.configure_optimizers()
    assert optimizer.defaults["fused"] is fused
    assert (getattr(model.trainer.precision_plugin, "scaler", None) is not None) == (precision == "16-mixed")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clipping_under_mixed_precision_trains(precision: str, fake_cifar10: Path) -> None:
    """The fast recipe with `--trainer.gradient_clip_val` (what a diverged run is told to try) under mixed
    precision, bf16-mixed being this CPU's default: Lightning refused to clip a fused optimizer's gradients at the
    first step, in a traceback."""
    main(["fit", *FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.logger", "false",
          "--trainer.precision", precision, "--trainer.gradient_clip_val", "1.0"])  # fmt: skip
    assert list(Path("checkpoints").glob("epoch=0-step=5*.ckpt"))


def test_fast_recipe_with_fewer_epochs_validates_at_its_end(fake_cifar10: Path) -> None:
    """configs/fast.yaml validates every 10th epoch, once at the end of its 10; with `--trainer.max_epochs 2` the run
    ended without a validation, a val_acc or a best checkpoint. The schedule's end validates, whatever the epoch."""
    fast = ["--config", str(REPO / "configs" / "fast.yaml"), "--trainer.accelerator", "cpu",
            "--model.net.init_args.widths", "[8, 16, 16]", "--data.batch_size", "32"]  # fmt: skip
    main(["fit", *fast, *cifar(fake_cifar10), "--trainer.max_epochs", "2", *CSV_LOGGER])
    assert [path.name for path in Path("runs").rglob("epoch=*.ckpt")] == ["epoch=1-step=10.ckpt"]
    rows = list(csv.DictReader(next(Path("runs").rglob("metrics.csv")).open()))
    assert [row["step"] for row in rows if row.get("val_acc")] == ["9"]


def test_any_network_can_be_injected() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    model = ImageClassifier(net, class_names=["x", "y"])
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 2)


def test_tta_averages_logits_over_flips_and_shifts() -> None:
    model = make(tta="flip").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        assert torch.allclose(model.evaluate(images), expected, atol=1e-5)
        model.hparams.tta = "flip-shift"
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :32, :32], padded[..., 2:, 2:]]
        shift_logits = sum(model(x) + model(x.flip(-1)) for x in shifted) / 4
        assert torch.allclose(model.evaluate(images), 0.5 * expected + 0.5 * shift_logits, atol=1e-5)
        model.hparams.tta = "none"
        assert torch.equal(model.evaluate(images), model(images))


def test_batchnorm_parameters_get_their_own_learning_rate() -> None:
    net = FastNet(widths=(8, 16))
    groups = param_groups(net, lr=0.5, weight_decay=1e-3, norm_lr_factor=64)
    norm_biases = {id(m.bias) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in groups[1]["params"]} == norm_biases  # frozen BatchNorm scales are in no group
    assert groups[1]["lr"] == 32 and groups[1]["weight_decay"] == 1e-3 / 64
    assert groups[0]["lr"] == 0.5 and all(p.requires_grad for p in groups[0]["params"])
    assert all(p is not net.whiten.weight for p in groups[0]["params"])  # frozen whitening filters
    # The decay per step, learning rate times weight decay, is the same in both groups.
    assert groups[0]["lr"] * groups[0]["weight_decay"] == groups[1]["lr"] * groups[1]["weight_decay"]


def test_warmup_linear_decay_schedule() -> None:
    schedule = WarmupLinearDecay(start=0.2, peak=0.25, end=0.1)
    assert [round(schedule(p), 6) for p in (0, 0.125, 0.25, 0.625, 1)] == [0.2, 0.6, 1.0, 0.55, 0.1]
    # A restart at 40%: each cycle has the same shape over its own length.
    cycles = WarmupLinearDecay(start=0.2, peak=0.25, end=0.1, restarts=(0.4,))
    assert [round(cycles(p), 6) for p in (0, 0.1, 0.4, 0.55, 1)] == [0.2, 1.0, 0.2, 1.0, 0.1]
    with pytest.raises(ValueError, match="increasing"):
        WarmupLinearDecay(restarts=(0.5, 0.3))


def test_optimizer_and_schedule_are_injected() -> None:
    from functools import partial

    sgd = partial(torch.optim.SGD, momentum=0.9, nesterov=True)
    model = make(learning_rate=0.4, weight_decay=5e-4, optimizer=sgd, lr_schedule=WarmupLinearDecay(0.2, 0.5, 0.0))
    model.trainer = type("FakeTrainer", (), {"estimated_stepping_batches": 10})()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [round(lr, 6) for lr in lrs] == [0.08, 0.144, 0.208, 0.272, 0.336, 0.4, 0.32, 0.24, 0.16, 0.08]
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4


def test_training_metrics_count_every_image_of_the_epoch_and_log_window_means(monkeypatch) -> None:
    # Three steps of an epoch of three, logging every 2 steps: the second (step 1 + 1 = 2) and the epoch's last log
    # their window's means; the first logs the metrics untouched, for their epoch values, and its window goes on to
    # the second. The epoch's values are the exact means over all 7 images, whatever was logged.
    model = make()
    logged: list[tuple[str, torch.Tensor | None]] = []
    monkeypatch.setattr(model, "log", lambda name, metric, **kwargs: logged.append((name, metric._forward_cache)))
    trainer = SimpleNamespace(num_training_batches=3, log_every_n_steps=2, global_step=0,
                              fit_loop=SimpleNamespace(_should_accumulate=lambda: False))  # fmt: skip
    model._trainer = trainer
    logits = [torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]]), torch.tensor([[2.0, 0, 0], [2.0, 0, 0]]),
              torch.tensor([[0, 0, 2.0], [0, 2.0, 0]])]  # fmt: skip
    labels = [torch.tensor([0, 1, 1]), torch.tensor([0, 2]), torch.tensor([2, 2])]
    losses = [F.cross_entropy(x, y, reduction="sum") for x, y in zip(logits, labels)]
    for step, (x, y) in enumerate(zip(logits, labels)):
        trainer.global_step = step
        model._train_metrics(F.cross_entropy(x, y), x, y, step)
    assert model.train_acc.compute().item() == pytest.approx(4 / 7)
    assert model.train_loss.compute().item() == pytest.approx(float(sum(losses)) / 7)
    # Logged: no step value at the first, then the mean over the images of steps 1 and 2 (3 of 5 right) and of
    # step 3 (1 of 2).
    assert [name for name, _ in logged] == ["train_loss", "train_acc"] * 3
    assert logged[:2] == [("train_loss", None), ("train_acc", None)]
    assert [float(value) for _, value in logged[3::2]] == pytest.approx([3 / 5, 1 / 2])
    window_losses = [float(losses[0] + losses[1]) / 5, float(losses[2]) / 2]
    assert [float(value) for _, value in logged[2::2]] == pytest.approx(window_losses)
    assert model._window_images == 0
    # Each rank keeps its own sums: a buffer would be overwritten with rank 0's by DDP before every step.
    assert not [name for name, _ in model.named_buffers() if "window" in name]


class BatchLosses(Callback):
    """Records every training batch's mean loss, undoing Lightning's division by `accumulate_grad_batches`."""

    seen: list[float] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        BatchLosses.seen = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, *args) -> None:
        BatchLosses.seen.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


def fit_in_batches_of_20(data: Path, *args: str) -> tuple[list[float], list[dict[str, str]]]:
    """`fit` of 8 batches of 20 an epoch with `args`, logging to CSV: every batch's loss (BatchLosses), and the
    metrics.csv rows that hold step values."""
    main(["fit", *cifar_args(data), *CSV_LOGGER, "--data.batch_size", "20", *args,
          "--trainer.callbacks+=test_classifier.BatchLosses"])  # fmt: skip
    return BatchLosses.seen, [row for row in metrics_rows("runs") if row["train_loss_step"]]


def test_logged_step_values_with_gradient_accumulation_cover_every_batch_since_the_last(fake_cifar10: Path) -> None:
    # 8 batches of 20, two to a step, logged every 2 steps: Lightning writes the values at the batch that ends
    # steps 2 and 4. Before, the batch before it logged too, and what was written was the last batch's loss alone.
    losses, rows = fit_in_batches_of_20(fake_cifar10, "--trainer.max_epochs", "1", "--trainer.accumulate_grad_batches",
                                        "2", "--trainer.log_every_n_steps", "2")  # fmt: skip
    assert len(losses) == 8
    assert [int(row["step"]) for row in rows] == [1, 3]
    assert float(rows[0]["train_loss_step"]) == pytest.approx(sum(losses[:4]) / 4, rel=1e-5)
    assert float(rows[1]["train_loss_step"]) == pytest.approx(sum(losses[4:]) / 4, rel=1e-5)
    assert values(metrics_rows("runs"), "train_loss_epoch") == [pytest.approx(sum(losses) / 8, rel=1e-5)]


def test_the_step_that_ends_the_schedule_writes_its_own_step_values(fake_cifar10: Path) -> None:
    # 8 steps logged every 3: Lightning also writes the step values at the step that stops training (the schedule's
    # end, here the 8th), whatever log_every_n_steps says. Before, those were step 6's again, written as step 8's.
    losses, rows = fit_in_batches_of_20(fake_cifar10, "--trainer.max_epochs", "1", "--model.lr_schedule",
                                        "WarmupLinearDecay", "--trainer.log_every_n_steps", "3")  # fmt: skip
    assert [int(row["step"]) for row in rows] == [2, 5, 7]
    assert float(rows[1]["train_loss_step"]) == pytest.approx(sum(losses[3:6]) / 3, rel=1e-5)
    assert float(rows[2]["train_loss_step"]) == pytest.approx(sum(losses[6:]) / 2, rel=1e-5)
    assert values(metrics_rows("runs"), "train_loss_epoch") == [pytest.approx(sum(losses) / 8, rel=1e-5)]


def test_a_time_limit_mid_epoch_writes_the_step_values_of_its_last_steps(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps of 1 s on a fake clock and a 5 s limit: the Timer stops training at the 5th of an epoch's 8 steps, which
    # Lightning writes whatever log_every_n_steps says. Before, it wrote the 3rd step's values again there.
    faults.CLOCK["now"] = 0.0
    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": faults.CLOCK["now"])
    losses, rows = fit_in_batches_of_20(fake_cifar10, "--trainer.max_epochs", "3", "--trainer.max_time",
                                        "00:00:00:05", "--trainer.log_every_n_steps", "3",
                                        "--trainer.callbacks+=faults.TickClock")  # fmt: skip
    assert len(losses) == 5
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert float(rows[1]["train_loss_step"]) == pytest.approx(sum(losses[3:]) / 2, rel=1e-5)
    assert values(metrics_rows("runs"), "train_loss_epoch") == [pytest.approx(sum(losses) / 5, rel=1e-5)]


def test_a_checkpoint_within_an_epoch_leaves_the_logged_step_values_whole(fake_cifar10: Path) -> None:
    # 8 steps, logged at the 4th and 8th, last.ckpt saved after the 3rd and 6th: the values written are the means
    # over steps 1 to 4 and 5 to 8. Before, each save emptied the sums of the steps since the last logged one into
    # the epoch's, and the values written were those of the 4th step alone, of the 7th and 8th.
    losses, rows = fit_in_batches_of_20(fake_cifar10, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "4",
                                        "--last_checkpoint.every_n_steps", "3")  # fmt: skip
    assert [int(row["step"]) for row in rows] == [3, 7]
    assert float(rows[0]["train_loss_step"]) == pytest.approx(sum(losses[:4]) / 4, rel=1e-5)
    assert float(rows[1]["train_loss_step"]) == pytest.approx(sum(losses[4:]) / 4, rel=1e-5)
    assert values(metrics_rows("runs"), "train_loss_epoch") == [pytest.approx(sum(losses) / 8, rel=1e-5)]


class InputSides(Callback):
    """Records (training?, side) of every batch the network sees."""

    seen: list[tuple[bool, int]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        InputSides.seen = []
        pl_module.net.register_forward_pre_hook(
            lambda net, args: InputSides.seen.append((net.training, args[0].shape[-1]))
        )


def test_progressive_resizing_trains_small_then_full_size_and_evaluates_at_full_size(fake_cifar10: Path) -> None:
    main(["fit", *FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "2", *CSV_LOGGER,
          "--model.low_res_side", "16", "--model.low_res_until", "0.5",
          "--trainer.callbacks+=test_classifier.InputSides"])  # fmt: skip
    # 10 steps: progress 0 to 0.4 at 16 px, then 32 px; validation (and the whitening fit) at 32 px.
    assert [side for training, side in InputSides.seen if training] == [16] * 5 + [32] * 5
    assert {side for training, side in InputSides.seen if not training} == {32}


class WhitenBias(Callback):
    """Records, after every training step, whether the whitening bias takes gradients, and its value."""

    seen: list[tuple[bool, torch.Tensor]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        WhitenBias.seen = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        bias = pl_module.net.whiten.bias
        WhitenBias.seen.append((bias.requires_grad, bias.detach().clone()))


def test_whitening_bias_trains_until_the_given_progress_then_stays(fake_cifar10: Path) -> None:
    main(["fit", *FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "2", *CSV_LOGGER,
          "--model.whiten_bias_until", "0.5", "--trainer.callbacks+=test_classifier.WhitenBias"])  # fmt: skip
    # 10 steps: progress 0 to 0.4 trains the bias, from step 5 (progress 0.5) on it is frozen.
    assert [trains for trains, _ in WhitenBias.seen] == [True] * 5 + [False] * 5
    biases = [bias for _, bias in WhitenBias.seen]
    assert all(not torch.equal(before, after) for before, after in zip(biases[:4], biases[1:5]))
    assert all(torch.equal(bias, biases[4]) for bias in biases[5:])


def test_progressive_resizing_and_whitening_bias_follow_a_time_budget_without_a_schedule(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps of exactly 1 s on a fake clock, a 20 s budget, epochs for 500 steps and a constant learning rate: the
    # budget is what ends training, so half of it is half of training. Before, progress counted the epochs' steps
    # without a schedule: every step of the run trained at 16 px and the bias was never frozen.
    faults.CLOCK["now"] = 0.0
    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": faults.CLOCK["now"])
    main(["fit", *FAST, *cifar(fake_cifar10), *CSV_LOGGER, "--model.lr_schedule", "null",
          "--trainer.max_epochs", "100", "--trainer.max_time", "00:00:00:20", "--trainer.callbacks+=faults.TickClock",
          "--model.low_res_side", "16", "--model.low_res_until", "0.5", "--model.whiten_bias_until", "0.5",
          "--trainer.callbacks+=test_classifier.InputSides",
          "--trainer.callbacks+=test_classifier.WhitenBias"])  # fmt: skip
    # The steps that fit the budget are estimated from step 10 on (BUDGET_MIN_STEPS): 20, so step 10 is halfway.
    assert [side for training, side in InputSides.seen if training] == [16] * 10 + [32] * 10
    assert [trains for trains, _ in WhitenBias.seen] == [True] * 10 + [False] * 10
