"""The three kinds of result file the stages write: JSON, numbers-only DVC metrics, and CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def write_json(path: str | Path, data) -> Path:
    """``data`` as indented JSON at ``path`` (folders created; tensors and arrays as lists)."""

    def default(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=default))
    return path


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """A DVC metrics file: nested mappings of numbers only (a string or list is an error)."""

    def check(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, f"{key}.{k}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metrics file {path}: {key} = {value!r} is not a number.")

    check(metrics, "")
    return write_json(path, metrics)


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Rows of equal keys as a CSV with a header (a `dvc plots` source)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
