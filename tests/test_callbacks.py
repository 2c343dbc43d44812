"""Callbacks: the W&B image logger without W&B, hooks called only where implemented, the progress bar.
(Predictions gathered from several DDP processes: test_ddp.py.)"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_process_world
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer import call

from cifar_cli import hooks
from cifar_cli.callbacks import RichBar, drop_logger_only, last_checkpoint, model_checkpoint
from cifar_cli.classifier import ImageClassifier
from cifar_cli.cli import main
from cifar_cli.data import ImageFolderDataModule
from cifar_cli.nets import TutorialCNN

REPO = Path(__file__).resolve().parents[1]


def test_default_wandb_callbacks_say_nothing_without_wandb(image_folder: Path, capsys) -> None:
    """The README's `--trainer.logger CSVLogger`: the default callbacks that log only to W&B idle without a word. A
    user who did not ask for them was told at every run that they did nothing."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "2", "--trainer.logger", "CSVLogger"])  # fmt: skip
    lines = capsys.readouterr().err.splitlines()
    assert not [line for line in lines if "does nothing" in line]
    assert not any("UserWarning" in line for line in lines)
    assert not Path("runs/wandb").exists()


def test_a_wandb_callback_the_user_listed_says_once_that_it_does_nothing_without_wandb(
    image_folder: Path, capsys
) -> None:
    """One added with `+=` beside the defaults, or listed in a config (the fast recipes), is asked for: one line
    each, once per run."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "3", "--trainer.logger", "CSVLogger",
          "--trainer.callbacks+=cifar_cli.callbacks.ImagePredictionLogger"])  # fmt: skip
    idle = [line for line in capsys.readouterr().err.splitlines() if "does nothing" in line]
    assert idle == ["cifar-cli: ImagePredictionLogger does nothing: it logs to W&B and the trainer has no WandbLogger"]
    Path("listed.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: cifar_cli.callbacks.ImagePredictionLogger\n"
        "    - class_path: cifar_cli.dashboard.ModelArtifacts\n"
    )
    main(["fit", "--config", "listed.yaml", "--data", "ImageFolderDataModule", "--data.root", str(image_folder),
          "--data.val_size", "30", "--trainer.max_epochs", "2", "--trainer.logger", "CSVLogger"])  # fmt: skip
    idle = [line for line in capsys.readouterr().err.splitlines() if "does nothing" in line]
    assert idle == [
        "cifar-cli: ImagePredictionLogger does nothing: it logs to W&B and the trainer has no WandbLogger",
        "cifar-cli: ModelArtifacts does nothing: it logs to W&B and the trainer has no WandbLogger",
    ]


def test_debug_config_stacked_on_a_recipe_drops_the_learning_rate_monitor_and_trains(
    image_folder: Path, capsys
) -> None:
    """configs/debug.yaml sets no logger; fast-cpu.yaml's LearningRateMonitor needs one. Lightning refused the run
    once it had started (config.yaml written); the monitor is left out instead, with one notice."""
    stack = [
        arg for name in ("cifar10-jpg", "fast-cpu", "debug") for arg in ("--config", f"{REPO}/configs/{name}.yaml")
    ]
    main(["fit", *stack, "--data.root", str(image_folder), "--data.val_size", "30", "--data.test_size", "0",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])  # fmt: skip
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "LearningRateMonitor" in line] == [
        "cifar-cli: LearningRateMonitor does nothing: it logs to the trainer's loggers and the trainer has none"
    ]
    assert not [line for line in lines if "error" in line]
    assert list(Path("runs/debug/checkpoints").glob("epoch=0-step=*.ckpt"))


def test_a_callback_added_with_the_state_of_a_default_one_replaces_it(image_folder: Path, capsys) -> None:
    """`+=EarlyStopping` on val_loss, the default EarlyStopping's metric, to give it another patience: Lightning
    refused two callbacks with one state key in a traceback. The later one replaces the earlier, with a line."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.callbacks+=EarlyStopping",
          "--trainer.callbacks.monitor", "val_loss", "--trainer.callbacks.patience", "7"])  # fmt: skip
    assert capsys.readouterr().err.splitlines()[0] == (
        "cifar-cli: --trainer.callbacks lists EarlyStopping{'monitor': 'val_loss', 'mode': 'min'} twice: the later "
        "one's settings replace the earlier's"
    )
    states = torch.load("checkpoints/last.ckpt", weights_only=True)["callbacks"]
    stopping = [state for key, state in states.items() if key.startswith("EarlyStopping")]
    assert [state["patience"] for state in stopping] == [7]
    # config.yaml lists what ran, in the order it ran: a run from it has nothing to replace.
    listed = yaml.safe_load(Path("config.yaml").read_text())["trainer"]["callbacks"]
    stops = [i for i, c in enumerate(listed) if c["class_path"].endswith("EarlyStopping")]
    assert len(stops) == 1 and stops[0] < len(listed) - 1 and listed[stops[0]]["init_args"]["patience"] == 7
    main(["fit", "--config", "config.yaml", "--trainer.max_epochs", "1"])
    assert "twice" not in capsys.readouterr().err


