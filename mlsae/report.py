"""The sentences under each notebook's figure, filled in from the results.

Each says what the figure shows and what the paper reports beside it (Lawson et al. 2025;
numbers from the paper's text and Table 1). Every fact about our own setup (model, corpus, lens,
layer count, budgets) comes from the params, the model or the results passed in, so the text
stays true for the default (SmolLM2 on Brown) and for the paper preset (Pythia on the Pile).

Each function takes the stage's own results and returns markdown; notebooks pass it to
`mlsae.notebook.explain`. Nothing here computes a metric.
"""

from __future__ import annotations

import math
import re

from mlsae import config

PAPER_TABLE1 = {  # R = 64, k = 32: FVU (the original code's definition), L1, delta CE (nats)
    "Pythia-70m": (0.097, 66.5, 0.565),
    "Pythia-160m": (0.106, 76.1, 0.432),
    "Pythia-70m + tuned lens": (0.030, 61.5, 0.274),
}
PAPER_VARIANCE_RATIO = 100.0
"""Section 4.2: aggregated over tokens, a latent's variance over layers is ~two orders of magnitude
its per-token variance."""
PAPER_RUN = {"expansion_factor": 64, "k": 32, "train_tokens": 1_000_000_000}
"""The setup of the paper's Table 1 rows: R = 64, k = 32, 1B training tokens of the Pile."""
SETTLED = 0.05
"""`lens`: a relative change of the training KL under this between the last two quarters of the
steps is "settled"."""


def _source(params) -> str:
    return f"{params.base.model} on {params.base.corpus}"


def _pm(value: float, se: float | None) -> str:
    return f"{value:.3f}" if se is None or math.isnan(se) else f"{value:.3f} ± {se:.3f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _label_kind(params) -> str:
    """What a corpus's document labels are: Brown's genres, a text corpus's file names."""
    corpus = params.base.corpus
    if corpus == "brown":
        return "Brown genres"
    if corpus.startswith("text:"):
        return "document labels (file names)"
    return "document labels"


def _paper_row(model: str) -> str | None:
    """The PAPER_TABLE1 row of a Pythia model id (deduped or not), or None."""
    match = re.fullmatch(r"(?:EleutherAI/)?pythia-(70m|160m)(?:-deduped)?", model, re.IGNORECASE)
    return f"Pythia-{match.group(1).lower()}" if match else None


def _is_pile(corpus: str) -> bool:
    return "pile" in corpus.lower()


def lens_verdict(history: list[float]) -> tuple[float, str] | None:
    """The lens training's trend: relative change and ``rising``/``still falling``/``settled``.

    The change is of the mean training KL over the last quarter of the steps against the quarter
    before; under `SETTLED` either way is settled. None for under 8 steps.
    """
    if len(history) < 8:
        return None
    q = len(history) // 4
    first, last = sum(history[-2 * q : -q]) / q, sum(history[-q:]) / q
    if first == 0:
        change = 0.0 if last == 0 else math.copysign(math.inf, last)
    else:
        change = (last - first) / abs(first)
    if change > SETTLED:
        return change, "rising"
    if change < -SETTLED:
        return change, "still falling"
    return change, "settled"


def data_mix(summary: dict, params) -> str:
    """Stage 01: what the caches hold."""
    kind = _label_kind(params)
    lines = [f"**Data** ({_source(params)}):"]
    for split, s in summary.items():
        if s.get("source") == "stream":
            lines.append(f"- {split}: none cached; training runs the model on the fly.")
            continue
        text = (
            f"- {split}: {s['tokens']:,} tokens in {s['contexts']} contexts from "
            f"{s['documents']} documents"
        )
        if s["labels"]:
            text += f" covering {s['labels']} {kind}."
        else:
            text += f" with no document labels ({params.base.corpus} has none)."
        lines.append(text)
    if params.base.corpus.startswith("hf:"):
        sampling = (
            "Cached contexts are the first of the streamed split after a shuffle buffer of "
            f"{params.data.shuffle_documents:,} documents"
        )
    else:
        sampling = (
            "Cached contexts are sampled across every document of the split, so even a small "
            "cache spans the corpus"
        )
    tokens = params.data.train_tokens
    training = (
        f"training streams {tokens:,} tokens through the model"
        if params.train.source == "stream"
        else f"training reads the training cache (a budget of {tokens:,} tokens in whole contexts)"
    )
    lines.append(f"{sampling}; {training}. The paper streams 1B tokens of the Pile in order.")
    return "\n".join(lines)


