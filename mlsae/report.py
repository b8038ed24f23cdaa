"""The sentences under each notebook's figure, filled in from the results.

Each says what the figure shows and what the paper reports beside it (Lawson et al. 2025;
numbers from the paper's text and Table 1).

Each function takes the stage's own results and returns markdown; notebooks pass it to
`mlsae.notebook.explain`. Nothing here computes a metric.
"""

from __future__ import annotations

import math

PAPER_TABLE1 = {  # R = 64, k = 32: FVU (the original code's definition), L1, delta CE (nats)
    "Pythia-70m": (0.097, 66.5, 0.565),
    "Pythia-160m": (0.106, 76.1, 0.432),
    "Pythia-70m + tuned lens": (0.030, 61.5, 0.274),
}
PAPER_VARIANCE_RATIO = 100.0
"""Section 4.2: aggregated over tokens, a latent's variance over layers is ~two orders of magnitude
its per-token variance."""


def _source(params) -> str:
    return f"{params.base.model} on {params.base.corpus}"


def _pm(value: float, se: float | None) -> str:
    return f"{value:.3f}" if se is None or math.isnan(se) else f"{value:.3f} ± {se:.3f}"


def data_mix(summary: dict, params) -> str:
    """Stage 01: what the caches hold."""
    lines = [f"**Data** ({_source(params)}):"]
    for split, s in summary.items():
        if s.get("source") == "stream":
            lines.append(f"- {split}: none cached; training runs the model on the fly.")
            continue
        lines.append(
            f"- {split}: {s['tokens']:,} tokens in {s['contexts']} contexts from "
            f"{s['documents']} documents covering {s['labels']} document labels (Brown genres)."
        )
    lines.append(
        "Contexts are sampled across every document of the split, so even this small budget "
        "spans the corpus; the paper streams 1B tokens of the Pile in order."
    )
    return "\n".join(lines)


def drift(result: dict, params) -> str:
    """Stage 02 (Figure 1)."""
    cos, centred, norm = result["cosine"], result["cosine_centred"], result["norm"]
    low = min(range(len(cos)), key=cos.__getitem__)
    return (
        f"**What this shows** ({_source(params)}, {int(result['n_tokens'][0]):,} held-out tokens): "
        f"a token's residual vectors at adjacent block outputs have mean cosine similarity "
        f"{sum(cos) / len(cos):.3f} (lowest {cos[low]:.3f}, between layers {low} and {low + 1}); "
        f"with each layer's mean removed, {sum(centred) / len(centred):.3f}. The residual norm "
        f"grows from {norm[0]:.1f} to {max(norm):.1f}.\n\n"
        "**Against the paper** (Figure 1): adjacent layers are highly similar and the similarity "
        "grows with model size (Pythia 70m to 1.4b). One model here, so only the first half of "
        "the claim can be checked; it holds when the raw cosine stays high. The mean-centred "
        "curve shows how much of that similarity is a shared per-layer offset."
    )


def lens(logit: list[float], tuned: list[float], history: list[float], params) -> str:
    """Stage 03: tuned vs logit lens, and whether the lens training settled."""
    n = len(tuned) - 1  # the last layer is the model's own output (KL 0)
    mean_t, mean_l = sum(tuned[:n]) / n, sum(logit[:n]) / n
    better = sum(t < g for t, g in zip(tuned[:n], logit[:n], strict=True))
    text = (
        f"**What this shows** ({_source(params)}): mean held-out KL from the model's final "
        f"distribution over the {n} non-final block outputs is {mean_t:.2f} nats for the tuned "
        f"lens and {mean_l:.2f} for the logit lens; the tuned lens is lower at {better} of {n}."
    )
    if len(history) >= 8:
        q = len(history) // 4
        first, last = sum(history[-2 * q : -q]) / q, sum(history[-q:]) / q
        change = (last - first) / first
        verdict = "settled" if abs(change) < 0.05 else "still falling"
        text += (
            f" Training KL over the last quarter of the steps moved {100 * change:+.1f}% against "
            f"the quarter before ({verdict}: we call a change under 5% settled)."
        )
    text += (
        "\n\n**Against the paper**: the paper uses the published lenses of Belrose et al. (Pythia, "
        "trained to convergence); SmolLM2 has none, so this one is trained here on the training "
        "cache (`lens` in params.yaml)."
    )
    return text