def test_a_learning_rate_monitor_added_to_a_recipe_that_has_one_runs_once(image_folder: Path, capsys) -> None:
    """fast-cpu.yaml lists a LearningRateMonitor; `--trainer.callbacks+=LearningRateMonitor` added a second: both
    ran, every learning rate was logged twice (two rows a step in metrics.csv) and config.yaml listed both. The
    added one replaces the recipe's, with the line of any callback listed twice."""
    main(["fit", "--config", f"{REPO}/configs/fast-cpu.yaml", "--trainer.callbacks+=LearningRateMonitor",
          "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--data.batch_size", "16", "--model.net.init_args.widths", "[8, 16, 16]", "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps",
          "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "CSVLogger",
          "--trainer.logger.save_dir", "runs"])  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if "LearningRateMonitor" in line]
    assert lines == ["cifar-cli: --trainer.callbacks lists LearningRateMonitor twice: the later one's settings "
                     "replace the earlier's"]  # fmt: skip
    (run,) = Path("runs").glob("version_*")
    listed = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["callbacks"]
    assert [c["init_args"] for c in listed if c["class_path"].endswith(".LearningRateMonitor")] == [
        {"logging_interval": None, "log_momentum": False, "log_weight_decay": False}
    ]
    with open(run / "metrics.csv") as file:
        steps = [row["step"] for row in csv.DictReader(file) if any(row[k] for k in row if k.startswith("lr-"))]
    assert steps == ["0", "1", "2"]


def test_learning_rate_monitor_stays_where_the_trainer_has_a_logger(capsys) -> None:
    monitor = LearningRateMonitor()
    trainer = Trainer(logger=CSVLogger("runs"), callbacks=[monitor], enable_progress_bar=False)
    drop_logger_only(trainer, training=True)
    assert monitor in trainer.callbacks
    trainer = Trainer(logger=False, callbacks=[monitor], enable_progress_bar=False)
    drop_logger_only(trainer, training=False)  # validate, test, predict: never used, no notice
    assert monitor not in trainer.callbacks and "LearningRateMonitor" not in capsys.readouterr().err


class Recorder(Callback):
    """Records every per-step hook call it gets, in order, into a shared list."""

    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def on_train_batch_start(self, *args) -> None:
        self.calls.append((self.name, "on_train_batch_start"))

    def on_before_backward(self, *args) -> None:
        self.calls.append((self.name, "on_before_backward"))

    def on_train_batch_end(self, *args) -> None:
        self.calls.append((self.name, "on_train_batch_end"))


def fit_with(callbacks: list[Callback], image_folder: Path, model: ImageClassifier | None = None, **trainer_args):
    """Fit a TutorialCNN classifier (or `model`) on the image folder for 3 steps, quietly; returns the trainer."""
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=16)
    model = model or ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    trainer = Trainer(**{"max_steps": 3, **trainer_args}, callbacks=callbacks, accelerator="cpu", **quiet)
    trainer.fit(model, data)
    return trainer


