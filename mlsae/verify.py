"""Compare regenerated results with the committed ones, within a tolerance.

``python -m mlsae verify`` reads every ``results/**/*.json`` in the working tree and the same file
at a git revision (default ``HEAD``), walks both, and lists each number that moved by more than
``rtol * |committed| + atol``. Floating point differs across CPUs (thread counts, vector units,
BLAS kernels), so regenerated results agree with the committed ones to a tolerance, not to the
bit; a change beyond it is a real change (code, data or parameters), and is named by its path.
Timings (keys containing ``seconds``) are not results and are skipped.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

RTOL, ATOL = 0.02, 0.005
"""Default tolerance: 2% of the committed value plus 0.005."""


def moved(old, new, rtol: float = RTOL, atol: float = ATOL, path: str = "") -> list[str]:
    """Paths (``a.b[3]``) where two JSON trees differ beyond the tolerance, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        key = (lambda k: f"{path}.{k}") if path else str
        out = [f"{key(k)}: only in one of them" for k in sorted(set(old) ^ set(new))]
        for k in sorted(set(old) & set(new)):
            if "seconds" not in str(k):  # a timing, not a result
                out += moved(old[k], new[k], rtol, atol, key(k))
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{path}: length {len(old)} -> {len(new)}"]
        return [
            x
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for x in moved(a, b, rtol, atol, f"{path}[{i}]")
        ]
    numbers = (int, float)
    if isinstance(old, numbers) and isinstance(new, numbers) and not isinstance(old, bool):
        if math.isnan(old) and math.isnan(new):
            return []
        if not abs(new - old) <= rtol * abs(old) + atol:
            return [f"{path}: {old:.6g} -> {new:.6g}"]
        return []
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def verify(
    root: str | Path = ".", rev: str = "HEAD", rtol: float = RTOL, atol: float = ATOL
) -> list[str]:
    """Every number in ``root/results`` that moved beyond the tolerance since ``rev``."""
    root = Path(root)
    out = []
    for path in sorted((root / "results").rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        shown = subprocess.run(
            ["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True, text=True
        )
        if shown.returncode:
            out.append(f"{rel}: not committed at {rev}")
            continue
        out += [
            f"{rel}: {m}"
            for m in moved(json.loads(shown.stdout), json.loads(path.read_text()), rtol, atol)
        ]
    return out


def run_settings(changes: list[str]) -> tuple[list[str], list[str]]:
    """``(results, settings)``: ``changes`` split into moved results and run settings.

    Settings are differences inside a run's recorded training config
    (``results/runs/<run>.json: config...``): how a run was set up, not what it measured (a
    settings key renamed or added moves no number).
    """
    settings = [c for c in changes if ".json: config." in c]
    return [c for c in changes if c not in settings], settings
