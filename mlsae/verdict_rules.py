"""The rules of `mlsae.verdicts`: the verdict names, bounds and how a test becomes a verdict."""

from __future__ import annotations

import math

VERDICTS = ("reproduced", "partly", "not reproduced", "not comparable", "not measured")
Z95 = 1.959963984540054
MDE_FACTOR = 2.801585218
"""z_0.975 + z_0.80: the difference detectable at 80% power, in standard errors."""
NO_DIFFERENCE = "no detectable difference"
LOG_BAND = (10**1.5, 10**2.5)
""""About two orders of magnitude": the variance ratio's interval must lie within 10^(2 +- 0.5)."""
SEVERAL = 2.0
"""Figure 2's "active at several layers": more than this many layers hold >= 5% of the mass."""


def steps_verdict(rows: list[dict], expect: str) -> str:
    """Every row's verdict ``expect``: reproduced; none: not reproduced; else partly.

    ``rows``: comparisons with a ``verdict`` ("b lower", "b higher" or `NO_DIFFERENCE`); no
    rows: "not measured".
    """
    if not rows:
        return "not measured"
    hits = sum(r["verdict"] == expect for r in rows)
    return "reproduced" if hits == len(rows) else "not reproduced" if hits == 0 else "partly"


def interval_verdict(ci: list[float] | None, low: float, high: float = math.inf) -> str | None:
    """A 95% interval within ``[low, high]``: reproduced; above 1 but not within: partly.

    Else "not reproduced"; None without an interval.
    """
    if not ci:
        return None
    if low <= ci[0] and ci[1] <= high:
        return "reproduced"
    return "partly" if ci[0] > 1 else "not reproduced"


def max_mde(rows: list[dict]) -> float | None:
    """The largest ``mde80`` of ``rows`` (the power of the weakest test), None without one."""
    mdes = [r["mde80"] for r in rows if r.get("mde80") is not None]
    return max(mdes) if mdes else None


def paired_text(r: dict, kind: str = "paired") -> str:
    """One comparison: ``from -> to metric difference (SE, MDE80; verdict)``."""
    return (
        f"{r['from']} -> {r['to']} {r['metric']} {r['difference']:+.4f} "
        f"({kind} SE {r['se']:.4f}, MDE80 {r['mde80']:.4f}; {r['verdict']})"
    )


def row(key, paper, claim, measured, test, power, rule, verdict, numbers, **extra) -> dict:
    """A verdict row (the fields of `mlsae.verdicts`); ``verdict`` must be one of `VERDICTS`."""
    if verdict not in VERDICTS:
        raise ValueError(f"{key}: verdict {verdict!r} is not one of {VERDICTS}")
    fields = {"key": key, "paper": paper, "claim": claim, "measured": measured, "test": test}
    fields |= {"power": power, "rule": rule, "verdict": verdict, "numbers": numbers}
    return fields | extra


def by_tokens(rows: list[dict], key: str, se: float | None, rule) -> dict | None:
    """``{tokens: rule(value +- 1.96 se)}`` for each snapshot row holding ``key``.

    ``rows``: ``results/latents.json``'s ``by_tokens`` (one per training length); ``se``: the
    final SAE's standard error, standing in for each snapshot's (None: no rows decided).
    """
    if se is None:
        return None
    out = {}
    for r in rows:
        if r.get(key) is not None:
            out[str(r["tokens"])] = rule([r[key] - Z95 * se, r[key] + Z95 * se])
    return out


def depends(by: dict | None, verdict: str) -> bool | None:
    """Whether any training length's verdict differs from the final one (None: not decided)."""
    return None if not by else any(v != verdict for v in by.values())


def steps_row(key, paper, claim, measured, test, steps: list[dict], expect: str) -> dict:
    """A `row` decided by `steps_verdict` of ``steps`` (power: their largest MDE80)."""
    word = {"b lower": "lower", "b higher": "higher"}[expect]
    rule = f"every step {word}: reproduced; none: not reproduced; else partly"
    verdict = steps_verdict(steps, expect)
    return row(key, paper, claim, measured, test, max_mde(steps), rule, verdict,
               {"steps": len(steps)}, paired=steps)  # fmt: skip
