"""Stage ``table1`` (notebook 06): the paper's Table 1 for our runs, from their result files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mlsae import config, paths


def load_runs(params: config.Params, out_dir: str | Path = ".") -> dict[str, dict]:
    """``{run: results/runs/<run>.json}`` for every sweep entry, in params order."""
    return {
        name: json.loads(paths.results(out_dir, "runs", f"{name}.json").read_text())
        for name in params.sweep
    }


def make_table1(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Table 1 from the runs' results, saved as ``figures/table1.csv`` and ``table1.md``.

    Returns ``{"runs", "table"}`` (`load_runs`, `table1`).
    """
    runs = load_runs(params, out_dir)
    table = table1(runs, params)
    folder = paths.figures(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "table1.csv", index=False)
    (folder / "table1.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
    return {"runs": runs, "table": table}


def raw_key(values: dict, key: str) -> str:
    """The key of metric ``key`` in the raw residual space, in a run's ``mean`` or ``per_layer``.

    A lens run reconstructs lens-space vectors: its ``fvu`` and ``fvu_paper`` are in lens space
    and ``fvu_raw`` / ``fvu_paper_raw`` in the raw space every other run is measured in. Every
    comparison across runs (Table 1's raw columns, the per-layer figure, the sweeps) takes the
    raw one through this rule; other metrics (L1, delta CE, KL) have one space only.
    """
    raw = {"fvu": "fvu_raw", "fvu_paper": "fvu_paper_raw"}.get(key)
    return raw if raw in values else key


def table1(runs: dict[str, dict], params):
    """The paper's Table 1 for our runs: means over layers, with bootstrap standard errors.

    ``FVU`` is ours (per-dimension mean) and ``FVU (paper def.)`` the original code's (scalar
    variance, per batch; `mlsae.metrics`), both in the space the SAE reconstructs (lens space
    for a lens run), and both again in the raw residual space for lens runs. ``± SE``: standard
    errors by bootstrap over held-out contexts (`mlsae.bootstrap`). ``CE contexts`` and ``CE
    stride``: the delta-CE design (context c patched at the layers l = c mod stride,
    `mlsae.patching.stride_mask`), ``CE pairs`` the (context, layer) pairs patched. Every row is
    a run's final SAE (the baseline run's included). Returns a pandas DataFrame.
    """
    rows = []
    for name, res in runs.items():
        entry, mean = params.sweep[name], res["mean"]
        nan = float("nan")
        rows.append(
            {
                "run": name,
                "model": params.base.model,
                "corpus": params.base.corpus,
                "R": int(entry.expansion_factor)
                if float(entry.expansion_factor).is_integer()
                else entry.expansion_factor,
                "k": entry.k,
                "lens": "yes" if entry.lens else "no",
                "FVU": mean["fvu"],
                "FVU SE": mean.get("fvu_se", nan),
                "FVU (paper def.)": mean.get("fvu_paper", nan),
                "FVU raw": mean[raw_key(mean, "fvu")],
                "FVU raw (paper def.)": mean.get(raw_key(mean, "fvu_paper"), nan),
                "L1": mean["l1"],
                "delta CE": mean.get("delta_ce", nan),
                "delta CE (paper def.)": mean.get("delta_ce_paper", nan),
                "delta CE (paper def.) SE": mean.get("delta_ce_paper_se", nan),
                "delta CE SE": mean.get("delta_ce_se", nan),
                "KL": mean.get("kl", nan),
                "KL SE": mean.get("kl_se", nan),
                "test tokens": res["n_tokens"],
                "CE predictions": res["n_ce_tokens"],
                "CE contexts": res.get("n_ce_contexts", nan),
                "CE stride": res.get("ce_design", {}).get("stride", nan),
                "CE pairs": res.get("ce_design", {}).get("pairs", nan),
                "train tokens": res.get("tokens_trained", nan),
            }
        )
    return pd.DataFrame(rows)
