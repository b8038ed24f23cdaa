"""Stage ``sweeps`` (notebook 08): R and k sweeps, and which of their steps exceed the noise.

Every sweep point is a run at the common budget ``data.train_tokens``: the baseline run, trained
longer, stands in every sweep as its snapshot at ``analysis.compare_tokens`` (`compare_point`).
Steps between neighbouring points, and each lens run against the baseline run's point, are
compared PAIRED on the held-out contexts both were evaluated on (`mlsae.compare`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlsae import config, paths
from mlsae.bootstrap import N_BOOT
from mlsae.compare import compare_runs, read_per_context
from mlsae.stages.table1 import raw_key
from mlsae.writers import write_csv, write_json

KEYS = (
    "fvu", "fvu_se", "fvu_raw", "fvu_paper", "fvu_paper_raw", "l1", "delta_ce", "delta_ce_se", "kl",
)  # fmt: skip
"""The means over layers listed per sweep point in ``results/sweeps.json``."""

METRICS = ("fvu_raw", "delta_ce", "kl")
"""Metrics compared between runs: raw-space FVU, delta CE and KL."""


def compare_point(params: config.Params, run: str) -> str:
    """The result name (`mlsae.paths.snapshot_name`) that stands for ``run`` in comparisons.

    The baseline run's snapshot at `mlsae.config.compare_tokens` when that is below its budget
    (`mlsae.config.validate` makes it one of ``train.snapshot_tokens``); otherwise (and for
    every other run) the final SAE.
    """
    at = config.baseline_snapshot(params)
    return paths.snapshot_name(run, at) if run == params.analysis.baseline_run and at else run


def load_points(params: config.Params, out_dir: str | Path = ".") -> dict[str, dict]:
    """``{run: results/runs/<compare_point(run)>.json}`` for every sweep entry, params order."""
    return {
        name: json.loads(paths.run_result_path(out_dir, compare_point(params, name)).read_text())
        for name in params.sweep
    }


def load_per_context(params: config.Params, out_dir: str | Path = ".") -> dict:
    """``{run: per-context table of its compare point}`` (`mlsae.compare.read_per_context`)."""
    out = {}
    for name in params.sweep:
        path = paths.per_context_path(out_dir, compare_point(params, name))
        if path.exists():
            out[name] = read_per_context(path)
    return out


def sweeps(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Sweep groups (`sweep_groups`), their points and step differences (`sweep_differences`).

    Writes ``results/sweeps.json`` (per group its points, each with ``point``, the result it
    comes from; ``differences``; ``lens_vs_raw``, `lens_vs_raw`; ``points``: run -> result
    name) and ``results/sweeps/{R,k}.csv`` (for ``dvc plots``: the no-lens groups, raw-space
    FVU for every run). Returns ``{"runs", "groups", "summary", "differences",
    "lens_vs_raw"}``; ``runs`` maps each run to its compare point's result.
    """
    runs = load_points(params, out_dir)
    groups = sweep_groups(params)
    point = {n: compare_point(params, n) for n in params.sweep}
    summary = sweep_points(
        params, groups, lambda n: {"point": point[n]} | {m: runs[n]["mean"].get(m) for m in KEYS}
    )
    for var in ("R", "k"):
        means = [runs[p["run"]]["mean"] for p in summary.get(var, [])]
        rows = [
            {var: p[var], "fvu_raw": m[raw_key(m, "fvu")], "delta_ce": p["delta_ce"]}
            for p, m in zip(summary.get(var, []), means, strict=True)
        ]
        write_csv(paths.results(out_dir, "sweeps", f"{var}.csv"), rows)
    per_context = load_per_context(params, out_dir)
    differences = sweep_differences(runs, groups, per_context)
    lens = lens_vs_raw(params, runs, per_context)
    write_json(
        paths.results(out_dir, "sweeps.json"),
        {**summary, "differences": differences, "lens_vs_raw": lens, "points": point},
    )
    return {
        "runs": runs,
        "groups": groups,
        "summary": summary,
        "differences": differences,
        "lens_vs_raw": lens,
    }


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
    """Sweep entries that vary R at the baseline run's k, and k at its R (lens and no lens).

    Every run belongs, whatever its budget: the baseline run is compared at its snapshot
    (`compare_point`). The lens groups hold the runs through the default lens (``lens.method``)
    only: runs through other lenses differ in their lens, not in R or k.
    """
    ref = params.sweep[params.analysis.baseline_run]
    groups: dict[str, list[str]] = {}
    for name, entry in params.sweep.items():
        if entry.lens and (entry.lens_method or params.lens.method) != params.lens.method:
            continue  # the rule of mlsae.stages.runs.run_lens_method, without its imports
        suffix = " + lens" if entry.lens else ""
        if entry.k == ref.k:
            groups.setdefault(f"R{suffix}", []).append(name)
        if entry.expansion_factor == ref.expansion_factor:
            groups.setdefault(f"k{suffix}", []).append(name)
    key = {"R": lambda n: params.sweep[n].expansion_factor, "k": lambda n: params.sweep[n].k}
    return {g: sorted(names, key=key[g[0]]) for g, names in groups.items()}