def drift(result: dict, params) -> str:
    """Stage 02 (Figure 1)."""
    cos, centred, norm = result["cosine"], result["cosine_centred"], result["norm"]
    low = min(range(len(cos)), key=cos.__getitem__)
    top = max(range(len(norm)), key=norm.__getitem__)
    if top > 0:
        growth = f"grows from {norm[0]:.1f} at layer 0 to {norm[top]:.1f} at layer {top}"
    else:
        growth = f"is largest at layer 0 ({norm[0]:.1f}) and ends at {norm[-1]:.1f}"
    return (
        f"**What this shows** ({_source(params)}, {int(result['n_tokens'][0]):,} held-out tokens): "
        f"a token's residual vectors at adjacent block outputs have mean cosine similarity "
        f"{sum(cos) / len(cos):.3f} (lowest {cos[low]:.3f}, between layers {low} and {low + 1}); "
        f"with each layer's mean removed, {sum(centred) / len(centred):.3f}. The residual norm "
        f"{growth}.\n\n"
        "**Against the paper** (Figure 1): adjacent layers are highly similar and the similarity "
        "grows with model size (Pythia 70m to 1.4b). One model here, so only the first half of "
        "the claim can be checked; it holds when the raw cosine stays high. The mean-centred "
        "curve shows how much of that similarity is a shared per-layer offset."
    )


