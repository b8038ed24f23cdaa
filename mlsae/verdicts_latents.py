"""Verdicts on the latent findings (Figures 2-3, section 4.2) from ``results/latents.json``.

Each is also decided at every training snapshot of the baseline run where its number is in the
snapshot's findings (``by_tokens``), with the final SAE's standard error.
"""

from __future__ import annotations

import math

from mlsae.verdict_rules import (
    LOG_BAND,
    MDE_FACTOR,
    NO_DIFFERENCE,
    SEVERAL,
    Z95,
    by_tokens,
    depends,
    interval_verdict,
    paired_text,
    row,
    steps_row,
)


def figure2_row(lat: dict, run: str) -> dict:
    """Figure 2: over many tokens latents are active at several layers (non-saturating measure)."""
    f = lat["runs"][run]["findings"]
    b, null = f["bootstrap"], f["effective_layers"].get("null", {})
    m = b["layers_ge5pct_mean"]

    def rule(ci):
        return "reproduced" if ci and ci[0] > SEVERAL else "not reproduced"

    verdict = rule(m["ci"]) if m["ci"] else "not measured"
    by = by_tokens(lat.get("by_tokens", []), "layers_ge5pct_mean", m["se"], rule)
    ci = m["ci"] or [math.nan, math.nan]
    return row(
        "figure2",
        "Figure 2",
        "over many tokens, many latents are active at several layers",
        f"{run}: layers holding >= 5% of a latent's mass {m['value']:.2f} (95% CI {ci[0]:.2f}-"
        f"{ci[1]:.2f}), >= 1%: {b['layers_ge1pct_mean']['value']:.2f}; exp(H) "
        f"{b['exp_entropy_mean']['value']:.2f} layers against "
        f"{null.get('shuffled_mean', math.nan):.2f} with layer labels shuffled",
        "95% bootstrap interval over held-out contexts",
        m["se"] and Z95 * m["se"],
        f"the interval of the mean number of layers holding >= 5% of the mass above {SEVERAL:g}",
        verdict,
        {"layers_ge5pct_mean": m["value"], "ci": m["ci"]},
        by_tokens=by,
        depends_on_training_length=depends(by, verdict),
    )


def _prompt_text(mean_layers: float | None, pct: float | None) -> str:
    if mean_layers is None or pct is None:
        return "not measured"
    return f"{mean_layers:.2f} ({pct:.0f}th pct. of the windows)"


def figure3_row(lat: dict, run: str) -> dict:
    """Figure 3: one prompt shows far fewer layers per latent than the aggregate."""
    w = lat["runs"][run]["findings"]["windows"]
    if not w or not w.get("mean_layers_spread"):
        return row(
            "figure3",
            "Figure 3",
            "for one prompt, far fewer layers per latent",
            "",
            "",
            None,
            "",
            "not measured",
            {},
        )
    spread, total = w["mean_layers_spread"], w["test_set_mean_layers"]
    far = spread["q90"] < total / 2
    pct = w.get("prompt_percentile")
    typical = pct is not None and 5 <= pct <= 95
    prompt = (w.get("prompt") or {}).get("mean_layers")
    single = lat["runs"][run]["findings"]["bootstrap"]["frac_single_layer"]["value"]
    return row(
        "figure3",
        "Figure 3",
        "for one prompt, far more latents are active at a single layer",
        f"{run}: layers per active latent in {w['n_windows']} random {w['n_tokens']}-token windows "
        f"{spread['q10']:.2f}-{spread['q90']:.2f} (10th-90th pct.) against {total:.2f} over the "
        f"test set; the paper's prompt {_prompt_text(prompt, pct)}; active "
        f"(token, latent) pairs at one layer only: {single:.3f}",
        "the windows' distribution (a reference distribution, not a difference test)",
        None,
        "the windows' 90th percentile below half the test-set value, and the prompt between "
        "their 5th and 95th percentiles: reproduced; the first only: partly",
        "reproduced" if far and typical else "partly" if far else "not reproduced",
        {"windows_q90": spread["q90"], "test_set": total, "prompt_percentile": pct},
    )


