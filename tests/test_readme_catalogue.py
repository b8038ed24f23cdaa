"""The README's catalogue is what `mlsae.readme_catalogue` makes of the committed results."""

import json
from pathlib import Path

import pytest

from mlsae import config, readme_catalogue, saebench_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_catalogue_is_generated_from_the_committed_results():
    """Regenerated results that move any number, verdict or row fail here until `mlsae readme`."""
    text = (ROOT / "README.md").read_text()
    block = readme_catalogue.catalogue(config.load(ROOT / "params.yaml"), ROOT)
    assert readme_catalogue.current(text) == block, "run: python -m mlsae readme"


def test_splice_replaces_only_the_block():
    text = f"a\n{readme_catalogue.START}\nold\n{readme_catalogue.END}\nb\n"
    out = readme_catalogue.splice(text, "new\n")
    assert out == f"a\n{readme_catalogue.START}\nnew\n{readme_catalogue.END}\nb\n"
    assert readme_catalogue.current(out) == "new\n"
    for call in (lambda: readme_catalogue.splice("no markers", "x"),
                 lambda: readme_catalogue.current("no markers")):  # fmt: skip
        with pytest.raises(ValueError, match="markers"):
            call()


def _params():
    return config.from_dict(
        {
            "analysis": {"baseline_run": "a", "compare_tokens": None, "lens_run": "a-lens"},
            "sweep": {"a": {"expansion_factor": 2, "k": 4}},
            "lens_sweep": {"a-lens": {"expansion_factor": 2, "k": 4}},
            "eval": {"ce_contexts": 4},
        }
    )


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_catalogue_rounds_and_labels_hand_built_results(tmp_path):
    """Hand-built results: each cell is the number at 3 decimals, the lens run gets a raw row."""
    mean = {"fvu": 0.12345, "fvu_se": 0.00123, "fvu_paper": 0.0555, "l1": 12.34,
            "delta_ce": 0.4567, "delta_ce_se": 0.0289, "kl": 0.5, "kl_se": 0.03}  # fmt: skip
    design = {"contexts": 4, "pairs": 40}
    _write(tmp_path / "results/runs/a.json",
           {"mean": mean, "tokens_trained": 1000, "space": "raw", "ce_design": design})  # fmt: skip
    lens = mean | {
        "fvu_raw": 0.678,
        "fvu_raw_se": 0.004,
        "fvu_paper_raw": 0.3,
        "delta_ce_paper": 0.2,
    }
    lens_run = {"mean": lens, "tokens_trained": 1000, "space": "lens", "ce_design": design}
    _write(tmp_path / "results/runs/a-lens.json", lens_run)
    row = {"key": "table1b_belrose", "paper": "Table 1b", "claim": "c", "measured": "m | n",
           "test": "t", "power": 0.01234, "rule": "r", "verdict": "partly"}  # fmt: skip
    _write(tmp_path / "results/verdicts.json", {"rows": [row], "source": "m on c"})
    text = readme_catalogue.catalogue(_params(), tmp_path)
    assert (
        "| a | 1,000 | raw | 0.123 ± 0.001 | 0.056 | 12.3 | 0.457 ± 0.029 | 0.500 ± 0.030 |" in text
    )
    assert "| a-lens | 1,000 | raw | 0.678 ± 0.004 | 0.300 |" in text
    assert "| 0.200 | 4 (40) |" in text  # the original's lens-perturbed delta CE
    assert "| m / n | t (power 0.0123); rule: r | **partly** | partly |" in text  # pipes escaped
    assert "**m on c**" in text
    with pytest.raises(FileNotFoundError, match="verdicts"):
        readme_catalogue.catalogue(_params(), tmp_path / "elsewhere")


def test_readme_saebench_block_is_generated_from_the_committed_summary():
    """The README's SAEBench tables are `results/saebench.json` formatted, never typed."""
    summary = saebench_table.read(ROOT)
    if summary is None:
        pytest.skip("results/saebench.json not made (make saebench)")
    text = (ROOT / "README.md").read_text()
    block = saebench_table.block(summary)
    assert readme_catalogue.current(text, saebench_table.MARKERS) == block, "python -m mlsae readme"


def _bench_row(sae: str, layer: int, fvu: float) -> dict:
    return {
        "sae": sae,
        "layer": layer,
        "core": {
            "fvu": fvu,
            "delta_ce": 0.51234,
            "dead_fraction": 0.0,
            "model_behavior_preservation": {"kl_div_with_sae": 0.6},
            "fvu_check": {
                "ours": 0.3,
                "saebench_formula": fvu,
                "uncentred": 0.11,
                "sq_norm_of_mean": 1.0,
                "mean_sq_norm": 4.0,
            },
        },
        "sparse_probing": {
            "sae": {"sae_top_1_test_accuracy": 0.71, "sae_top_5_test_accuracy": 0.8},
            "llm": {"llm_test_accuracy": 0.9},
        },
    }


def test_saebench_tables_from_a_hand_built_summary():
    row = _bench_row("r", 10, 0.12345) | {"ours": {"fvu": 0.29, "delta_ce": 0.5, "kl": 0.61}}
    gate = {"letters": 26, "letters_probe_f1_above": 15, "mean_sae_k1_f1_passing": 0.4}
    row["absorption"] = {"error": "too few", **gate}
    summary = {
        "sae_bench_version": "0.6.0", "model": "m", "corpus": "c", "context_size": 256,
        "probe_datasets": ["a", "b"], "absorption_words": 2000, "run": "r", "ours_from": "o",
        "rows": [row, _bench_row("baseline", 10, 0.2)],
    }  # fmt: skip
    block = saebench_table.block(summary)
    lines = block.splitlines()
    assert "| 10 | r | 0.123 | 0.300 | 0.512 | 0.600 | 0.000 | 0.710 |  | 0.800 | 0.900 |" in block
    assert "| 0.900 | 15 / 26 | 0.400 | not scored |" in block
    assert "| 10 | baseline | 0.200 |" in block
    check = [ln for ln in lines if ln.startswith("| 10 | 0.1235")]
    assert check == [
        "| 10 | 0.1235 | 0.1235 | 0.1100 | 0.250 | 0.3000 |  | 0.2900 |  | 0.5123 | 0.5000 "
        "| 0.6000 | 0.6100 |"
    ]
    text = f"x\n{saebench_table.START}\nold\n{saebench_table.END}\ny\n"
    spliced = readme_catalogue.splice(text, block, saebench_table.MARKERS)
    assert readme_catalogue.current(spliced, saebench_table.MARKERS) == block
    assert spliced.startswith("x\n") and spliced.endswith(f"{saebench_table.END}\ny\n")
    with pytest.raises(ValueError, match="markers"):
        readme_catalogue.splice("none", block, saebench_table.MARKERS)
