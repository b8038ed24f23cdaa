"""Verdict rules (`mlsae.verdicts`) on hand-built results whose verdicts are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlsae import config, paths
from mlsae.verdict_rules import by_tokens, depends, interval_verdict, row, steps_verdict
from mlsae.verdicts import baselines_row, lens_rows, markdown, sweep_rows, verdicts, write
from mlsae.verdicts_latents import activity_row, figure2_row, figure3_row, variance_row

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = config.load(ROOT / "params.yaml")


def three_lenses():
    """params.yaml with the other lenses' runs that its comment lists."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["lens_sweep"] |= {
        f"r8-k32-lens-{m}": {"expansion_factor": 8, "k": 32, "lens_method": m}
        for m in ("ridge", "regression")
    }
    return config.from_dict(raw)


def step(a, b, metric, verdict, diff=-0.01, se=0.002):
    return {
        "from": a,
        "to": b,
        "metric": metric,
        "difference": diff,
        "se": se,
        "mde80": 2.8 * se,
        "verdict": verdict,
        "paired": True,
    }


def test_steps_verdict_all_some_none():
    lower, flat = (
        step("a", "b", "fvu", "b lower"),
        step("a", "b", "fvu", "no detectable difference"),
    )
    assert steps_verdict([lower, lower], "b lower") == "reproduced"
    assert steps_verdict([lower, flat], "b lower") == "partly"
    assert steps_verdict([flat, step("a", "b", "fvu", "b higher")], "b lower") == "not reproduced"
    assert steps_verdict([], "b lower") == "not measured"


def test_interval_verdict_band_direction_and_missing():
    assert interval_verdict([40.0, 90.0], 31.6, 316.0) == "reproduced"
    assert interval_verdict([8.0, 12.0], 31.6, 316.0) == "partly"  # above 1, below the band
    assert interval_verdict([20.0, 60.0], 31.6, 316.0) == "partly"  # straddles the lower bound
    assert interval_verdict([0.5, 3.0], 31.6, 316.0) == "not reproduced"
    assert interval_verdict(None, 1.0) is None


def test_by_tokens_uses_the_final_se_and_flags_a_flip():
    rows = [{"tokens": 16000, "x": 1.5}, {"tokens": 64000, "x": 3.0}, {"tokens": 256000}]

    def rule(ci):
        return "reproduced" if ci[0] > 2 else "not reproduced"

    by = by_tokens(rows, "x", 0.1, rule)  # 1.5 +- 0.196 is below 2; 3.0 +- 0.196 above
    assert by == {"16000": "not reproduced", "64000": "reproduced"}
    assert depends(by, "reproduced") is True and depends({"1": "reproduced"}, "reproduced") is False
    assert by_tokens(rows, "x", None, rule) is None and depends(None, "reproduced") is None


def test_row_rejects_an_unknown_verdict():
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        row("k", "p", "c", "m", "t", None, "r", "maybe", {})


def test_sweep_rows_take_fvu_and_delta_ce_steps_but_not_kl():
    data = {
        "sweeps": {
            "differences": {
                "R": [
                    step("r2", "r4", "fvu", "b lower"),
                    step("r2", "r4", "delta_ce", "b lower"),
                    step("r2", "r4", "kl", "b higher"),
                ],
                "k": [
                    step("k16", "k32", "fvu", "b lower"),
                    step("k16", "k32", "delta_ce", "no detectable difference", se=0.01),
                ],
            }
        }
    }
    rows = {r["key"]: r for r in sweep_rows(data)}
    assert rows["sweep_R"]["verdict"] == "reproduced"  # the KL rise does not count
    assert rows["sweep_k"]["verdict"] == "partly"
    assert rows["sweep_k"]["power"] == pytest.approx(0.028)  # the weakest test's MDE80


def test_baselines_row_reads_b_higher_as_the_mlsae_worse():
    rows = [
        step("s", "m", "fvu", "b higher") | {"layer": 0},
        step("s", "m", "fvu", "no detectable difference") | {"layer": 10},
    ]
    assert baselines_row({"paired": rows})["verdict"] == "partly"
    assert baselines_row({"paired": rows})["paired"][0]["from"] == "single layer 0"
    assert baselines_row({"paired": rows[1:]})["verdict"] == "reproduced"
    assert baselines_row({"paired": rows[:1]})["verdict"] == "not reproduced"


def _mean(fvu, fvu_se, delta_ce, **extra):
    return {
        "mean": {
            "fvu": fvu,
            "fvu_se": fvu_se,
            "delta_ce": delta_ce,
            "delta_ce_se": 0.02,
            "fvu_raw": fvu,
            **extra,
        }
    }


def test_lens_rows_need_both_drops_and_name_each_method():
    base = "r8-k32@64000"
    data = {
        "compare_point": base,
        "runs": {
            base: _mean(0.40, 0.004, 1.10),
            "r8-k32-lens": _mean(0.20, 0.003, 0.90, delta_ce_paper=0.5),  # both drop
            "r8-k32-lens-ridge": _mean(0.39, 0.004, 0.95),  # FVU within noise, CE drops
            "r8-k32-lens-regression": _mean(0.10, 0.002, 1.60),  # FVU drops, CE rises
        },
        "sweeps": {
            "lens_vs_raw": [
                step(base, "r8-k32-lens", "delta_ce", "b lower"),
                step(base, "r8-k32-lens-ridge", "delta_ce", "b lower"),
                step(base, "r8-k32-lens-regression", "delta_ce", "b higher", diff=0.5),
            ]
        },
    }
    rows = {r["method"]: r for r in lens_rows(three_lenses(), data)}
    assert rows["belrose"]["verdict"] == "reproduced"
    assert rows["ridge"]["verdict"] == "partly"
    assert rows["regression"]["verdict"] == "partly"
    assert rows["belrose"]["numbers"]["delta_ce_paper"] == 0.5
    assert "lens-perturbed delta CE 0.500" in rows["belrose"]["measured"]


