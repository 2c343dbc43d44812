"""Weight averaging: lookahead, as the CIFAR-10 speed records use it (the network trains from slow weights that
trail its own), and an exponential moving average that never makes the host wait for the GPU."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class Lookahead(Callback):
    """airbench94's lookahead: every `every_n_steps` optimizer steps the slow weights move toward the network's
    (`slow.lerp_(fast, 1 - decay)`) and the network goes on from them (`fast.copy_(slow)`); the step that ends
    training gives the network the slow weights themselves, so the last validation and checkpoint see them.

    `decay` grows with training progress p as `peak * p**3`: about 0 early on (plain training, while the weights
    still move fast), `peak` at the end. Progress is the LR schedule's (`ImageClassifier.progress`: of the steps,
    or of a `--trainer.max_time` budget), else the share of the steps the trainer expects. BatchNorm's running
    statistics are averaged too, as airbench does: they belong to the weights they were measured with.

    Not Lightning's WeightAveraging (EMAWeightAveraging): that one keeps an average beside the network, which
    trains on unchanged; here the network itself is pulled back. Resumes exactly: the slow weights are in the
    checkpoints.

    Args:
        every_n_steps: Optimizer steps between two updates (airbench: 5).
        peak: The decay at the end of training (airbench: 0.95 ** 5), from 0 to 1: above 1 the slow weights would
            move away from the network's, not toward them.
    """

    def __init__(self, every_n_steps: PositiveInt = 5, peak: ClosedUnitInterval = 0.95**5) -> None:
        self.every_n_steps = every_n_steps
        self.peak = peak
        self.slow: dict[str, Tensor] | None = None
        self._done = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, peak=self.peak)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow, "done": self._done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.slow, self._done = state_dict.get("slow"), bool(state_dict.get("done"))

    @staticmethod
    def _averaged(pl_module: LightningModule) -> dict[str, Tensor]:
        # Floating-point tensors only: BatchNorm's step counter is an integer.
        return {k: v for k, v in pl_module.state_dict().items() if torch.is_floating_point(v)}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.slow is None:  # a resumed run has them from its checkpoint
            self.slow = {k: v.detach().clone() for k, v in self._averaged(pl_module).items()}
        else:
            device = pl_module.device
            self.slow = {k: v.to(device) for k, v in self.slow.items()}

    def _progress(self, trainer: Trainer, pl_module: LightningModule, step: int) -> float:
        progress = getattr(pl_module, "progress", None)  # ImageClassifier's: its schedule's, time budget included
        if callable(progress):
            update = getattr(pl_module, "update_budget", None)  # the pace of this step too: the module's hook is later
            if callable(update):
                update()
            return progress(step)
        total = trainer.estimated_stepping_batches
        return min(step / total, 1.0) if total != float("inf") else 0.0

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        # A batch that only accumulates gradients (--trainer.accumulate_grad_batches) comes after the same step as
        # the one before it: updating again would pull BatchNorm's statistics of its forward pass back once more.
        if self._done or self.slow is None or trainer.fit_loop._should_accumulate():
            return
        progress = self._progress(trainer, pl_module, step)
        last = progress >= 1.0 or step >= trainer.max_steps > 0
        if not last and step % self.every_n_steps:
            return
        decay = 1.0 if last else self.peak * progress**3
        for name, fast in self._averaged(pl_module).items():
            slow = self.slow[name]
            slow.lerp_(fast, 1.0 - decay)
            fast.copy_(slow)
        self._done = last


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging (validation and checkpoints use an exponential moving average of the weights;
    the same arguments, the same checkpoints), with an update that never makes the host wait for the GPU.

    torch's `AveragedModel.update_parameters` reads its update count, a tensor on the model's device, as a Python
    bool at every update: on a GPU, a wait for all the work queued so far, so the host cannot queue the steps after
    it ahead of the GPU. Here the count is also kept on the host (read from the tensor once after a checkpoint is
    loaded), and the average moves with one `_foreach_lerp_` per dtype (torch's `get_ema_multi_avg_fn`) instead of
    two kernels per tensor. The averages equal Lightning's to float rounding (lerp against a weighted sum).

    Args:
        decay: Weight of the old average at each update, from 0 to 1 (Lightning's check of it was a traceback).
        update_every_n_steps: Optimizer steps between two updates.
        kwargs: The rest of EMAWeightAveraging's arguments (`device`, `use_buffers`, `update_starting_at_step`,
            `update_starting_at_epoch`).
    """

    def __init__(self, decay: ClosedUnitInterval = 0.999, update_every_n_steps: PositiveInt = 1, **kwargs: Any) -> None:
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps, **kwargs)
        self._kwargs.pop("avg_fn")
        if self._kwargs.get("multi_avg_fn") is None:
            self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None and not isinstance(self._average_model, HostCountedAveragedModel):
            # The average Lightning just made (a copy of the model), given the update below; built by Lightning so
            # that its set-up (device, configure_model) stays Lightning's.
            self._average_model.__class__ = HostCountedAveragedModel
            self._average_model.updates = 0  # a checkpoint loaded after this sets it from n_averaged


class HostCountedAveragedModel(AveragedModel):
    """AveragedModel that counts its updates on the host as well (`updates`), so that an update reads no tensor.
    Its state dict is AveragedModel's: `n_averaged` stays the count that checkpoints keep."""

    updates: int | None = None  # None: read n_averaged at the next update (after a checkpoint was loaded)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.updates = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """As AveragedModel's with a `multi_avg_fn` (EMA's), but deciding copy or average from `updates`."""
        if self.updates is None:
            self.updates = int(self.n_averaged)  # once per loaded checkpoint
        if self.use_buffers:
            averaged = list(itertools.chain(self.module.parameters(), self.module.buffers()))
            current = list(itertools.chain(model.parameters(), model.buffers()))
        else:
            averaged, current = list(self.parameters()), list(model.parameters())
        current = [c.detach().to(a.device) for a, c in zip(averaged, current, strict=True)]
        averaged = [a.detach() for a in averaged]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(averaged, current):
                group = groups.setdefault((a.device, a.dtype), ([], []))
                group[0].append(a)
                group[1].append(c)
            for (device, _), (a_group, c_group) in groups.items():
                self.multi_avg_fn(a_group, c_group, self.n_averaged.to(device))
        if not self.use_buffers:
            # As AveragedModel: without averaging them, the buffers follow the model's.
            for b_averaged, b_model in zip(self.module.buffers(), model.buffers(), strict=True):
                b_averaged.detach().copy_(b_model.detach().to(b_averaged.device))
        self.n_averaged += 1
        self.updates += 1