def test_hooks_reach_the_callbacks_that_implement_them_in_lightnings_order(image_folder: Path) -> None:
    def run(function) -> list:
        calls: list = []
        one_off = Callback()  # implements a hook on the instance, not the class
        one_off.on_after_backward = lambda *args: calls.append(("one-off", "on_after_backward"))
        installed, call._call_callback_hooks = call._call_callback_hooks, function
        try:
            fit_with([Recorder(calls, "first"), Callback(), one_off, Recorder(calls, "second")], image_folder)
        finally:
            call._call_callback_hooks = installed
        return calls

    lightning, ours = run(hooks._ORIGINAL), run(hooks._call_callback_hooks)
    assert ours == lightning and len(ours) == 3 * 7  # 3 steps, 7 calls a step
    assert hooks.implementers([Callback(), Recorder([], "r")], "on_train_batch_end")[0].name == "r"


def test_install_keeps_lightnings_function_if_its_parameters_differ(monkeypatch) -> None:
    monkeypatch.setattr(call, "_call_callback_hooks", hooks._ORIGINAL)
    monkeypatch.setattr(hooks, "_ORIGINAL", lambda trainer, hook_name, *args, **kwargs: None)
    assert hooks.install() is False and call._call_callback_hooks is not hooks._call_callback_hooks


def test_progress_bar_reads_the_metrics_at_most_once_an_interval(image_folder: Path, monkeypatch) -> None:
    reads: list[int] = []
    real = RichBar._update_metrics

    def counted(self, trainer, pl_module, *args, **kwargs) -> None:  # Lightning 2.6.0 passes current, total_batches
        reads.append(trainer.global_step)
        real(self, trainer, pl_module, *args, **kwargs)

    monkeypatch.setattr(RichBar, "_update_metrics", counted)
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=4)
    model = ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
    trainer = Trainer(max_epochs=1, limit_val_batches=0, callbacks=[RichBar(metrics_interval=3600)], logger=False,
                      enable_checkpointing=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, data)
    steps = trainer.global_step
    assert steps >= 10 and reads.count(1) == 1 and len(reads) <= 3  # the first step, and the epoch's end


def test_progress_bar_counts_epochs_from_one_as_every_line_does(image_folder: Path, monkeypatch) -> None:
    """The bar's `Epoch 1/2`, `Epoch 2/2` (Lightning's reads `Epoch 0/1`, `Epoch 1/1`), as the epoch lines, the
    stop line and the resume line count."""
    shown: list[str] = []
    real = RichBar._get_train_description
    monkeypatch.setattr(
        RichBar, "_get_train_description", lambda self, epoch: shown.append(real(self, epoch)) or shown[-1]
    )
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=4)
    model = ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
    trainer = Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[RichBar()], logger=False,
                      enable_checkpointing=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, data)
    assert [s.rstrip() for s in dict.fromkeys(shown)] == ["Epoch 1/2", "Epoch 2/2"]
    assert {len(s) for s in shown} == {len("Validation")}  # padded as Lightning's, so the bars do not shift


def test_progress_bar_shows_a_csv_loggers_version_as_a_whole_number(image_folder: Path, tmp_path: Path) -> None:
    """Lightning's rich bar formats every number it shows as a metric: a CSVLogger's version 3 read `v_num: 3.000`."""
    shown: list[str] = []

    class Shown(RichBar):
        def _update_metrics(self, trainer: Trainer, pl_module, *args, **kwargs) -> None:  # Lightning 2.6.0's args
            super()._update_metrics(trainer, pl_module, *args, **kwargs)
            shown.extend(self._metric_component._generate_metrics_texts())

    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=4)
    model = ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[Shown()],
                      logger=CSVLogger(tmp_path, version=3), enable_checkpointing=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, data)
    assert "v_num: 3" in shown and not any(text.startswith("v_num: 3.") for text in shown)
    assert any(text.startswith("train_loss_step: ") and "." in text for text in shown)  # metrics keep their format


