"""Stage ``sweeps`` (notebook 08): R and k sweeps, and which of their steps exceed the noise."""

from __future__ import annotations

from pathlib import Path

from mlsae import config, paths
from mlsae.stages.table1 import load_runs, raw_key
from mlsae.writers import write_csv, write_json

KEYS = (
    "fvu", "fvu_se", "fvu_raw", "fvu_paper", "fvu_paper_raw", "l1", "delta_ce", "delta_ce_se", "kl",
)  # fmt: skip
"""The means over layers listed per sweep point in ``results/sweeps.json``."""


def sweeps(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Sweep groups (`sweep_groups`), their points and step differences (`sweep_differences`).

    Writes ``results/sweeps.json`` and ``results/sweeps/{R,k}.csv`` (for ``dvc plots``: the
    no-lens groups, raw-space FVU for every run). Returns ``{"runs", "groups", "summary",
    "differences"}``.
    """
    runs = load_runs(params, out_dir)
    groups = sweep_groups(params)
    summary = sweep_points(params, groups, lambda n: {m: runs[n]["mean"].get(m) for m in KEYS})
    for var in ("R", "k"):
        means = [runs[p["run"]]["mean"] for p in summary.get(var, [])]
        rows = [
            {var: p[var], "fvu_raw": m[raw_key(m, "fvu")], "delta_ce": p["delta_ce"]}
            for p, m in zip(summary.get(var, []), means, strict=True)
        ]
        write_csv(paths.results(out_dir, "sweeps", f"{var}.csv"), rows)
    differences = sweep_differences(runs, groups)
    write_json(paths.results(out_dir, "sweeps.json"), {**summary, "differences": differences})
    return {"runs": runs, "groups": groups, "summary": summary, "differences": differences}


def sweep_points(params, groups: dict[str, list[str]], values) -> dict[str, list[dict]]:
    """Per sweep group, one row per run: its name, R and k, then the mapping ``values(run)``."""
    return {
        g: [
            {
                "run": n,
                "R": params.sweep[n].expansion_factor,
                "k": params.sweep[n].k,
                **values(n),
            }
            for n in names
        ]
        for g, names in groups.items()
    }


def sweep_groups(params) -> dict[str, list[str]]:
    """Sweep entries that vary R at the baseline run's k, and k at its R (lens and no lens)."""
    ref = params.sweep[params.analysis.baseline_run]
    groups: dict[str, list[str]] = {}
    for name, entry in params.sweep.items():
        suffix = " + lens" if entry.lens else ""
        if entry.train_tokens not in (
            None,
            params.sweep[params.analysis.baseline_run].train_tokens,
        ):
            continue
        if entry.k == ref.k:
            groups.setdefault(f"R{suffix}", []).append(name)
        if entry.expansion_factor == ref.expansion_factor:
            groups.setdefault(f"k{suffix}", []).append(name)
    key = {"R": lambda n: params.sweep[n].expansion_factor, "k": lambda n: params.sweep[n].k}
    return {g: sorted(names, key=key[g[0]]) for g, names in groups.items()}


def sweep_differences(runs: dict[str, dict], groups: dict[str, list[str]]) -> dict:
    """Adjacent sweep points compared with their noise: is each step larger than 2 SE?

    For each group and each metric (raw-space FVU, delta CE), the difference of the means over
    layers of neighbouring runs and ``se = sqrt(se_a^2 + se_b^2)`` from their bootstrap standard
    errors. The runs are evaluated on the same contexts, so their errors are positively
    correlated and this ``se`` overstates the noise of the difference: "within noise"
    (``|diff| < 2 se``) is a cautious verdict.
    """
    out: dict[str, list[dict]] = {}
    for group, names in groups.items():
        rows = []
        for a, b in zip(names, names[1:], strict=False):
            for key in ("fvu_raw", "delta_ce"):
                ma, mb = runs[a]["mean"], runs[b]["mean"]
                metric = key if key in ma and key in mb else key.removesuffix("_raw")
                if metric not in ma or f"{metric}_se" not in ma or f"{metric}_se" not in mb:
                    continue
                diff = mb[metric] - ma[metric]
                se = (ma[f"{metric}_se"] ** 2 + mb[f"{metric}_se"] ** 2) ** 0.5
                rows.append(
                    {
                        "from": a,
                        "to": b,
                        "metric": metric,
                        "difference": diff,
                        "se": se,
                        "within_noise": abs(diff) < 2 * se,
                    }
                )
        out[group] = rows
    return out
