"""Learning-rate schedules as functions of training progress, the optimizer's parameter groups, and the optimizer.

A schedule here maps the fraction of training done (0 to 1) to a factor on the learning rate. Written by hand
because torch's schedulers are built with step counts, which the command line cannot know: the trainer derives
them from the epochs, the data and the batch size. A progress-based schedule fits any `max_epochs`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.optim import Optimizer

from cifar_cli.errors import UsageValueError


class LRSchedule:
    """A constant learning rate; subclasses shape it over training."""

    def __call__(self, progress: float) -> float:
        return 1.0


class WarmupLinearDecay(LRSchedule):
    """Linear warm-up from `start` to the full learning rate at `peak`, then linear decay to `end`.

    The fast recipe's triangle (airbench94: from 0.2 to 1 at 23% of the steps, then to 0.07). With `restarts`,
    the triangle starts over at each of those points of training, each cycle shaped the same over its own
    length: the model at the end of every cycle is a finished one (warm restarts, as in SGDR).

    Args:
        start: Factor on the learning rate at the first step of a cycle.
        peak: Fraction of a cycle at which the full learning rate is reached.
        end: Factor on the learning rate at the end of a cycle; its last step trains one step's decay above it,
            as airbench's schedule does.
        restarts: Fractions of training, increasing, at which a new cycle begins; none by default.
    """

    def __init__(
        self, start: float = 0.2, peak: float = 0.23, end: float = 0.07, restarts: tuple[float, ...] = ()
    ) -> None:
        # The flag in each message: it is the only way to this class from the command line, and a bare "peak" does
        # not say which of a run's settings is wrong.
        flag = "--model.lr_schedule"
        if not 0 <= peak <= 1:
            raise UsageValueError(
                f"{flag}.peak {peak}: a fraction of a cycle, from 0 to 1 (0.23: the full rate at 23%)"
            )
        for name, factor in (("start", start), ("end", end)):
            if factor < 0:  # a negative learning rate climbs the loss
                raise UsageValueError(f"{flag}.{name} {factor}: a factor on the learning rate, at least 0")
        bounds = [0.0, *restarts, 1.0]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise UsageValueError(
                f"{flag}.restarts {list(restarts)}: increasing fractions of training, each above 0 and below 1 "
                "([0.4]: a second cycle from 40% of training)"
            )
        self.start, self.peak, self.end = start, peak, end
        self.bounds = bounds

    def __call__(self, progress: float) -> float:
        # The cycle that `progress` falls in, and how far into it.
        cycle = max(i for i, b in enumerate(self.bounds[:-1]) if progress >= b) if progress > 0 else 0
        low, high = self.bounds[cycle], self.bounds[cycle + 1]
        x = (progress - low) / (high - low)
        if x < self.peak:
            return self.start + (1 - self.start) * x / self.peak
        return 1 + (self.end - 1) * (x - self.peak) / max(1 - self.peak, 1e-12)


def param_groups(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    norm_lr_factor: float,
    backbone: nn.Module | None = None,
    backbone_lr_factor: float = 1.0,
) -> list[dict]:
    """Trainable parameters in groups: normalisation layers' (with `lr * norm_lr_factor`) and the rest, each split
    again into the backbone's (times `backbone_lr_factor`) and the head's when a backbone is given.

    A group's weight decay is divided by its factors, so the decay per step, which PyTorch's optimizers scale by
    the learning rate, stays that of the plain group. Empty groups (a frozen backbone) are left out.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in module.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups: list[dict] = []
    for in_backbone, part_factor in ((False, 1.0), (True, backbone_lr_factor)):
        for is_norm, norm_factor in ((False, 1.0), (True, norm_lr_factor)):
            params = [
                p
                for p in module.parameters()
                if p.requires_grad and (id(p) in backbone_ids) == in_backbone and (id(p) in norm_ids) == is_norm
            ]
            factor = part_factor * norm_factor
            if params:
                groups.append({"params": params, "lr": lr * factor, "weight_decay": weight_decay / factor})
    return groups


def build_optimizer(factory: Callable[..., Optimizer], groups: list[dict], unscaled_outside: bool = False) -> Optimizer:
    """`factory(groups)`, with torch's fused implementation where the optimizer has one and the user chose none.

    A fused optimizer updates all parameters of a step in one kernel. torch leaves it off by default
    (`fused=None`), and on a CPU its default is one loop over the parameters: Adam's step over the tutorial CNN
    took 4 to 9 ms there against 1 ms fused (2-core Xeon), a sixth to a third of the whole training step at batch
    32. Adam, AdamW, SGD and Adagrad have fused kernels on CPUs and CUDA GPUs. An implementation chosen on the
    command line (`--model.optimizer.fused false`, `--model.optimizer.foreach true`) is kept, and so is any
    optimizer without a `fused` argument. Not where the gradients must be unscaled outside the optimizer's step
    (`unscaled_outside`: under a loss scaler, 16-mixed on a GPU, or with gradient clipping under Lightning's mixed
    precision, which refuses to clip for a fused optimizer): a fused optimizer unscales them inside its step, after
    Lightning's gradient clipping and the callbacks that read the gradients.
    """
    optimizer = factory([dict(group) for group in groups])  # a copy: torch fills each group with the defaults
    defaults = optimizer.defaults
    chosen = defaults.get("fused") is not None or defaults.get("foreach") is not None
    if unscaled_outside or "fused" not in defaults or chosen or defaults.get("differentiable"):
        return optimizer
    try:
        return factory(groups, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return optimizer  # a parameter on a device or of a type without fused kernels: torch refuses it