def test_cuda_check_answers_without_nvml_only_where_no_gpu_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's NVML-based CUDA check goes where no GPU answers (it reloads NVML at every Adam step on a CPU);
    where one does, it stays, so that nothing initialises CUDA before a fork."""
    monkeypatch.setenv(hooks.NVML_CHECK, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hooks.plain_cuda_check_without_gpu()
    assert os.environ[hooks.NVML_CHECK] == "1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hooks.plain_cuda_check_without_gpu()
    assert hooks.NVML_CHECK not in os.environ


class HookRecorder(ImageClassifier):
    """Records the module hooks Lightning calls, with the `_current_fx_name` each one sees; one override is empty."""

    def __init__(self, calls: list) -> None:
        super().__init__(TutorialCNN(3), class_names=["cat", "dog", "frog"])
        self.calls = calls

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.calls.append(("on_train_batch_start", self._current_fx_name))

    def on_before_backward(self, loss) -> None:
        self.calls.append(("on_before_backward", self._current_fx_name))

    def on_after_backward(self) -> None:
        """Overridden, and empty: there is nothing to call."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.calls.append(("on_before_optimizer_step", self._current_fx_name))


def test_module_and_strategy_hooks_run_as_lightnings_own_dispatch_runs_them(image_folder: Path) -> None:
    def run(module_hook, strategy_hook) -> tuple[list, torch.Tensor]:
        calls: list = []
        installed = call._call_lightning_module_hook, call._call_strategy_hook
        call._call_lightning_module_hook, call._call_strategy_hook = module_hook, strategy_hook
        try:
            torch.manual_seed(0)
            model = HookRecorder(calls)
            fit_with([], image_folder, model)
        finally:
            call._call_lightning_module_hook, call._call_strategy_hook = installed
        return calls, model.net.fc3.weight.detach().clone()

    lightning, lightning_weights = run(hooks._ORIGINAL_MODULE_HOOK, hooks._ORIGINAL_STRATEGY_HOOK)
    ours, our_weights = run(hooks._call_lightning_module_hook, hooks._call_strategy_hook)
    assert ours == lightning and len(ours) == 3 * 3
    assert all(hook == fx_name for hook, fx_name in ours)  # each hook sees its own name, for self.log's checks
    assert torch.equal(our_weights, lightning_weights)


def test_with_a_profiler_every_module_hook_is_called_and_timed(image_folder: Path) -> None:
    assert hooks.install() and call._call_lightning_module_hook is hooks._call_lightning_module_hook
    trainer = fit_with([], image_folder, max_steps=2, profiler="simple")
    timed = trainer.profiler.recorded_durations
    assert len(timed["[LightningModule]ImageClassifier.on_before_backward"]) == 2  # empty, timed all the same
    assert len(timed["[Strategy]SingleDeviceStrategy.training_step"]) == 2


def test_does_nothing_tells_empty_methods_from_the_rest() -> None:
    class Hooks:
        def documented(self):
            """Only a docstring."""

        def passes(self, x):
            pass

        def returns_none(self):
            return None

        def returns_one(self):
            return 1

        def returns_its_argument(self, batch):
            return batch

        def generator(self):
            return
            yield

        async def coroutine(self):
            pass

    empty = [name for name in vars(Hooks) if not name.startswith("_") and hooks.does_nothing(getattr(Hooks(), name))]
    assert empty == ["documented", "passes", "returns_none"]
    assert not hooks.does_nothing(print) and not hooks.does_nothing(lambda: 0) and hooks.does_nothing(lambda: None)