def _interval(value, se):
    return {"value": value, "se": se, "ci": [value - 1.96 * se, value + 1.96 * se]}


def _latents(ge5=4.0, ratio=12.0, q90=6.0, total=28.0, pct=40.0):
    measures = (
        "layers_ge1pct_mean",
        "exp_entropy_mean",
        "paper_0based",
        "paper_1based",
        "frac_single_layer",
    )
    boot = {m: _interval(3.0, 0.1) for m in measures}
    boot |= {"layers_ge5pct_mean": _interval(ge5, 0.2), "ratio_of_variances": _interval(ratio, 1)}
    windows = {
        "n_windows": 400,
        "n_tokens": 14,
        "test_set_mean_layers": total,
        "mean_layers_spread": {"q10": 2.0, "q50": 4.0, "q90": q90, "mean": 4.0},
        "prompt": {"mean_layers": 5.0},
        "prompt_percentile": pct,
    }
    findings = {
        "bootstrap": boot,
        "effective_layers": {"null": {"shuffled_mean": 29.0}},
        "windows": windows,
    }
    return {
        "runs": {"r8-k32": {"findings": findings, "decoder": {"mmcs_self": 0.2}}},
        "by_tokens": [
            {"tokens": 16000, "layers_ge5pct_mean": 1.5, "ratio_of_variances": 12.0},
            {"tokens": 256000, "layers_ge5pct_mean": ge5, "ratio_of_variances": ratio},
        ],
    }


def test_figure2_depends_on_training_length_when_a_snapshot_flips():
    r = figure2_row(_latents(), "r8-k32")
    assert r["verdict"] == "reproduced"  # 4.0 +- 0.39 above 2
    assert r["by_tokens"] == {"16000": "not reproduced", "256000": "reproduced"}
    assert r["depends_on_training_length"] is True
    assert figure2_row(_latents(ge5=2.1), "r8-k32")["verdict"] == "not reproduced"


def test_variance_ratio_in_band_or_only_in_direction():
    assert variance_row(_latents(ratio=100.0), "r8-k32")["verdict"] == "reproduced"
    r = variance_row(_latents(ratio=12.0), "r8-k32")
    assert r["verdict"] == "partly" and r["depends_on_training_length"] is False


def test_figure3_far_below_and_typical_prompt():
    assert figure3_row(_latents(), "r8-k32")["verdict"] == "reproduced"
    assert figure3_row(_latents(pct=99.0), "r8-k32")["verdict"] == "partly"  # atypical prompt
    assert figure3_row(_latents(q90=20.0), "r8-k32")["verdict"] == "not reproduced"


def test_activity_row_compares_matched_layer_std_between_r_steps():
    def point(run, r, value):
        m = {"layer_std_mean": _interval(value, 0.05)}
        return {"run": run, "R": r, "raw": m, "matched": m}

    lat = {"sweep": {"R": [point("r4", 4, 7.0), point("r2", 2, 7.0), point("r8", 8, 7.5)]}}
    r = activity_row(lat)
    assert [(s["from"], s["to"]) for s in r["paired"]] == [("r2", "r4"), ("r4", "r8")]
    assert r["verdict"] == "partly"  # r2 -> r4 flat, r4 -> r8 up by 0.5 (SE 0.07)


def test_write_skips_missing_results_and_renders_the_table(tmp_path):
    out = paths.results(tmp_path, "drift.json")
    out.parent.mkdir(parents=True)
    out.write_text(
        json.dumps({"cosine": [0.9, 0.95], "cosine_centred": [0.85, 0.9], "n_tokens": 10})
    )
    rows = write(DEFAULT, tmp_path)
    assert [r["key"] for r in rows] == ["figure1"] and rows[0]["verdict"] == "partly"
    saved = json.loads(paths.results(tmp_path, "verdicts.json").read_text())
    assert saved["rows"][0]["numbers"]["cosine_centred_mean"] == pytest.approx(0.875)
    text = (tmp_path / "figures" / "verdicts.md").read_text()
    assert "**partly**" in text and text == markdown(rows, saved["source"])
    table = markdown([], "x", [{"tokens": 16000, "layers_ge5pct_mean": 3.25}, {"tokens": 64000}])
    assert "| 16,000 | 3.250 |" in table and "| 64,000 |" in table
    assert (
        verdicts(
            DEFAULT,
            {
                "drift": None,
                "runs": {},
                "compare_point": "x",
                "sweeps": None,
                "baselines": None,
                "lens_kl": None,
                "latents": None,
            },
        )
        == []
    )


def test_figure3_without_the_prompt_is_not_typical():
    lat = _latents()
    lat["runs"]["r8-k32"]["findings"]["windows"] |= {"prompt": None, "prompt_percentile": None}
    r = figure3_row(lat, "r8-k32")
    assert r["verdict"] == "partly" and "prompt not measured" in r["measured"]
