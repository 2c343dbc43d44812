"""Lookahead: the network ends on the slow weights, and a resumed run ends exactly where the uninterrupted one did."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faults
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from test_cli import CSV_LOGGER, metrics_rows
from test_resume import EVERY_STEP, REPO, assert_identical, cifar, tensors
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cifar_cli.averaging import HostCountedAveragedModel
from cifar_cli.cli import main

# The default recipe (5 steps an epoch on the fake CIFAR-10, 2 epochs) with lookahead every 2 steps.
LOOKAHEAD = ["--trainer.callbacks+=cifar_cli.averaging.Lookahead", "--trainer.callbacks.every_n_steps", "2",
             "--trainer.enable_progress_bar", "false"]  # fmt: skip


def slow_weights(path: Path) -> dict[str, torch.Tensor]:
    (state,) = [v for k, v in torch.load(path, weights_only=True)["callbacks"].items() if k.startswith("Lookahead")]
    return state["slow"]


def test_lookahead_ends_on_the_slow_weights_and_resumes_exactly(fake_cifar10: Path, tmp_path: Path) -> None:
    args = ["fit", *cifar(fake_cifar10), *LOOKAHEAD, *EVERY_STEP, *CSV_LOGGER]
    os.chdir(tmp_path / "full" if (tmp_path / "full").mkdir() is None else tmp_path)
    main(args)
    full = {p.name: p.resolve() for p in Path("steps").glob("epoch=*.ckpt")}
    assert len(full) == 10
    last, middle = full["epoch=1-step=10.ckpt"], full["epoch=0-step=3.ckpt"]
    weights = torch.load(last, weights_only=True)["state_dict"]
    # After the last step the network is the slow weights; before it, the two differ (the network has moved on
    # since the last update at step 2).
    slow = slow_weights(last)
    assert slow.keys() == {k for k, v in weights.items() if torch.is_floating_point(v)}
    assert all(torch.equal(slow[k], weights[k]) for k in slow)
    before = torch.load(middle, weights_only=True)["state_dict"]
    assert not all(torch.equal(slow_weights(middle)[k], before[k]) for k in slow)
    # Resumed from step 3, between two updates: every later step equals the uninterrupted run's.
    os.chdir(tmp_path / "resumed" if (tmp_path / "resumed").mkdir() is None else tmp_path)
    main([*args, "--ckpt_path", str(middle)])
    for name in [f"epoch={(s - 1) // 5}-step={s}.ckpt" for s in range(4, 11)]:
        assert_identical(tensors(Path("steps") / name), tensors(full[name]))
        assert_identical(slow_weights(Path("steps") / name), slow_weights(full[name]))


def test_budget_config_validates_once_at_the_end_on_the_slow_weights(fake_cifar10: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(repo / "configs" / "fast-cpu.yaml"), "--config", str(repo / "configs" / "budget.yaml"),
          *cifar(fake_cifar10), "--model.net.init_args.widths", "[8, 16, 16]", "--data.batch_size", "32",
          "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false", *CSV_LOGGER])  # fmt: skip
    rows = metrics_rows("runs")
    validations = [row for row in rows if row.get("val_acc")]
    assert [int(row["step"]) for row in validations] == [14]  # 3 epochs of 5 steps: one validation, at the end
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    weights, slow = torch.load(last, weights_only=True)["state_dict"], slow_weights(last)
    assert all(torch.equal(slow[k], weights[k]) for k in slow)


def test_lookahead_without_a_schedule_follows_the_trainers_steps(fake_cifar10: Path) -> None:
    """With a constant learning rate the model's progress is the share of max_epochs' steps: the last step still
    hands the network the slow weights."""
    main(["fit", *cifar(fake_cifar10), *LOOKAHEAD, "--model.lr_schedule", "null", *CSV_LOGGER])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    weights, slow = torch.load(last, weights_only=True)["state_dict"], slow_weights(last)
    assert torch.load(last, weights_only=True)["global_step"] == 10
    assert all(torch.equal(slow[k], weights[k]) for k in slow)


class SlowUpdates(Callback):
    """Records, after every training batch, the step and whether lookahead's slow weights changed in it."""

    seen: list[tuple[int, bool]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        SlowUpdates.seen = []
        self.before: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        (lookahead,) = [c for c in trainer.callbacks if type(c).__name__ == "Lookahead"]
        changed = any(not torch.equal(v, self.before.get(k, v)) for k, v in lookahead.slow.items())
        SlowUpdates.seen.append((trainer.global_step, changed))
        self.before = {k: v.clone() for k, v in lookahead.slow.items()}


def test_lookahead_with_gradient_accumulation_updates_once_per_optimizer_step(fake_cifar10: Path) -> None:
    # FastNet (BatchNorm) with lookahead every 2 optimizer steps, 2 batches to a step: 10 batches, 5 steps. The slow
    # weights move at the batches that end steps 2 and 4 (at the last, 5, the network takes them as they are). Before,
    # the batch after steps 2 and 4, which steps nothing, moved them again, by BatchNorm's running statistics.
    main(["fit", "--config", str(REPO / "configs" / "fast-cpu.yaml"), *cifar(fake_cifar10),
          "--model.net.init_args.widths", "[8, 16, 16]", "--data.batch_size", "16", "--trainer.max_epochs", "1",
          "--trainer.accumulate_grad_batches", "2", *LOOKAHEAD, "--trainer.callbacks+=test_averaging.SlowUpdates",
          *CSV_LOGGER])  # fmt: skip
    steps = [step for step, _ in SlowUpdates.seen]
    assert steps == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert [step for step, changed in SlowUpdates.seen if changed] == [2, 4]


def ema_args(class_path: str) -> list[str]:
    return [f"--trainer.callbacks+={class_path}", "--trainer.callbacks.decay", "0.8",
            "--trainer.callbacks.update_every_n_steps", "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip


def test_ema_averages_as_lightnings_and_resumes_exactly(fake_cifar10: Path, tmp_path: Path) -> None:
    runs = {}
    for name, class_path in [("lightning", "lightning.pytorch.callbacks.EMAWeightAveraging"),
                             ("ours", "cifar_cli.averaging.EMA")]:  # fmt: skip
        os.chdir(tmp_path / name if (tmp_path / name).mkdir() is None else tmp_path)
        main(["fit", *cifar(fake_cifar10), *ema_args(class_path), *EVERY_STEP, *CSV_LOGGER])
        runs[name] = {p.name: p.resolve() for p in Path("steps").glob("epoch=*.ckpt")}
    assert len(runs["ours"]) == 10
    last = "epoch=1-step=10.ckpt"
    ours, lightnings = tensors(runs["ours"][last]), tensors(runs["lightning"][last])
    # The network trains the same; the averages (the checkpoint's weights) agree to float rounding.
    raw = [k for k in ours if k.startswith("raw.")]
    assert raw and all(torch.equal(ours[k], lightnings[k]) for k in raw)
    averaged = [k for k in ours if k.startswith("weights.") and torch.is_floating_point(ours[k])]
    assert all(torch.allclose(ours[k], lightnings[k], rtol=1e-5, atol=1e-6) for k in averaged)
    assert not all(torch.equal(ours[k], ours[k.replace("weights.", "raw.")]) for k in averaged)
    # Resumed from step 3 (the host count read back from the checkpoint): every later step as uninterrupted.
    os.chdir(tmp_path / "resumed" if (tmp_path / "resumed").mkdir() is None else tmp_path)
    main(["fit", *cifar(fake_cifar10), *ema_args("cifar_cli.averaging.EMA"), *EVERY_STEP, *CSV_LOGGER,
          "--ckpt_path", str(runs["ours"]["epoch=0-step=3.ckpt"])])  # fmt: skip
    for name in [f"epoch={(s - 1) // 5}-step={s}.ckpt" for s in range(4, 11)]:
        assert_identical(tensors(Path("steps") / name), tensors(runs["ours"][name]))


def test_ema_update_reads_no_tensor_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, reading a tensor's value on the host waits for all queued work; the update must not do it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 4))  # BatchNorm's running statistics and its integer step count move
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    ours.__class__, ours.updates = HostCountedAveragedModel, 0  # as cifar_cli.averaging.EMA.setup makes it

    def read(*args, **kwargs):
        raise AssertionError("a tensor read on the host")

    weights = [model[0].weight.detach() + i for i in range(3)]  # the network at three updates

    def update(averaged: AveragedModel, i: int) -> None:
        with torch.no_grad():
            model[0].weight.copy_(weights[i])
        averaged.update_parameters(model)

    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "__int__", "__float__", "__index__", "tolist"):
            patch.setattr(torch.Tensor, name, read)
        for i in range(3):
            update(ours, i)
        with pytest.raises(AssertionError, match="a tensor read on the host"):
            update(theirs, 0)  # torch's own update does read one (before it changes anything)
    for i in range(3):
        update(theirs, i)
    assert ours.updates == 3 and int(ours.n_averaged) == 3
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    # A loaded state's count is read back once, at the next update.
    ours.load_state_dict(theirs.state_dict())
    assert ours.updates is None
    ours.update_parameters(model)
    assert ours.updates == 4


def test_testing_an_ema_checkpoint_asks_for_no_callbacks(fake_cifar10: Path, tmp_path: Path, recwarn) -> None:
    # Lightning asks for the callbacks that wrote a checkpoint whenever the command lacks them. test, validate and
    # predict use its weights alone (EMA's average is the checkpoint's state_dict): `test --ckpt_path F` needs no
    # other flag. A resumed fit goes on with the callbacks' state, and there the request stays.
    os.chdir(tmp_path)
    main(["fit", *cifar(fake_cifar10), *ema_args("cifar_cli.averaging.EMA"), *EVERY_STEP, *CSV_LOGGER,
          "--trainer.max_epochs", "1"])  # fmt: skip
    asks = "callbacks used to create the checkpoint need to be provided"
    recwarn.clear()
    for stage in ("test", "validate", "predict"):
        main([stage, "--ckpt_path", "steps/last.ckpt", "--trainer.enable_progress_bar", "false"])
    assert not [w for w in recwarn if asks in str(w.message)]
    # With the fit's callbacks given too (its config passed again), Lightning warned at each that "the
    # WeightAveraging state cannot be restored": the state is the fit's to go on with; the weights are the average.
    for stage in ("test", "validate", "predict"):
        main([stage, "--ckpt_path", "steps/last.ckpt", *ema_args("cifar_cli.averaging.EMA"),
              "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert not [w for w in recwarn if "WeightAveraging state cannot be restored" in str(w.message)]
    main(["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false",
          "--trainer.max_epochs", "2", "--ckpt_path", "steps/last.ckpt"])  # fmt: skip
    assert [w for w in recwarn if asks in str(w.message)]


class SlowLastStep(Callback):
    """CLOCK steps of 0.9 s, the 18th of 4.8 s: a 20 s budget runs out at a step slower than the pace before it
    (and between two lookahead updates, which come every 5 steps)."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        faults.CLOCK["now"] += 4.8 if trainer.global_step == 17 else 0.9


def fit_to_a_budget_on_a_fake_clock(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch, budget: str, *args: str
) -> tuple[int, bool]:
    """configs/budget.yaml on the shrunk fast recipe with `--trainer.max_time budget`, its Timer reading CLOCK
    (which a callback in `args` moves): the last step, and whether the run ended on lookahead's slow weights."""
    faults.CLOCK["now"] = 0.0
    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": faults.CLOCK["now"])
    repo = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(repo / "configs" / "fast-cpu.yaml"), "--config", str(repo / "configs" / "budget.yaml"),
          *cifar(fake_cifar10), "--model.net.init_args.widths", "[8, 16, 16]", "--data.batch_size", "32",
          "--trainer.max_time", budget, "--trainer.enable_progress_bar", "false", *CSV_LOGGER, *args])  # fmt: skip
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    checkpoint, slow = torch.load(last, weights_only=True), slow_weights(last)
    return checkpoint["global_step"], all(torch.equal(slow[k], checkpoint["state_dict"][k]) for k in slow)


def test_a_time_budget_ends_on_the_slow_weights_when_its_last_step_is_slow(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The budget ends the run after step 18 (20.1 s), where the pace so far (0.9 s a step) promised 22 steps: the
    # network still ends on the slow weights, as budget.yaml says. Before, lookahead went by the pace before the
    # step and left the network on its fast weights.
    run = fit_to_a_budget_on_a_fake_clock(
        fake_cifar10, monkeypatch, "00:00:00:20", "--trainer.callbacks+=test_averaging.SlowLastStep"
    )
    assert run == (18, True)


def test_lookahead_without_a_schedule_follows_a_time_budget(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps of 1 s on a fake clock, a 12 s budget, a constant learning rate: the run ends on the slow weights.
    # Before, lookahead's progress counted the 500 steps of max_epochs: it pulled back by almost nothing, and the
    # run the budget stopped ended on the network's own weights.
    run = fit_to_a_budget_on_a_fake_clock(
        fake_cifar10, monkeypatch, "00:00:00:12", "--model.lr_schedule", "null", "--model.whiten_bias_until", "null",
        "--trainer.callbacks+=faults.TickClock",
    )  # fmt: skip
    assert run == (12, True)


def swa_state(path: Path) -> dict[str, Any]:
    (state,) = [v for k, v in torch.load(path, weights_only=True)["callbacks"].items() if k.startswith("Stochastic")]
    return state


def test_swa_resumed_within_its_annealing_goes_on_at_its_learning_rate(fake_cifar10: Path, tmp_path: Path) -> None:
    """StochasticWeightAveraging anneals the learning rate from the optimizer's own, epoch by epoch (SWALR, which
    it installs only at its first epoch): a run resumed there went on at the base rate, without a schedule."""
    args = ["fit", *cifar(fake_cifar10), "--model.net", "FastNet", "--model.net.widths", "[8, 16, 16]",
            "--model.learning_rate", "0.05", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=StochasticWeightAveraging", "--trainer.callbacks.swa_lrs", "0.005",
            "--trainer.callbacks.swa_epoch_start", "1", "--trainer.callbacks.annealing_epochs", "2",
            *EVERY_STEP, *CSV_LOGGER]  # fmt: skip
    os.chdir(tmp_path / "full" if (tmp_path / "full").mkdir() is None else tmp_path)
    main(args)
    full = {p.name: p.resolve() for p in Path("steps").glob("epoch=*.ckpt")}
    os.chdir(tmp_path / "resumed" if (tmp_path / "resumed").mkdir() is None else tmp_path)
    main([*args, "--ckpt_path", str(full["epoch=1-step=7.ckpt"])])  # the second epoch, SWA's first
    for name in [f"epoch={(s - 1) // 5}-step={s}.ckpt" for s in range(8, 17)]:
        assert_identical(tensors(Path("steps") / name), tensors(full[name]))
        averaged, expected = swa_state(Path("steps") / name), swa_state(full[name])
        assert averaged["n_averaged"] == expected["n_averaged"]
        assert_identical(averaged["average_model_state"], expected["average_model_state"])


def test_a_finished_swa_run_restarted_trains_nothing_and_keeps_its_files(fake_cifar10: Path, capsys) -> None:
    """The same command again after the run ended (a requeued job): its last.ckpt was saved in SWA's BatchNorm pass,
    which runs one batch fewer than Lightning counts for it, and so read as an epoch cut short. The restart went on
    with that pass's end: it saved last.ckpt again without SWA's average and added a row to metrics.csv."""
    args = ["fit", *cifar(fake_cifar10), "--model.net", "FastNet", "--model.net.widths", "[8, 16, 16]",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=StochasticWeightAveraging",
            "--trainer.callbacks.swa_lrs", "0.01", *CSV_LOGGER]  # fmt: skip
    main(args)
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    (metrics,) = Path("runs").glob("**/metrics.csv")
    before = last.read_bytes(), metrics.read_text()
    capsys.readouterr()
    main([*args, "--ckpt_path", "last"])
    assert "after its last epoch (2/2): nothing is left to train" in capsys.readouterr().err
    assert (last.read_bytes(), metrics.read_text()) == before
    assert swa_state(last)["n_averaged"] == 2


def test_a_finished_swa_run_given_more_epochs_is_refused(fake_cifar10: Path, capsys) -> None:
    """A finished run's last.ckpt holds SWA's average, BatchNorm statistics recomputed, in place of the trained
    weights, and Lightning counts the BatchNorm pass as an epoch: raised from 2 to 3 epochs, the restart trained
    nothing, ran the pass again and ended with "3 epochs and SWA BatchNorm pass". Refused in one line, before the
    run folder is touched; a checkpoint from before the pass trains on."""
    args = ["fit", *cifar(fake_cifar10), "--model.net", "FastNet", "--model.net.widths", "[8, 16, 16]",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=StochasticWeightAveraging",
            "--trainer.callbacks.swa_lrs", "0.01", "--model.lr_schedule", "null", *CSV_LOGGER]  # fmt: skip
    main([*args, "--trainer.max_epochs", "2"])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    (metrics,) = Path("runs").glob("**/metrics.csv")
    before = last.read_bytes(), metrics.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cifar-cli: error: --ckpt_path {last} was saved after StochasticWeightAveraging's ")
    assert (last.read_bytes(), metrics.read_text()) == before