def test_signature_answers_are_lightnings_and_read_once(monkeypatch) -> None:
    from lightning.pytorch.utilities import signature_utils

    class Steps:
        def with_index(self, batch, batch_idx): ...

        def without_index(self, batch): ...

        def variadic(self, *args): ...

    reads: list = []
    real = signature_utils.inspect.getfullargspec
    monkeypatch.setattr(signature_utils.inspect, "getfullargspec", lambda fn: reads.append(fn) or real(fn))
    for name in ("with_index", "without_index", "variadic"):
        method = getattr(Steps(), name)
        for explicit, min_args in ((False, 2), (True, None)):
            expected = hooks._ORIGINAL_SIGNATURE_CHECK(method, "batch_idx", explicit, min_args)
            reads.clear()
            for _ in range(3):
                assert (
                    hooks.is_param_in_hook_signature(getattr(Steps(), name), "batch_idx", explicit, min_args)
                    is expected
                )
            assert len(reads) <= 1
    assert hooks.is_param_in_hook_signature(Steps().with_index, "batch_idx", min_args=2) is True
    assert hooks.is_param_in_hook_signature(Steps().without_index, "batch_idx", min_args=2) is False


class CountedItems(torch.Tensor):
    """A tensor that counts the `.item()` calls made on tensors of its kind."""

    items = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.item:
            cls.items += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_progress_bar_value_is_converted_to_a_number_once() -> None:
    CountedItems.items = 0
    value = torch.tensor(2.5).as_subclass(CountedItems)
    assert [hooks.convert_tensors_to_scalars(value.detach()) for _ in range(3)] == [2.5, 2.5, 2.5]
    assert CountedItems.items == 1
    value.add_(1)  # changed in place: converted again
    assert hooks.convert_tensors_to_scalars(value.detach()) == 3.5 and CountedItems.items == 2
    other = torch.tensor(3.5).as_subclass(CountedItems)  # the same number in another tensor: converted
    assert hooks.convert_tensors_to_scalars(other) == 3.5 and CountedItems.items == 3
    assert hooks.convert_tensors_to_scalars({"a": torch.tensor(1.0)}) == {"a": 1.0}  # anything else: Lightning's
    with torch.inference_mode():  # no version counter to tell a change by: converted each time
        made_in_inference = torch.tensor(4.5).as_subclass(CountedItems)
    assert [hooks.convert_tensors_to_scalars(made_in_inference) for _ in range(2)] == [4.5, 4.5]
    assert CountedItems.items == 5


def test_steps_that_log_nothing_convert_no_progress_bar_value(image_folder: Path, monkeypatch) -> None:
    """Lightning converts every prog_bar metric after every batch, logged or not; on a GPU each conversion waits for
    the GPU. With log_every_n_steps 4 the model logs values at 3 of the epoch's 12 steps: only then are they
    converted."""
    from lightning.pytorch.trainer.connectors.logger_connector import result

    def run(conversion) -> tuple[list[int], dict]:
        steps: list[int] = []  # the step after which each conversion came
        original = hooks._ORIGINAL_TO_SCALARS
        monkeypatch.setattr(
            hooks, "_ORIGINAL_TO_SCALARS", lambda data: steps.append(trainer.global_step) or original(data)
        )
        monkeypatch.setattr(result, "convert_tensors_to_scalars", conversion)
        torch.manual_seed(0)
        data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=6)
        model = ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
        quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        trainer = Trainer(max_epochs=1, limit_train_batches=12, log_every_n_steps=4, limit_val_batches=0,
                          accelerator="cpu", enable_model_summary=False, **quiet)  # fmt: skip
        trainer.fit(model, data)
        return steps, trainer.progress_bar_metrics

    lightnings, lightning_bar = run(lambda data: hooks._ORIGINAL_TO_SCALARS(data))
    ours, our_bar = run(hooks.convert_tensors_to_scalars)
    assert our_bar == lightning_bar and {"train_loss_step", "train_acc_step", "train_loss_epoch"} <= set(our_bar)
    assert set(lightnings) == set(range(4, 13))  # after every step from the first with values (step 3)
    assert set(ours) == {4, 8, 12}  # after the logged steps 3, 7 and 11 (and the epoch's end)
    assert ours.count(4) == ours.count(8) == 2  # the two prog_bar metrics, once each


