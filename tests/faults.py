"""Faults for the DDP tests, injected by class path (`--trainer.callbacks+=faults.FailOnRank`, tests/ on PYTHONPATH).

A callback, not a broken data set: every rank loads the same data, and the faults of interest are the ones that
only one rank sees (a bad batch in its shard, a process killed by the OOM killer or a user).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint


class FailOnRank(Callback):
    """Fails on one rank at the start of one training step; the other ranks go on into that step's all-reduce.

    Args:
        rank: Global rank that fails.
        step: Global step at whose start it fails.
        how: "raise" raises a ValueError; "hang" writes the process id to `pid_file` and sleeps, for the test to
            kill the process from outside.
        pid_file: Where "hang" writes the process id.
    """

    def __init__(self, rank: int = 1, step: int = 2, how: str = "raise", pid_file: str = "failing.pid") -> None:
        self.rank = rank
        self.step = step
        self.how = how
        self.pid_file = pid_file

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        if self.how == "raise":
            raise ValueError(f"bad batch {batch_idx} in this rank's shard")
        with open(self.pid_file + ".partial", "w") as file:
            file.write(str(os.getpid()))
        os.replace(self.pid_file + ".partial", self.pid_file)  # the test never reads a half-written id
        time.sleep(120)  # longer than the test waits: only the kill ends this process


class SignalAt(Callback):
    """Sends a signal to this process at a chosen point of training: before a training batch, or during a
    validation batch (or, in `test` and `predict`, a test or prediction batch). For the tests of the clean stop, at
    moments a timer could only hit by chance.

    Args:
        signum: The signal's number (15: SIGTERM, 2: SIGINT).
        epoch: The epoch it is sent in.
        batch: The training batch it is sent before; with `in_validation`, the validation batch it is sent in.
        in_validation: Send it during that epoch's validation instead of during training (in `test` and `predict`:
            during their batch `batch`).
        rank: Under DDP, the only rank that sends it (to its own process); None: every rank.
        twice: Send it twice in a row (a second Ctrl-C before the clean stop).
        parent: Send it to the process that started this one instead (under ddp_spawn: the spawning process).
        in_sanity_check: Send it during the sanity check's validation batch `batch` instead (before training).
        at_fit_end: Send it as fit ends instead (`on_fit_end`: after the trainer's teardown, before the summary).
        at_train_start: Send it as training starts instead (`on_train_start`, before Preemption's: after the sanity
            check, before training's signal handlers).
        at_setup: Send it in the callbacks' `setup` instead (the ranks joined, before the trainer's signal handlers).
    """

    def __init__(
        self,
        signum: int = 15,
        epoch: int = 0,
        batch: int = 0,
        in_validation: bool = False,
        rank: int | None = None,
        twice: bool = False,
        parent: bool = False,
        in_sanity_check: bool = False,
        at_fit_end: bool = False,
        at_train_start: bool = False,
        at_setup: bool = False,
    ) -> None:
        self.signum, self.epoch, self.batch, self.in_validation, self.rank = signum, epoch, batch, in_validation, rank
        self.twice, self.parent, self.in_sanity_check, self.at_fit_end = twice, parent, in_sanity_check, at_fit_end
        self.at_train_start, self.at_setup = at_train_start, at_setup
        self.sent = False

    def _send(self, trainer: Trainer, batch_idx: int, validating: bool) -> None:
        if self.at_fit_end or self.at_train_start or self.at_setup:
            return
        if self.in_sanity_check:
            due = trainer.sanity_checking and validating and batch_idx == self.batch
        else:
            due = not trainer.sanity_checking and trainer.current_epoch == self.epoch and batch_idx == self.batch
            due = due and validating == self.in_validation
        due = due and self.rank in (None, trainer.global_rank)
        if due and not self.sent:
            self.sent = True
            os.kill(os.getppid() if self.parent else os.getpid(), self.signum)
            if self.twice:
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._send(trainer, batch_idx, validating=False)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:  # fmt: skip
        self._send(trainer, batch_idx, validating=True)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.at_setup and self.rank in (None, trainer.global_rank):
            os.kill(os.getppid() if self.parent else os.getpid(), self.signum)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_train_start and self.rank in (None, trainer.global_rank):
            os.kill(os.getppid() if self.parent else os.getpid(), self.signum)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end and self.rank in (None, trainer.global_rank):
            os.kill(os.getppid() if self.parent else os.getpid(), self.signum)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:  # fmt: skip
        self._send(trainer, batch_idx, validating=True)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:  # fmt: skip
        self._send(trainer, batch_idx, validating=True)


class SignalAsTrainingEnds(Checkpoint):
    """Sends a signal to this process in `on_train_end`, after Preemption's: Lightning calls a Checkpoint's hooks
    after every other callback's. The moment from the end of training to the trainer's teardown.

    Args:
        signum: The signal's number.
    """

    def __init__(self, signum: int = 15) -> None:
        self.signum = signum

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        os.kill(os.getpid(), self.signum)


# Seconds on the fake clock that TickClock advances; a test points Lightning's Timer at it.
CLOCK = {"now": 0.0}


class TickClock(Callback):
    """Advances CLOCK by one second at the start of every training step: a run whose steps take exactly 1 s."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        CLOCK["now"] += 1.0


# What BlockingCollectives watches: torch.distributed's collectives, each also called by the others by module name.
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "reduce", "barrier", "broadcast_object_list",
               "all_gather_object")  # fmt: skip


class BlockingCollectives(Callback):
    """Notes the global step of every blocking collective (`async_op` not set) a rank calls while it trains,
    validations and sanity checks left out; writes them as JSON lines `{"step": N, "op": NAME}` to
    `{path}.{rank}` when training ends. Each is a point where a rank waits for every other, and on a GPU for its
    own queued kernels.

    Args:
        path: The file to write, with the rank appended.
    """

    def __init__(self, path: str = "collectives") -> None:
        self.path = path
        self.calls: list[dict[str, Any]] = []
        self._originals: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        for name in COLLECTIVES:
            original = self._originals[name] = getattr(distributed_c10d, name)

            def watched(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                evaluating = trainer.sanity_checking or trainer.validating
                if not kwargs.get("async_op") and not evaluating:
                    self.calls.append({"step": trainer.global_step, "op": _name})
                return _original(*args, **kwargs)

            setattr(distributed_c10d, name, watched)
            setattr(dist, name, watched)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        for name, original in self._originals.items():
            setattr(distributed_c10d, name, original)
            setattr(dist, name, original)
        with open(f"{self.path}.{trainer.global_rank}", "w") as file:
            file.writelines(json.dumps(call) + "\n" for call in self.calls)