def variance_row(lat: dict, run: str) -> dict:
    """Section 4.2: the variance ratio, ~100x; decided by the ratio of variances."""
    b = lat["runs"][run]["findings"]["bootstrap"]
    r, p0, p1 = b["ratio_of_variances"], b["paper_0based"], b["paper_1based"]

    def rule(ci):
        return interval_verdict(ci, *LOG_BAND) or "not measured"

    verdict = rule(r["ci"])
    by = by_tokens(lat.get("by_tokens", []), "ratio_of_variances", r["se"], rule)

    def ci(m):
        return f" (95% CI {m['ci'][0]:.1f}-{m['ci'][1]:.1f})" if m.get("ci") else ""

    return row(
        "variance_ratio",
        "section 4.2",
        "a latent's layer variance aggregated over tokens is ~100x that of one token",
        f"{run}: ratio of variances {r['value']:.1f}x{ci(r)}; the original formula "
        f"{p0['value']:.1f}x{ci(p0)} with layers numbered from 0, "
        f"{p1['value']:.1f}x{ci(p1)} from 1",
        "95% bootstrap interval over held-out contexts (ratio of variances)",
        r["se"] and Z95 * r["se"],
        "interval within 10^1.5-10^2.5: reproduced; above 1 only: partly (same direction); the "
        "original formula depends on where layer numbering starts and decides nothing",
        verdict,
        {
            "ratio_of_variances": r["value"],
            "paper_0based": p0["value"],
            "paper_1based": p1["value"],
        },
        by_tokens=by,
        depends_on_training_length=depends(by, verdict),
    )


def activity_row(lat: dict) -> dict:
    """Section 4.2: multi-layer activity (mean layer std) grows with R, at matched activations."""
    points = sorted(lat.get("sweep", {}).get("R", []), key=lambda p: p["R"])
    steps = []
    for a, b in zip(points, points[1:], strict=False):
        ma, mb = ((p["matched"] or p["raw"])["layer_std_mean"] for p in (a, b))
        if ma["se"] is None or mb["se"] is None:
            continue
        d, se = mb["value"] - ma["value"], math.hypot(ma["se"], mb["se"])
        v = "b higher" if d > Z95 * se else "b lower" if d < -Z95 * se else NO_DIFFERENCE
        steps.append(
            {
                "from": a["run"],
                "to": b["run"],
                "metric": "layer_std_mean",
                "difference": d,
                "se": se,
                "mde80": MDE_FACTOR * se,
                "verdict": v,
            }
        )
    return steps_row(
        "activity_R",
        "section 4.2",
        "multi-layer activity grows with the number of latents",
        "mean layer std at matched activations per latent: "
        + "; ".join(
            f"R = {p['R']:g} {(p['matched'] or p['raw'])['layer_std_mean']['value']:.3f}"
            for p in points
        )
        + ("; " + "; ".join(paired_text(s, "unpaired") for s in steps)),
        "difference of bootstrap estimates, unpaired SE (the matched subsets differ), 1.96 SE",
        steps,
        "b higher",
    )


def mmcs_row(lat: dict, run: str) -> dict:
    """Section 4.2: the decoder's MMCS (not comparable at another R)."""
    mmcs = lat["runs"][run]["decoder"]["mmcs_self"]
    return row(
        "mmcs",
        "section 4.2",
        "decoder similarity (MMCS)",
        f"{run}: MMCS {mmcs:.3f}",
        "none",
        None,
        "not comparable at R = 8 against the paper's R = 64",
        "not comparable",
        {"mmcs": mmcs},
    )


LENGTH_COLUMNS = (
    ("layers_ge5pct_mean", "layers >= 5% of mass"),
    ("exp_entropy_mean", "exp(H)"),
    ("exp_entropy_null_mean", "exp(H), shuffled"),
    ("layer_std_mean", "mean layer std"),
    ("ratio_of_variances", "ratio of variances"),
    ("variance_ratio_paper_0based", "original, 0-based"),
    ("frac_single_layer", "pairs at one layer"),
    ("window_mean_layers", "layers per latent, windows"),
)
"""Columns of the training-length table: `mlsae.analysis.flat_findings` keys and their labels."""


def length_table(by_tokens: list[dict]) -> list[str]:
    """Markdown lines: the baseline run's latent findings at each training length."""
    if not by_tokens:
        return []
    lines = [
        "",
        "## Latent findings against training length (baseline run, held-out test cache)",
        "",
        "| tokens | " + " | ".join(label for _, label in LENGTH_COLUMNS) + " |",
        "|---" * (len(LENGTH_COLUMNS) + 1) + "|",
    ]
    for r in by_tokens:
        cells = [f"{r[k]:.3f}" if r.get(k) is not None else "" for k, _ in LENGTH_COLUMNS]
        tokens = f"{r['tokens']:,}" + (" (final)" if r.get("final") else "")
        lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
    return lines