def run(result: dict, fit: dict | None, params, name: str) -> str:
    """Stage 05 (one run): held-out metrics and the training curve."""
    m = result["mean"]
    text = (
        f"**{name}** ({_source(params)}, {result['space']} space, "
        f"{result.get('tokens_trained', 0):,} training tokens): held-out FVU "
        f"{_pm(m['fvu'], m.get('fvu_se'))} (ours) and {m['fvu_paper']:.3f} (the paper's "
        f"definition), L1 {m['l1']:.1f}, delta CE {_pm(m['delta_ce'], m.get('delta_ce_se'))} "
        f"nats, KL {_pm(m['kl'], m.get('kl_se'))} nats (± 1 bootstrap SE over "
        f"{result['n_ce_contexts']} held-out contexts for delta CE and KL, "
        f"{result['n_fvu_contexts']} for FVU)."
    )
    if "fvu_raw" in m:
        text += f" In the raw residual space its FVU is {m['fvu_raw']:.3f}."
    if fit and math.isfinite(fit["tokens_to_target"]):
        text += (
            f"\n\nThe power law fitted to the second half of the training curve "
            f"({fit['a']:.2f} t^{fit['b']:.3f}) reaches training FVU {fit['target']} at about "
            f"{fit['tokens_to_target']:,.0f} tokens."
        )
    return text


def table1(table, params) -> str:
    """Stage 06 (Table 1)."""
    base = params.analysis.baseline_run
    row = table[table["run"] == base].iloc[0]
    p70 = PAPER_TABLE1["Pythia-70m"]
    return (
        f"**Table 1 for {_source(params)}**: {base} has FVU {row['FVU']:.3f} in our definition "
        f"and {row['FVU (paper def.)']:.3f} in the paper's, L1 {row['L1']:.1f} and delta CE "
        f"{_pm(row['delta CE'], row['delta CE SE'])} nats. The paper's Pythia-70m (R = 64, "
        f"k = 32, 1B tokens) has FVU {p70[0]}, L1 {p70[1]} and delta CE {p70[2]}. The paper's "
        "FVU divides by the variance of all entries around one scalar mean, ours by the spread "
        "around each dimension's mean (larger denominators make the paper's smaller); compare "
        "the paper's column with the paper. Model, corpus, size and budget all differ, so the "
        "numbers show the same regime rather than a reproduction."
    )


def baselines(result: dict, params) -> str:
    """Stage 07: single-layer SAEs vs the MLSAE."""
    import numpy as np

    fvu, ce = np.array(result["fvu"]), np.array(result["delta_ce"])
    own_f, own_c = np.diag(fvu[:-1]), np.diag(ce[:-1])
    return (
        f"**What this shows** ({_source(params)}): at the baseline layers "
        f"{result['layers']}, single-layer SAEs at their own layer reach mean FVU "
        f"{own_f.mean():.3f} and delta CE {own_c.mean():.3f}; the MLSAE {result['run']}, one SAE "
        f"for every layer with the same size and token budget, {fvu[-1].mean():.3f} and "
        f"{ce[-1].mean():.3f} ({result['n_ce_tokens']:,} predictions). Off the diagonal a "
        "single-layer SAE is evaluated at layers it never saw.\n\n"
        "**Against the paper**: MLSAEs reach reconstruction and downstream loss comparable to "
        "single-layer SAEs; here the MLSAE shares its budget with 30 layers and is compared at "
        "equal size, so the gap is the price of covering every layer."
    )


def sweeps(differences: dict, params) -> str:
    """Stage 08: which steps of the R and k sweeps are larger than their noise."""
    lines = [f"**Sweeps** ({_source(params)}; a step is *real* when it exceeds 2 bootstrap SEs):"]
    for group, rows in differences.items():
        for r in rows:
            verdict = "within noise" if r["within_noise"] else "real"
            lines.append(
                f"- {group}: {r['from']} -> {r['to']}, {r['metric']} {r['difference']:+.3f} "
                f"± {r['se']:.3f} ({verdict})"
            )
    lines.append(
        "\n**Against the paper** (Appendix B): FVU and delta CE fall as R and k grow; with the "
        "lens they mostly drop further."
    )
    return "\n".join(lines)


def latents(summaries: dict[str, dict], params) -> str:
    """Stage 09 (Figures 2-3, section 4.2)."""
    lines = [f"**Latents over layers** ({_source(params)}):"]
    for name, s in summaries.items():
        lines.append(
            f"- {name}: {s['n_latents_active']:,} active latents, active at "
            f"{s['mean_layers_active_ge1']:.1f} layers on average (>= 1 activation); variance "
            f"ratio {s['variance_ratio_paper']:.1f}x in the paper's definition and "
            f"{s['variance_ratio']:.1f}x in ours."
        )
    lines.append(
        f"\n**Against the paper** (section 4.2): aggregated over tokens a latent's distribution "
        f"over layers has ~{PAPER_VARIANCE_RATIO:.0f}x the variance it has on one token, and "
        "heatmaps sorted by mean layer show latents concentrated near a diagonal band. The "
        "threshold figure counts, per latent, the layers at which it fires at least t times."
    )
    return "\n".join(lines)