def _unpaired(ma: dict, mb: dict, key: str) -> dict | None:
    """The old comparison of two runs' means: ``sqrt(se_a^2 + se_b^2)``, None without SEs."""
    metric = key if key in ma and key in mb else key.removesuffix("_raw")
    if metric not in ma or f"{metric}_se" not in ma or f"{metric}_se" not in mb:
        return None
    diff = mb[metric] - ma[metric]
    se = (ma[f"{metric}_se"] ** 2 + mb[f"{metric}_se"] ** 2) ** 0.5
    return {"metric": metric, "difference": diff, "se": se, "within_noise": abs(diff) < 2 * se}


def compare_pair(runs: dict, per_context: dict, a: str, b: str, n_boot: int = N_BOOT) -> list:
    """Rows comparing run b with run a, one per metric of `METRICS`.

    With both per-context tables: the paired comparison (`mlsae.compare.compare_runs`: on their
    common contexts and (context, layer) pairs, so ``difference`` can differ from the difference
    of the two runs' reported means), ``paired`` true, ``within_noise`` = the verdict is "no
    detectable difference", and ``se_reported`` = ``sqrt(se_a^2 + se_b^2)`` of the reported
    means, the unpaired SE, for the record. Without them the unpaired row alone (``paired``
    false, ``within_noise`` = ``|difference| < 2 se``).
    """
    ma, mb = runs[a]["mean"], runs[b]["mean"]
    paired = {}
    if a in per_context and b in per_context:
        denom = runs[a]["fvu_denominator"]["raw"]
        paired = compare_runs(per_context[a], per_context[b], denom, METRICS, n_boot)
    rows = []
    for key in METRICS:
        old = _unpaired(ma, mb, key)
        if key in paired:
            metric = old["metric"] if old else key
            res = {k: v for k, v in paired[key].items() if k != "metric"}
            within = res["verdict"] == "no detectable difference"
            reported = old["se"] if old else None
            row = {"metric": metric, **res, "within_noise": within, "se_reported": reported}
            rows.append({"from": a, "to": b, "paired": True, **row})
        elif old is not None:
            rows.append({"from": a, "to": b, "paired": False, **old})
    return rows


def sweep_differences(
    runs: dict[str, dict],
    groups: dict[str, list[str]],
    per_context: dict | None = None,
    n_boot: int = N_BOOT,
) -> dict:
    """Adjacent sweep points compared with their noise (`compare_pair` for each step).

    ``per_context``: ``{run: per-context table}`` (`load_per_context`); without one for both
    runs a step gets the unpaired comparison only, which overstates the noise of a difference
    (the runs share their test contexts, so their errors are positively correlated).
    """
    per_context = per_context or {}
    return {
        group: [
            row
            for a, b in zip(names, names[1:], strict=False)
            for row in compare_pair(runs, per_context, a, b, n_boot)
        ]
        for group, names in groups.items()
    }


def lens_vs_raw(params, runs: dict, per_context: dict, n_boot: int = N_BOOT) -> list[dict]:
    """Each lens run (b) against the baseline run's compare point (a), paired (`compare_pair`).

    Raw-space FVU, delta CE and KL; ``from`` is the baseline run's result name.
    """
    base = params.analysis.baseline_run
    rows = []
    for name, entry in params.sweep.items():
        if entry.lens and name in per_context and base in per_context:
            for row in compare_pair(runs, per_context, base, name, n_boot):
                rows.append(row | {"from": compare_point(params, base)})
    return rows
