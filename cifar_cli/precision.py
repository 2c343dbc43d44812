"""The precision a run uses when none is given: decided once at start-up from the hardware, and said in one line.

On a CPU with native bf16 arithmetic (AMX or AVX512-BF16), bf16-mixed runs convolutions about twice as fast as
fp32; without it, bf16 is emulated and slower, so fp32. On a CUDA GPU: bf16-mixed where the GPU supports bf16
(Ampere and later), which needs no loss scaling, else 16-mixed. Other accelerators keep Lightning's default (fp32).
`--trainer.precision` overrides the choice.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
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
    """Whether a run on `accelerator` (a name from the config, or None/"auto") trains on a CUDA GPU here."""
    return _accelerator_name(accelerator) in (None, "auto", "gpu", "cuda") and torch.cuda.is_available()


def default_precision(accelerator: object) -> tuple[str, str] | None:
    """(precision, why) for a run on `accelerator` (a name from the config, or None/"auto"), or None to keep
    Lightning's default."""
    if on_cuda(accelerator):
        gpu = torch.cuda.get_device_name()
        # Not where bf16 is only emulated (pre-Ampere: a T4, a V100), which torch's check counts by default: there
        # it runs about as slow as fp32, and fp16 has the tensor cores.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"{gpu} supports bf16"
        return "16-mixed", f"{gpu} has no bf16"
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
    chosen = default_precision(trainer_config.get("accelerator"))
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