def test_last_checkpoint_broadcasts_nothing_a_step_in_a_world_of_one(image_folder: Path, monkeypatch) -> None:
    """configs/ddp.yaml on a machine with one GPU runs DDP in one process: LastCheckpoint's time check, read every
    step there, broadcast rank 0's verdict every step (under NCCL a pickled object through the GPU and back: a wait
    for the GPU each step) to a world of one, where there is no other rank to tell."""
    from lightning.pytorch.strategies import DDPStrategy

    from cifar_cli.callbacks import LastCheckpoint

    class Steps(Callback):
        """Marks the epoch's steps: from its first batch's start to the epoch's end."""

        stepping = False

        def on_train_batch_start(self, *args) -> None:
            self.stepping = True

        def on_train_epoch_end(self, *args) -> None:
            self.stepping = False

    steps = Steps()
    broadcast_at: list[int] = []  # the step after which each broadcast within the epoch's steps came
    original = DDPStrategy.broadcast

    def broadcast(self, obj, src=0):
        if steps.stepping:
            broadcast_at.append(self.lightning_module.trainer.global_step)
        return original(self, obj, src)

    monkeypatch.setattr(DDPStrategy, "broadcast", broadcast)
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=8)
    model = ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
    trainer = Trainer(max_epochs=1, limit_val_batches=0, accelerator="cpu", devices=1, strategy="ddp", logger=False,
                      callbacks=[steps, LastCheckpoint(every_n_minutes=10)], enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir="run")  # fmt: skip
    with one_process_world():
        trainer.fit(model, data)
    assert trainer.global_step == 11  # 90 images, batch 8
    assert broadcast_at == []


def test_whitening_filters_reach_the_ranks_in_one_broadcast_from_host_memory(image_folder: Path, monkeypatch) -> None:
    """FastNet's whitening filters, fitted at the start of a fit, are rank 0's on every rank: one broadcast of the
    network's tensors, copied to host memory first. Broadcast one by one as they were, on GPUs, each was pickled from
    its GPU and unpickled onto the same GPU number on every rank (rank 1 made a CUDA context on rank 0's GPU)."""
    from lightning.pytorch.strategies import DDPStrategy

    from cifar_cli.nets import FastNet

    sent: list = []  # what each broadcast during on_fit_start was given
    original = DDPStrategy.broadcast

    def broadcast(self, obj, src=0):
        sent.append(obj)
        return original(self, obj, src)

    class Sent(Callback):
        def on_fit_start(self, *args) -> None:
            sent.clear()  # (the broadcasts before: Lightning's, of folder names)

        def on_train_start(self, *args) -> None:
            sent.append("train starts")

    monkeypatch.setattr(DDPStrategy, "broadcast", broadcast)
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=8)
    model = ImageClassifier(FastNet(3, widths=(8, 8, 8)), class_names=["cat", "dog", "frog"])
    trainer = Trainer(max_steps=1, limit_val_batches=0, accelerator="cpu", devices=1, strategy="ddp", logger=False,
                      callbacks=[Sent()], enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # fmt: skip
    with one_process_world():
        trainer.fit(model, data)
    state, started, *_ = sent
    assert started == "train starts" and state.keys() == model.net.state_dict().keys()
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    assert torch.equal(state["whiten.weight"], model.net.whiten.weight)


def test_the_summary_reads_model_checkpoints_past_a_checkpoint_of_another_kind(tmp_path: Path) -> None:
    """A user's own Checkpoint (Lightning's base class: no best or last path) listed first is what Lightning's
    `trainer.checkpoint_callback` returns; the summary read its `best_model_path` and `last_model_path`, and
    failed with an AttributeError after training."""
    saver = ModelCheckpoint(dirpath=tmp_path)
    saver.last_model_path = str(tmp_path / "last.ckpt")
    trainer = Trainer(callbacks=[Checkpoint(), saver], logger=False, enable_progress_bar=False)
    assert model_checkpoint(trainer) is saver
    assert last_checkpoint(trainer) == str(tmp_path / "last.ckpt")
