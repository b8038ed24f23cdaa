"""Switch params.yaml to another preset the DVC way: as ``dvc exp run -S`` overrides.

``python -m mlsae preset params-paper.yaml`` prints the ``-S`` arguments that turn params.yaml
into the preset (every leaf that differs, and the sweep tables replaced whole), so that

    dvc exp run -n paper $(python -m mlsae preset params-paper.yaml)

runs the preset as an experiment: params.yaml is edited by DVC, the change is recorded in the
experiment, and ``dvc exp show`` lists it beside the others. Nothing is copied over params.yaml.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

WHOLE = ("sweep", "lens_sweep")
"""Sections replaced whole (their entries are runs, not settings to merge)."""


def hydra_value(value) -> str:
    """``value`` in Hydra's override grammar (what ``dvc exp run -S`` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Hydra form for {type(value).__name__}")


def overrides(current: dict, preset: dict) -> list[str]:
    """Hydra overrides that turn ``current`` into ``preset``.

    Leaves the preset does not name keep their current value; ``sweep`` and ``lens_sweep`` are
    deleted and added whole.
    """
    out: list[str] = []

    def walk(cur, new, prefix):
        for key, value in new.items():
            name = f"{prefix}{key}"
            if key in WHOLE and not prefix:
                if cur.get(key) != value:
                    out.extend([f"~{name}"] if key in cur else [])
                    out.append(f"+{name}={hydra_value(value)}")
            elif isinstance(value, dict) and isinstance(cur.get(key), dict):
                walk(cur[key], value, f"{name}.")
            elif key not in cur:
                out.append(f"+{name}={hydra_value(value)}")
            elif cur[key] != value:
                out.append(f"{name}={hydra_value(value)}")

    walk(current, preset, "")
    return out


def preset_arguments(params: str | Path, preset: str | Path) -> str:
    """The ``-S ...`` arguments, shell-quoted, for ``dvc exp run``."""
    current = yaml.safe_load(Path(params).read_text())
    new = yaml.safe_load(Path(preset).read_text())
    return " ".join(f"-S {shlex.quote(o)}" for o in overrides(current, new))
