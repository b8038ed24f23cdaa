"""Verdicts on the paper's claims, decided by stated rules from the numbers in ``results/``.

Stage ``verdicts`` (notebook 11) applies `verdicts` to the results of every other stage and
writes ``results/verdicts.json`` and ``figures/verdicts.md``; the README's catalogue quotes them.
Each row names the claim, what was measured, the TEST that decides it, that test's POWER and the
RULE that turns the test into one of `VERDICTS`:

* a paired comparison (`mlsae.compare`, on the held-out contexts both runs share) decides a
  difference between runs; its power is the difference detectable at 80% power (``mde80``, 2.80
  SE): a "no detectable difference" only rules out differences larger than that;
* a 95% bootstrap interval over held-out contexts (`mlsae.latent_measures`) decides a latent
  measure against a bound; its power is the interval's half-width;
* a descriptive number with no test says so (``power`` None).

The latent findings are also decided at each training snapshot of the baseline run (``by_tokens``:
the same rule on the snapshot's value, with the final SAE's standard error), and a row says
whether its verdict depends on training length.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlsae import paths
from mlsae.stages.sweeps import compare_point
from mlsae.verdict_rules import (
    VERDICTS,
    Z95,
    max_mde,
    paired_text,
    row,
    steps_row,
    steps_verdict,
)
from mlsae.verdicts_latents import (
    activity_row,
    figure2_row,
    figure3_row,
    length_table,
    mmcs_row,
    variance_row,
)
from mlsae.writers import write_json

__all__ = ["VERDICTS", "load", "markdown", "verdicts", "write"]


def read_json(path: Path) -> dict | None:
    """A result file's JSON, None where it is missing."""
    return json.loads(path.read_text()) if path.exists() else None


def load(params, out_dir: str | Path = ".") -> dict:
    """The results the rules read (None where a file is missing): JSON of stages 02-09."""
    base = params.analysis.baseline_run
    names = [compare_point(params, base), *params.sweep]
    files = ("drift", "lens_kl", "sweeps", "baselines", "latents")
    return {f: read_json(paths.results(out_dir, f"{f}.json")) for f in files} | {
        "runs": {n: read_json(paths.run_result_path(out_dir, n)) for n in names},
        "compare_point": compare_point(params, base),
    }


def _count(n) -> int:
    """A token count saved as a number or a one-element list (``results/drift.json``)."""
    return int(n[0] if isinstance(n, list) else n)


def drift_row(drift: dict) -> dict:
    """Figure 1: adjacent-layer cosine similarity (descriptive)."""
    raw = sum(drift["cosine"]) / len(drift["cosine"])
    centred = sum(drift["cosine_centred"]) / len(drift["cosine_centred"])
    high = centred >= 0.8
    return row(
        "figure1",
        "Figure 1",
        "adjacent-layer cosine similarity is high and grows with model size",
        f"mean adjacent-layer cosine {raw:.3f} raw, {centred:.3f} mean-centred "
        f"({_count(drift['n_tokens']):,} test tokens)",
        "none (descriptive; one model)",
        None,
        "high: mean-centred mean >= 0.8; growth with size needs several models",
        "partly" if high else "not reproduced",
        {"cosine_mean": raw, "cosine_centred_mean": centred},
    )


def table1a_row(run: dict, name: str) -> dict:
    """Table 1a: never comparable at this scale; records the delta-CE SE against 0.03 nats."""
    m = run["mean"]
    return row(
        "table1a",
        "Table 1a",
        "MLSAE FVU / L1 / delta CE (Pythia-70m, R = 64: 0.097 / 66.5 / 0.565)",
        f"{name}: FVU (paper's def.) {m['fvu_paper']:.3f}, L1 {m['l1']:.1f}, delta CE "
        f"{m['delta_ce']:.3f} ± {m['delta_ce_se']:.3f} after {run['tokens_trained']:,} tokens",
        "none (another model, corpus, R and token budget)",
        None,
        "not comparable while model, corpus, R or budget differ",
        "not comparable",
        {k: m.get(k) for k in ("fvu", "fvu_se", "fvu_paper", "l1", "delta_ce", "delta_ce_se", "kl")}
        | {
            "tokens_trained": run["tokens_trained"],
            "delta_ce_se_at_most_0.03": m["delta_ce_se"] <= 0.03,
        },
    )


