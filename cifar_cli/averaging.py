"""Lookahead, as the CIFAR-10 speed records use it: the network trains from slow weights that trail its own."""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


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
        peak: The decay at the end of training (airbench: 0.95 ** 5).
    """

    def __init__(self, every_n_steps: PositiveInt = 5, peak: float = 0.95**5) -> None:
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
            return progress(step)
        total = trainer.estimated_stepping_batches
        return min(step / total, 1.0) if total != float("inf") else 0.0

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self._done or self.slow is None:
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
