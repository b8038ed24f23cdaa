"""Learning-rate schedules as functions of progress alone (shared by SAE and lens training)."""

from __future__ import annotations

import math


def lr_factor(tokens: int, budget: int, warmup: int = 0, decay: str = "none") -> float:
    """Learning-rate multiplier of the step that starts after ``tokens`` of a ``budget``.

    ``min(1, (tokens + 1) / warmup)`` times 1 (``none``), ``1 - tokens / budget`` (``linear``) or
    ``(1 + cos(pi tokens / budget)) / 2`` (``cosine``). A function of tokens alone, so a resumed
    run takes the same steps.
    """
    factor = min(1.0, (tokens + 1) / warmup) if warmup else 1.0
    frac = min(1.0, tokens / budget) if budget else 0.0
    if decay == "linear":
        factor *= 1.0 - frac
    elif decay == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * frac))
    return factor