def lens_rows(params, data: dict) -> list[dict]:
    """Table 1b, one row per lens run: delta CE (paired) and lens-space FVU against no lens."""
    base = data["runs"].get(data["compare_point"])
    paired = (data["sweeps"] or {}).get("lens_vs_raw", [])
    rows = []
    for name, entry in params.sweep.items():
        run = data["runs"].get(name)
        if not entry.lens or run is None or base is None:
            continue
        method = entry.lens_method or params.lens.method
        m, b = run["mean"], base["mean"]
        ce = [r for r in paired if r["to"] == name and r["metric"] == "delta_ce"]
        se = math.hypot(m["fvu_se"], b["fvu_se"])
        fvu_drops = b["fvu"] - m["fvu"] > Z95 * se
        ce_drops = steps_verdict(ce, "b lower") == "reproduced"
        verdict = {2: "reproduced", 1: "partly", 0: "not reproduced"}[fvu_drops + ce_drops]
        paper = m.get("delta_ce_paper")
        rows.append(
            row(
                f"table1b_{method}",
                "Table 1b",
                "with a tuned lens, FVU and delta CE mostly drop",
                f"{method} lens: FVU {m['fvu']:.3f} ± {m['fvu_se']:.3f} in lens space vs "
                f"{b['fvu']:.3f} ± {b['fvu_se']:.3f} without ({m['fvu_raw']:.3f} raw); delta CE "
                f"{m['delta_ce']:.3f} ± {m['delta_ce_se']:.3f} vs {b['delta_ce']:.3f}"
                + (
                    f"; the original's lens-perturbed delta CE {paper:.3f}"
                    if paper is not None
                    else ""
                )
                + (f"; {paired_text(ce[0])}" if ce else ""),
                "delta CE: paired bootstrap over shared (context, layer) pairs; FVU: lens space vs "
                "raw space, unpaired (different targets), 1.96 SE",
                max_mde(ce),
                "both drop: reproduced; one: partly; neither: not reproduced",
                verdict,
                {
                    "fvu": m["fvu"],
                    "fvu_se": m["fvu_se"],
                    "fvu_raw": m["fvu_raw"],
                    "delta_ce": m["delta_ce"],
                    "delta_ce_se": m["delta_ce_se"],
                    "delta_ce_paper": paper,
                    "baseline": data["compare_point"],
                },
                method=method,
                paired=ce,
            )
        )
    return rows


def sweep_rows(data: dict) -> list[dict]:
    """Appendix B: FVU and delta CE fall with R and with k (every step, paired)."""
    rows = []
    for group in ("R", "k"):
        steps = [
            r
            for r in (data["sweeps"] or {}).get("differences", {}).get(group, [])
            if r["metric"] in ("fvu", "fvu_raw", "delta_ce") and r.get("paired")
        ]
        if not steps:
            continue
        rows.append(
            steps_row(
                f"sweep_{group}",
                "Appendix B",
                f"FVU and delta CE fall as {group} grows",
                "; ".join(paired_text(r) for r in steps),
                "paired bootstrap per step over shared contexts (FVU: D fixed)",
                steps,
                "b lower",
            )
        )
    return rows


def baselines_row(res: dict) -> dict:
    """Appendix B: the MLSAE against single-layer SAEs of its size and budget, per layer."""
    rows = [r | {"from": f"single layer {r['layer']}", "to": "MLSAE"} for r in res["paired"]]
    worse = [r for r in rows if r["verdict"] == "b higher"]
    verdict = (
        "reproduced" if not worse else "not reproduced" if len(worse) == len(rows) else "partly"
    )
    text = "; ".join(
        f"layer {r['layer']} {r['metric']} {r['difference']:+.3f} ({r['verdict']})" for r in rows
    )
    return row(
        "single_layer",
        "Appendix B",
        "MLSAEs reach FVU and delta CE comparable to single-layer SAEs",
        f"MLSAE minus single-layer SAE ({res.get('tokens_trained', '?')} tokens each): {text}",
        "paired bootstrap per (layer, metric) over shared contexts",
        max_mde(rows),
        "'comparable' = not detectably worse: at no (layer, metric) reproduced; at all: not "
        "reproduced; else partly",
        verdict,
        {"worse": len(worse), "pairs": len(rows)},
        paired=rows,
    )