def _lens_origin(params) -> str:
    """Where this run's lens came from, and how that compares with the paper's."""
    model, published = params.base.model, params.base.model in config.PUBLISHED_LENSES
    if params.lens.train:
        there = (
            f"a published lens exists for {model} ({config.HUB_REPO}), but `lens.train` is true"
            if published
            else f"none is published for {model}"
        )
        return (
            f"this lens was trained here on the training cache ({params.lens.steps} steps of "
            f"{params.lens.batch_tokens} tokens, `lens` in the params file): {there}."
        )
    if params.lens.lens_dir:
        where = f"`{params.lens.lens_dir}/lens/{model}`"
        if published:
            where += f" (or, where that folder holds none, the hub's {config.HUB_REPO})"
        return f"this lens was loaded, not trained, from {where}."
    same = " as the paper did" if published and "pythia" in model.lower() else ""
    return (
        f"this lens was loaded, not trained: the published tuned lens for {model} from the hub "
        f"({config.HUB_REPO}){same}."
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
    verdict = lens_verdict(history)
    if verdict is not None:
        change, word = verdict
        text += (
            f" Training KL over the last quarter of the steps moved {100 * change:+.1f}% against "
            f"the quarter before ({word}: we call a change under {100 * SETTLED:.0f}% settled)."
        )
    elif not history and not params.lens.train:
        text += " A loaded lens has no training curve."
    text += (
        "\n\n**Against the paper**: the paper used the published tuned lenses of Belrose et al. "
        f"for Pythia (trained to convergence); {_lens_origin(params)}"
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


def _differences(params, entry, tokens: float | None) -> list[str]:
    """What of model, corpus, size and budget differs from the paper's Table 1 setup."""
    out = []
    if _paper_row(params.base.model) is None:
        out.append("model")
    if not _is_pile(params.base.corpus):
        out.append("corpus")
    if (entry.expansion_factor, entry.k) != (PAPER_RUN["expansion_factor"], PAPER_RUN["k"]):
        out.append("size")
    if tokens is None or not math.isfinite(tokens):
        tokens = entry.train_tokens or params.data.train_tokens
    if abs(tokens - PAPER_RUN["train_tokens"]) > 0.01 * PAPER_RUN["train_tokens"]:
        out.append("budget")
    return out


def table1(table, params) -> str:
    """Stage 06 (Table 1)."""
    base = params.analysis.baseline_run
    entry = params.sweep[base]
    row = table[table["run"] == base].iloc[0]
    paper = _paper_row(params.base.model) or "Pythia-70m"
    ref = PAPER_TABLE1[paper]
    tokens = row["train tokens"] if "train tokens" in row else None
    differ = _differences(params, entry, None if tokens is None else float(tokens))
    if not differ:
        verdict = (
            "Model, corpus, size and budget are the paper's, so the paper's column is the one to "
            "set beside the paper's numbers."
        )
    else:
        names = ", ".join(differ[:-1]) + (" and " if len(differ) > 1 else "") + differ[-1]
        verb = "differs" if len(differ) == 1 else "all differ" if len(differ) == 4 else "differ"
        verdict = (
            f"{names[0].upper()}{names[1:]} {verb} from the paper's, so the numbers show the same "
            "regime rather than a reproduction."
        )
    return (
        f"**Table 1 for {_source(params)}**: {base} (R = {entry.expansion_factor:g}, "
        f"k = {entry.k}) has FVU {row['FVU']:.3f} in our definition "
        f"and {row['FVU (paper def.)']:.3f} in the paper's, L1 {row['L1']:.1f} and delta CE "
        f"{_pm(row['delta CE'], row['delta CE SE'])} nats. The paper's {paper} (R = "
        f"{PAPER_RUN['expansion_factor']}, k = {PAPER_RUN['k']}, 1B tokens of the Pile) has FVU "
        f"{ref[0]}, L1 {ref[1]} and delta CE {ref[2]}. The paper's FVU divides by the variance "
        "of all entries around one scalar mean, ours by the spread around each dimension's mean "
        "(larger denominators make the paper's smaller); compare the paper's column with the "
        f"paper. {verdict}"
    )


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def baselines(result: dict, params) -> str:
    """Stage 07: single-layer SAEs vs the MLSAE.

    ``result["n_layers"]``: the model's layer count, which the MLSAE covers (absent: "every
    layer").
    """
    fvu, ce = result["fvu"], result["delta_ce"]
    own_f = [fvu[i][i] for i in range(len(fvu) - 1)]
    own_c = [ce[i][i] for i in range(len(ce) - 1)]
    n_layers = result.get("n_layers")
    covered = "every layer" if n_layers is None else _plural(int(n_layers), "layer")
    return (
        f"**What this shows** ({_source(params)}): at the baseline layers "
        f"{result['layers']}, single-layer SAEs at their own layer reach mean FVU "
        f"{_mean(own_f):.3f} and delta CE {_mean(own_c):.3f}; the MLSAE {result['run']}, one SAE "
        f"for every layer with the same size and token budget, {_mean(fvu[-1]):.3f} and "
        f"{_mean(ce[-1]):.3f} ({result['n_ce_tokens']:,} predictions). Off the diagonal a "
        "single-layer SAE is evaluated at layers it never saw.\n\n"
        "**Against the paper**: MLSAEs reach reconstruction and downstream loss comparable to "
        f"single-layer SAEs; here the MLSAE shares its budget with {covered} and is compared at "
        "equal size, so the gap is the price of covering every layer."
    )


def _verdict_line(r: dict) -> str:
    """One paired comparison: difference, SE, 95% CI, the smallest difference it could detect."""
    if not r.get("paired"):
        verdict = "within noise" if r["within_noise"] else "beyond 2 SE"
        return f"{r['difference']:+.3f} ± {r['se']:.3f} (unpaired, {verdict})"
    return (
        f"{r['difference']:+.3f} ± {r['se']:.3f} (95% CI {r['ci_low']:+.3f} to "
        f"{r['ci_high']:+.3f}, p = {r['p']:.3f}; detectable at 80% power: "
        f"{r['mde80']:.3f}): **{r['verdict']}**"
    )


def sweeps(differences: dict, params) -> str:
    """Stage 08: which steps of the R and k sweeps the paired test can tell from noise."""
    lines = [
        f"**Sweeps** ({_source(params)}; each step b - a by a paired bootstrap over the shared "
        "held-out contexts, `mlsae.compare`; the verdict is whether the 95% CI excludes 0):"
    ]
    for group, rows in differences.items():
        for r in rows:
            lines.append(f"- {group}: {r['from']} -> {r['to']}, {r['metric']} {_verdict_line(r)}")
    lines.append(
        "\n**Against the paper** (Appendix B): FVU and delta CE fall as R and k grow; with the "
        "lens they mostly drop further."
    )
    return "\n".join(lines)


def _ci(m: dict | None, unit: str = "") -> str:
    if not m or m.get("value") is None:
        return "n/a"
    ci = m.get("ci")
    band = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
    return f"{m['value']:.2f}{unit}{band}"


def latents(summaries: dict[str, dict], params) -> str:
    """Stage 09 (Figures 2-3, section 4.2).

    ``summaries``: per run label, its ``summary`` (`mlsae.analysis.summary`), or a stage result
    ``{"summary", "findings"}`` whose bootstrap measures are then quoted too.
    """
    lines = [f"**Latents over layers** ({_source(params)}):"]
    for name, res in summaries.items():
        s = res.get("summary", res)
        b = (res.get("findings") or {}).get("bootstrap") or {}
        line = (
            f"- {name}: {s['n_latents_active']:,} active latents, active at "
            f"{s['mean_layers_active_ge1']:.1f} layers on average (>= 1 activation; this count "
            "saturates with the number of tokens)"
        )
        if b:
            line += (
                f"; layers holding >= 1% of a latent's mass {_ci(b.get('layers_ge1pct_mean'))}, "
                f">= 5% {_ci(b.get('layers_ge5pct_mean'))}; exp(H) "
                f"{_ci(b.get('exp_entropy_mean'))} layers; variance ratio: the original formula "
                f"{_ci(b.get('paper_0based'), 'x')} with layers numbered from 0 and "
                f"{_ci(b.get('paper_1based'), 'x')} from 1, the ratio of variances "
                f"{_ci(b.get('ratio_of_variances'), 'x')}."
            )
        else:
            line += (
                f"; variance ratio {s['variance_ratio_paper']:.1f}x in the paper's definition and "
                f"{s['variance_ratio']:.1f}x in ours."
            )
        lines.append(line)
    lines.append(
        f"\n**Against the paper** (section 4.2): aggregated over tokens a latent's distribution "
        f"over layers has ~{PAPER_VARIANCE_RATIO:.0f}x the variance it has on one token, and "
        "heatmaps sorted by mean layer show latents concentrated near a diagonal band. The "
        "threshold figure counts, per latent, the layers at which it fires at least t times."
    )
    return "\n".join(lines)
