"""Where bfloat16 pays: ``auto`` precision settings resolved per device.

bf16 matmuls are several times faster than float32 on GPUs and on CPUs with bf16 units
(AVX512-BF16, AMX, Arm's BF16 extension), and far slower where the CPU has none: PyTorch then
converts element by element. Measured on a 2-core AMD EPYC with AVX2 only: a (1920, 576) x
(576, 4608) matmul took 8.6 s in bf16 against 0.13 s in float32, and the SmolLM2 unembedding of
2,048 tokens 414 s against 1.8 s. ``select_bf16``, ``ce_bf16`` and the lens's training loss
therefore default to ``auto``: bf16 exactly where the hardware has it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

AUTO = "auto"
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""``/proc/cpuinfo`` flags of native bf16 arithmetic (x86 ``flags``, Arm ``Features``)."""


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU lists a native bf16 instruction set (False when it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features") and CPU_BF16_FLAGS & set(value.split()):
            return True
    return False


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls on ``device`` run on native units (CUDA with bf16, a bf16 CPU)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_has_bf16()
    return False


def use_bf16(setting: bool | str, device: str | torch.device) -> bool:
    """Resolve a precision setting: ``True``/``False`` as given, ``"auto"`` by `native_bf16`."""
    if setting == AUTO:
        return native_bf16(device)
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"A bf16 setting is true, false or 'auto', not {setting!r}.")