def lens_kl_row(lens: dict) -> dict:
    """Belrose et al.: the tuned lens's KL below the logit lens's at every non-final layer."""
    logit = lens["logit_lens"][:-1]
    methods = lens.get("methods") or {
        lens.get("default_method", "default"): {"kl": lens["tuned_lens"]}
    }
    parts, below = [], {}
    for method, r in methods.items():
        kl = r["kl"][:-1]
        below[method] = sum(a < b for a, b in zip(kl, logit, strict=True))
        parts.append(f"{method} {sum(kl) / len(kl):.2f} ({below[method]}/{len(kl)} layers below)")
    default = lens.get("default_method") or next(iter(methods))
    ok = below.get(default) == len(logit)
    return row(
        "lens_kl",
        "Belrose et al.",
        "tuned-lens KL below the logit lens's",
        f"held-out KL over non-final layers: logit lens {sum(logit) / len(logit):.2f}; "
        + "; ".join(parts),
        "none (per-layer means; the gaps are many nats)",
        None,
        "the default lens below the logit lens at every non-final layer",
        "reproduced" if ok else "partly" if below.get(default) else "not reproduced",
        {"below": below, "default": default},
    )


def verdicts(params, data: dict) -> list[dict]:
    """Every row whose results exist (`load`), in the catalogue's order."""
    base = params.analysis.baseline_run
    rows = []
    if data["drift"]:
        rows.append(drift_row(data["drift"]))
    if data["runs"].get(base):
        rows.append(table1a_row(data["runs"][base], base))
    rows += lens_rows(params, data)
    rows += sweep_rows(data)
    if data["baselines"] and data["baselines"].get("paired"):
        rows.append(baselines_row(data["baselines"]))
    if data["lens_kl"]:
        rows.append(lens_kl_row(data["lens_kl"]))
    lat = data["latents"]
    if lat and base in lat.get("runs", {}):
        rows += [figure2_row(lat, base), figure3_row(lat, base), variance_row(lat, base)]
        rows += [activity_row(lat), mmcs_row(lat, base)]
    return rows


def markdown(rows: list[dict], source: str, by_tokens: list[dict] | None = None) -> str:
    """The verdict table (``figures/verdicts.md``), and `length_table` of ``by_tokens``."""
    lines = [
        f"# Verdicts on the paper's claims ({source})",
        "",
        "Generated by stage `verdicts` (`mlsae/verdicts.py`) from `results/`. Power: for a "
        "difference the MDE80, the difference its test detects with 80% power (2.80 SE); for an "
        "interval, its half-width.",
        "",
        "| paper | claim | measured | test (power) | rule | verdict | by training length |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        power = "" if r["power"] is None else f" (power {r['power']:.3g})"
        by = r.get("by_tokens")
        by_text = ", ".join(f"{t}: {v}" for t, v in by.items()) if by else ""
        lines.append(
            f"| {r['paper']} | {r['claim']} | {r['measured']} | {r['test']}{power} | "
            f"{r['rule']} | **{r['verdict']}** | {by_text} |"
        )
    return "\n".join(lines + length_table(by_tokens or [])) + "\n"


def write(params, out_dir: str | Path = ".") -> list[dict]:
    """Stage ``verdicts``: `verdicts` of `load` to ``results/verdicts.json`` and the markdown."""
    data = load(params, out_dir)
    rows = verdicts(params, data)
    source = f"{params.base.model} on {params.base.corpus}"
    write_json(paths.results(out_dir, "verdicts.json"), {"rows": rows, "source": source})
    out = Path(out_dir, "figures", "verdicts.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, source, (data["latents"] or {}).get("by_tokens")))
    return rows
