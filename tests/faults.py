"""Faults for the DDP tests, injected by class path (`--trainer.callbacks+=faults.FailOnRank`, tests/ on PYTHONPATH).

A callback, not a broken data set: every rank loads the same data, and the faults of interest are the ones that
only one rank sees (a bad batch in its shard, a process killed by the OOM killer or a user).
"""

from __future__ import annotations

import os
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


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
