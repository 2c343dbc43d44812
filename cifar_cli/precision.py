"""The precision a run uses when none is given: decided once at start-up from the hardware, and said in one line.

On a CPU with native bf16 arithmetic (AMX or AVX512-BF16), bf16-mixed runs convolutions about twice as fast as
fp32; without it, bf16 is emulated and slower, so fp32. On a CUDA GPU: bf16-mixed where the GPU supports bf16
(Ampere and later), which needs no loss scaling, else 16-mixed. Other accelerators keep Lightning's default (fp32).
`--trainer.precision` overrides the choice.

Where the strategy forks its ranks (ddp_fork, ddp_notebook), the GPU is read in a child interpreter: reading it here
initialises CUDA in the process that forks, and the forked ranks then cannot use CUDA ("Cannot re-initialize CUDA in
forked subprocess").
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.fabric.accelerators.cuda import num_cuda_devices
from lightning.fabric.utilities.imports import _IS_INTERACTIVE
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info


def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions ("AMX", "AVX512-BF16"), or None where it has none."""
    cpu = getattr(torch, "cpu", None)
    try:
        if cpu._is_amx_tile_supported():
            return "AMX"
        if cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
        return None
    except AttributeError:  # a torch without these probes: read the CPU's flags where the system lists them
        info = Path("/proc/cpuinfo")
        flags = set(info.read_text().split()) if info.exists() else set()
        return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def _accelerator_name(accelerator: object) -> str | None:
    """The config's accelerator as a name: None (unset), a string as given, or "other" for an Accelerator instance."""
    return accelerator if isinstance(accelerator, str) else None if accelerator is None else "other"


def on_cuda(accelerator: object) -> bool:
    """Whether a run on `accelerator` (a name from the config, or None/"auto") trains on a CUDA GPU here.

    Counted as Lightning counts for "auto" (`CUDAAccelerator.is_available`): `torch.cuda.device_count()` asks NVML
    while CUDA is not initialised, where `torch.cuda.is_available()` asks the CUDA runtime, which initialises the
    driver before a fork, unless PYTORCH_NVML_BASED_CUDA_CHECK=1 (torch/cuda/__init__.py, torch 2.14)."""
    return _accelerator_name(accelerator) in (None, "auto", "gpu", "cuda") and num_cuda_devices() > 0


def forks(strategy: object) -> bool:
    """Whether `strategy` (a name, a Strategy, or a config's class_path and init_args) starts its ranks by forking
    this process; None and "auto" do in a notebook, where Lightning picks ddp_fork for several GPUs."""
    if strategy is None or strategy == "auto":
        return _IS_INTERACTIVE
    if isinstance(strategy, str):
        entry = StrategyRegistry[strategy] if strategy in StrategyRegistry else {}  # (its `get` builds the strategy)
        start_method = entry.get("init_params", {}).get("start_method")
    elif isinstance(strategy, Mapping) or hasattr(strategy, "init_args"):  # a config's dict or Namespace
        init = strategy.get("init_args") if isinstance(strategy, Mapping) else strategy.init_args
        start_method = init.get("start_method") if init is not None else None
    else:
        start_method = getattr(strategy, "_start_method", None)  # DDPStrategy's (Lightning 2.6)
    # Not forkserver: its ranks are forked from a server process started anew, without this one's CUDA.
    return start_method == "fork"


# Run in a child interpreter by `gpu_apart`: the name and native bf16 of the GPU that a run uses (the current
# device), or null where the child sees no GPU. Not where bf16 is only emulated (pre-Ampere: a T4, a V100), which
# torch's check counts by default: there it runs about as slow as fp32, and fp16 has the tensor cores.
GPU_PROBE = """\
import json, torch
gpu = torch.cuda.device_count() > 0 and [torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(False)]
print(json.dumps(gpu or None))
"""
# Importing torch took 1.9 s on a 2-core machine without a GPU; initialising CUDA adds seconds, more with many GPUs.
PROBE_TIMEOUT_S = 120


@functools.cache
def gpu_apart() -> tuple[str, bool] | str:
    """(name, native bf16) of the CUDA GPU a run uses, read in a child interpreter, which initialises CUDA there and
    not in this process; or why it could not be read. Once per process."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return f"it took over {PROBE_TIMEOUT_S} s"
    except OSError as err:
        return f"{sys.executable}: {err.strerror or err}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {done.returncode}"
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return f"it printed {done.stdout.strip()[-200:]!r}"
    if found is None:
        return "a child process sees no CUDA GPU"
    return str(found[0]), bool(found[1])


def _gpu_precision(gpu: str, bf16: bool) -> tuple[str, str]:
    return ("bf16-mixed", f"{gpu} supports bf16") if bf16 else ("16-mixed", f"{gpu} has no bf16")


def default_precision(accelerator: object, strategy: object = None) -> tuple[str, str] | None:
    """(precision, why) for a run on `accelerator` (a name from the config, or None/"auto") with `strategy` (as
    `forks` takes it), or None to keep Lightning's default."""
    if on_cuda(accelerator):
        if forks(strategy):
            found = gpu_apart()
            if isinstance(found, str):  # fp16 mixed precision runs on every CUDA GPU
                why = "could not tell whether the GPU supports bf16 without initialising CUDA in the process that forks"
                return "16-mixed", f"{why}: {found}"
            return _gpu_precision(*found)
        return _gpu_precision(torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(including_emulation=False))
    if _accelerator_name(accelerator) in (None, "auto", "cpu"):
        found = cpu_bf16()
        if found is not None:
            return "bf16-mixed", f"this CPU has {found}"
        return "32-true", "this CPU has no native bf16"
    return None


def choose_precision(trainer_config: dict) -> tuple[str, str] | None:
    """Set `precision` in the trainer's config where it is unset; return it with the line that says why
    (`announce_precision` logs it), or None where the config gives one or Lightning's default stays."""
    if trainer_config.get("precision") is not None:
        return None
    chosen = default_precision(trainer_config.get("accelerator"), trainer_config.get("strategy"))
    if chosen is None:
        return None
    trainer_config["precision"], why = chosen
    # The model summary cannot size bf16 weights and says so at every fit; its estimate (in fp32) is still shown.
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")
    return chosen[0], f"Precision {chosen[0]} ({why}); --trainer.precision overrides"


def announce_precision(chosen: tuple[str, str] | None) -> None:
    """Say the choice once (on the first process): once the trainer is built, whose refusals of other settings
    would otherwise follow it."""
    if chosen is not None:
        rank_zero_info(chosen[1])


def show_held_warnings(held: list[warnings.WarningMessage], precision_said: bool) -> None:
    """Show the warnings held while the trainer was built, as they would have been shown then. Less Lightning's on
    the alias `--trainer.precision 16` where the precision line says what runs instead (bf16-mixed, on a CPU): its
    advice, 16-mixed, runs the same bf16-mixed there."""
    for held_warning in held:
        if precision_said and str(held_warning.message).startswith("`precision=16` is supported for historical"):
            continue
        warnings.warn_explicit(
            held_warning.message,
            held_warning.category,
            held_warning.filename,
            held_warning.lineno,
            source=held_warning.source,
        )
