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

The LightningModule's and the strategy's hooks (about 15 a step) get the same treatment: without a profiler,
no profiler context and no debug message built for each call, and a module hook whose method does nothing
(LightningModule's empty defaults: `on_before_backward`, `on_after_backward`, `on_before_zero_grad`, ...) is not
called at all. And Lightning reads the signature of `training_step` (or `validation_step`, ...) with
`inspect.getfullargspec` at every batch, to decide whether to pass `batch_idx`; the answer is kept per function.

After every batch Lightning turns each metric logged with `prog_bar=True` into a Python number with `.item()`,
whether or not it was logged in that batch and whether or not a bar is shown (Lightning issue #21232): the value
of the last logged step is converted again and again. On a GPU each `.item()` waits for all the work queued so far,
so every training step waited for the GPU before the host could queue the next one. The conversion now remembers
the number of the tensor it converted last: a step that logged nothing converts nothing.

Under DDP Lightning broadcasts rank 0's SIGTERM flag before every training batch and reads it back with `.item()`:
a blocking collective every step. cifar-cli's Preemption callback agrees on stops without one (see its docstring);
where it is in the callbacks, the broadcast is skipped.
"""

from __future__ import annotations

import dis
import functools
import inspect
import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.loops import evaluation_loop, prediction_loop, training_epoch_loop
from lightning.pytorch.loops import utilities as loop_utilities
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.connectors.logger_connector import result
from lightning.pytorch.utilities import signature_utils
from torch import Tensor

from cifar_cli.callbacks import Preemption

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


_ORIGINAL_MODULE_HOOK = call._call_lightning_module_hook
_ORIGINAL_STRATEGY_HOOK = call._call_strategy_hook
_ORIGINAL_SIGNATURE_CHECK = signature_utils.is_param_in_hook_signature
_EMPTY_BODIES = ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])
_NOT_PLAIN = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


@functools.cache
def _empty_body(code: types.CodeType) -> bool:
    body = [(i.opname, i.argval) for i in dis.get_instructions(code) if i.opname not in ("RESUME", "NOP", "CACHE")]
    return not code.co_flags & _NOT_PLAIN and body in _EMPTY_BODIES


def does_nothing(fn: Callable) -> bool:
    """Whether `fn` is a plain function or method whose body only returns None (a docstring or `pass` at most)."""
    function = getattr(fn, "__func__", fn)
    return isinstance(function, types.FunctionType) and _empty_body(function.__code__)


def _call_lightning_module_hook(
    trainer: Trainer, hook_name: str, *args: Any, pl_module: Any = None, **kwargs: Any
) -> Any:
    if call.log.isEnabledFor(logging.DEBUG):
        call.log.debug(f"{trainer.__class__.__name__}: calling lightning module hook: {hook_name}")
    pl_module = pl_module or trainer.lightning_module
    if pl_module is None:
        raise TypeError("No `LightningModule` is available to call hooks on.")
    fn = getattr(pl_module, hook_name)
    if not callable(fn):
        return None
    profiled = not isinstance(trainer.profiler, PassThroughProfiler)
    if not profiled and does_nothing(fn):
        return None
    prev_fx_name = pl_module._current_fx_name
    pl_module._current_fx_name = hook_name
    if profiled:
        with trainer.profiler.profile(f"[LightningModule]{pl_module.__class__.__name__}.{hook_name}"):
            output = fn(*args, **kwargs)
    else:
        output = fn(*args, **kwargs)
    pl_module._current_fx_name = prev_fx_name
    return output


def _call_strategy_hook(trainer: Trainer, hook_name: str, *args: Any, **kwargs: Any) -> Any:
    if call.log.isEnabledFor(logging.DEBUG):
        call.log.debug(f"{trainer.__class__.__name__}: calling strategy hook: {hook_name}")
    pl_module = trainer.lightning_module
    prev_fx_name = pl_module._current_fx_name
    pl_module._current_fx_name = hook_name
    fn = getattr(trainer.strategy, hook_name)
    if not callable(fn):
        return None
    if isinstance(trainer.profiler, PassThroughProfiler):
        output = fn(*args, **kwargs)
    else:
        with trainer.profiler.profile(f"[Strategy]{trainer.strategy.__class__.__name__}.{hook_name}"):
            output = fn(*args, **kwargs)
    pl_module._current_fx_name = prev_fx_name
    return output


def is_param_in_hook_signature(
    hook_fx: Callable, param: str, explicit: bool = False, min_args: int | None = None
) -> bool:
    """Lightning's check, its answer kept per plain function or method (a signature does not change)."""
    function = getattr(hook_fx, "__func__", hook_fx)
    if not isinstance(function, types.FunctionType):
        return _ORIGINAL_SIGNATURE_CHECK(hook_fx, param, explicit, min_args)
    return _signature_check(function, param, explicit, min_args)


# Bounded: functions made on the fly would otherwise pile up. The function and its bound method give the same
# answer: Lightning's check reads the arguments with `self` and drops the first.
@functools.lru_cache(maxsize=1024)
def _signature_check(function: types.FunctionType, param: str, explicit: bool, min_args: int | None) -> bool:
    return _ORIGINAL_SIGNATURE_CHECK(function, param, explicit, min_args)


_ORIGINAL_TO_SCALARS = result.convert_tensors_to_scalars
# (storage address, offset, dtype, device) -> (the tensor converted, its version then, its number). Holding the
# tensor keeps its storage alive, so no other tensor can have the same address while the entry stands.
_scalars: dict[tuple, tuple[Tensor, int, Any]] = {}


def convert_tensors_to_scalars(data: Any) -> Any:
    """Lightning's conversion of a progress-bar metric, without converting the same value twice: a one-element
    tensor that shares its storage with the one converted last, with no in-place change since, gives the number
    found then."""
    # Inference tensors (validation and test run in inference mode) keep no version counter: converted each time.
    if not isinstance(data, Tensor) or data.numel() != 1 or data.is_inference():
        return _ORIGINAL_TO_SCALARS(data)
    try:
        key = (data.untyped_storage().data_ptr(), data.storage_offset(), data.dtype, data.device)
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without a plain storage (DTensor, say)
        return _ORIGINAL_TO_SCALARS(data)
    found = _scalars.get(key)
    if found is not None and found[1] == data._version:  # views share the version counter: no change since
        return found[2]
    if len(_scalars) > 64:  # a few metrics, each with its latest value: drop the older values
        _scalars.clear()
    number = _ORIGINAL_TO_SCALARS(data)
    _scalars[key] = (data, data._version, number)
    return number


_ORIGINAL_SIGTERM_BROADCAST = getattr(training_epoch_loop._TrainingEpochLoop, "_broadcast_sigterm_tensor", None)


def _broadcast_sigterm_tensor(self: training_epoch_loop._TrainingEpochLoop) -> None:
    """Lightning's broadcast of rank 0's SIGTERM before every training batch under DDP (a blocking collective, and
    on a GPU a host-device sync, every step), skipped where `cifar_cli.callbacks.Preemption` is among the
    callbacks: it replaces Lightning's SIGTERM handler during training and sets the flag on every rank at the same
    step itself, so Lightning's broadcast would only ever send False."""
    if any(isinstance(callback, Preemption) for callback in self.trainer.callbacks):
        return
    _ORIGINAL_SIGTERM_BROADCAST(self)


# (module, name, replacement, the original's parameters): what install() replaces where it finds the original.
_REPLACEMENTS = [
    (call, "_call_callback_hooks", _call_callback_hooks, _EXPECTED_PARAMETERS),
    (call, "_call_lightning_module_hook", _call_lightning_module_hook,
     ["trainer", "hook_name", "args", "pl_module", "kwargs"]),
    (call, "_call_strategy_hook", _call_strategy_hook, ["trainer", "hook_name", "args", "kwargs"]),
    *[(module, "is_param_in_hook_signature", is_param_in_hook_signature,
       ["hook_fx", "param", "explicit", "min_args"])
      for module in (training_epoch_loop, evaluation_loop, prediction_loop, loop_utilities)],
    (result, "convert_tensors_to_scalars", convert_tensors_to_scalars, ["data"]),
    (training_epoch_loop._TrainingEpochLoop, "_broadcast_sigterm_tensor", _broadcast_sigterm_tensor, ["self"]),
]  # fmt: skip


def install() -> bool:
    """Put the replacements in place, once each; each goes only over the function it was written against (the
    same parameters). False where the callback dispatch could not be replaced."""
    originals = {
        "_call_callback_hooks": _ORIGINAL,
        "_call_lightning_module_hook": _ORIGINAL_MODULE_HOOK,
        "_call_strategy_hook": _ORIGINAL_STRATEGY_HOOK,
        "is_param_in_hook_signature": _ORIGINAL_SIGNATURE_CHECK,
        "convert_tensors_to_scalars": _ORIGINAL_TO_SCALARS,
        "_broadcast_sigterm_tensor": _ORIGINAL_SIGTERM_BROADCAST,
    }
    for module, name, replacement, parameters in _REPLACEMENTS:
        current = getattr(module, name, None)
        if current is replacement:
            continue
        original = originals[name]
        if current is not None and current is original and list(inspect.signature(original).parameters) == parameters:
            setattr(module, name, replacement)
    return call._call_callback_hooks is _call_callback_hooks


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
