"""The README's catalogue is what `mlsae.readme_catalogue` makes of the committed results."""

import json
from pathlib import Path

import pytest

from mlsae import config, readme_catalogue

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
