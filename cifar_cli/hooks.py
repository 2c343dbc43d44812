"""Callback hooks called only where a callback implements them: less host time in every training step.

Lightning calls each of its six per-step callback hooks on every callback, whether or not the callback overrides
it, and wraps each call in a profiler context named with the callback's `state_key` (for ModelCheckpoint and
EarlyStopping, a repr of their arguments, built anew on every call). With the ten callbacks of a default run
that is 60 calls a step, most of them to `Callback`'s empty methods; on a GPU, where a fast recipe's step takes a
few milliseconds, the host time of those calls is time the GPU waits.

`install()` replaces `lightning.pytorch.trainer.call._call_callback_hooks`, which every loop calls through its
module, with one that calls a hook only on the callbacks whose class overrides `Callback`'s method, in the same
order, and builds the profiler's name only when a profiler is set. Lightning offers no switch for this. The
replacement is installed only over the function it was written against (same parameters); any other Lightning
keeps its own.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call

_ORIGINAL = call._call_callback_hooks
_EXPECTED_PARAMETERS = ["trainer", "hook_name", "args", "monitoring_callbacks", "kwargs"]
# (hook name, the trainer's callbacks) -> those of the callbacks that implement the hook, in order.
_implementers: dict[tuple[str, tuple[Callback, ...]], list[Callback]] = {}


def implements(callback: Callback, hook_name: str) -> bool:
    """Whether `callback` does something in `hook_name`: its class, or the instance, replaces Callback's method."""
    overridden = getattr(type(callback), hook_name, None) is not getattr(Callback, hook_name, None)
    return overridden or hook_name in vars(callback)


def implementers(callbacks: list[Callback], hook_name: str) -> list[Callback]:
    key = (hook_name, tuple(callbacks))
    found = _implementers.get(key)
    if found is None:
        if len(_implementers) > 1000:  # many trainers in one process (tests, sweeps): keep the cache small
            _implementers.clear()
        found = _implementers[key] = [cb for cb in callbacks if implements(cb, hook_name)]
    return found


def _call_callback_hooks(
    trainer: Trainer, hook_name: str, *args: Any, monitoring_callbacks: bool | None = None, **kwargs: Any
) -> None:
    pl_module = trainer.lightning_module
    if pl_module:
        prev_fx_name = pl_module._current_fx_name
        pl_module._current_fx_name = hook_name
    callbacks = trainer.callbacks
    if monitoring_callbacks is True:
        callbacks = [cb for cb in callbacks if isinstance(cb, (EarlyStopping, Checkpoint))]
    elif monitoring_callbacks is False:
        callbacks = [cb for cb in callbacks if not isinstance(cb, (EarlyStopping, Checkpoint))]
    profiled = not isinstance(trainer.profiler, PassThroughProfiler)
    for callback in implementers(callbacks, hook_name):
        fn = getattr(callback, hook_name)
        if not callable(fn):
            continue
        if profiled:
            with trainer.profiler.profile(f"[Callback]{callback.state_key}.{hook_name}"):
                fn(trainer, pl_module, *args, **kwargs)
        else:
            fn(trainer, pl_module, *args, **kwargs)
    if pl_module:
        pl_module._current_fx_name = prev_fx_name


def install() -> bool:
    """Put the replacement in place, once; False where this Lightning's function is not the one it replaces."""
    if call._call_callback_hooks is _call_callback_hooks:
        return True
    if list(inspect.signature(_ORIGINAL).parameters) != _EXPECTED_PARAMETERS:
        return False
    call._call_callback_hooks = _call_callback_hooks
    return True


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def plain_cuda_check_without_gpu() -> None:
    """Without a CUDA GPU, let `torch.cuda.is_available()` answer from the CUDA runtime instead of NVML.

    Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when it is imported, so that asking whether CUDA is there does
    not initialise CUDA before a fork. Torch remembers the answer only once CUDA is initialised, which a CPU run
    never does: every call then loads the NVML library again (and, without it, asks the runtime anyway). Adam's
    and AdamW's `step` ask at every step (their graph-capture check): 200 us of a 330 us Adam step here. Where no
    GPU answers there is no CUDA to initialise before a fork, and the variable only costs; with a GPU it stays.
    """
    if os.environ.get(NVML_CHECK) == "1" and not torch.cuda.is_available():
        del os.environ[NVML_CHECK]
