"""The README's catalogue quotes only numbers that are in ``results/`` (or are the paper's).

Every decimal number in the README's results sections (Table 1 and the catalogue of paper claims,
the latent and lens paragraphs under it) must equal, at its printed precision, some number in a
committed result file (``results/**/*.json``, ``results/**/*.csv``, ``figures/table1.csv``), or
be one of the paper's own numbers listed below with where the paper gives it. A regenerated result
that moves a quoted number, or a number typed from memory, fails here.
"""

import csv
import json
import re
from pathlib import Path

from mlsae import report

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Catalogue",)
"""README sections (from the heading to the next ``## ``) whose numbers are checked."""

PAPER = {
    *(v for row in report.PAPER_TABLE1.values() for v in row),  # Table 1: FVU, L1, delta CE
    0.827, 0.414,  # Table 1, Pythia-410m delta CE with and without the lens
    0.22, 0.5,  # the FVU / delta-CE target of the project (notebook 05's fvu_target)
}  # fmt: skip
"""Numbers the README quotes from the paper (or targets), not from our results."""

NUMBER = re.compile(r"(?<![\w.^])-?\d{1,3}(?:,\d{3})*\.\d+|(?<![\w.^])-?\d+\.\d+")


def _sections(text: str) -> str:
    out = []
    for head in SECTIONS:
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        out.append(text[start : end if end > 0 else None])
    return "\n".join(out)


def _quoted(text: str) -> list[str]:
    text = re.sub(r"\([^)]*\.(?:png|md|html|pdf)\)", "", text)  # links to files
    text = re.sub(r"`[^`]*`", "", text)  # code: names, not results
    return NUMBER.findall(text)


def _values(root: Path) -> list[float]:
    values: list[float] = []

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, int | float):
            values.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted((root / "results").rglob("*.json")):
        walk(json.loads(path.read_text()))
    for path in [*sorted((root / "results").rglob("*.csv")), root / "figures" / "table1.csv"]:
        if path.exists():
            for row in csv.reader(path.open()):
                for cell in row:
                    try:
                        values.append(float(cell))
                    except ValueError:
                        pass
    return values


def unbacked(readme: str, values: list[float]) -> list[str]:
    """Numbers in the README's result sections found in no result file and not the paper's."""
    missing = []
    rounded: dict[int, set[str]] = {}
    for text in _quoted(_sections(readme)):
        plain = text.replace(",", "")
        if float(plain) in PAPER:
            continue
        decimals = len(plain.split(".")[1])
        if decimals not in rounded:
            rounded[decimals] = {f"{abs(v):.{decimals}f}" for v in values}
        if plain.lstrip("-") not in rounded[decimals]:
            missing.append(text)
    return missing


def test_every_number_in_the_readme_catalogue_is_in_the_results():
    readme = (ROOT / "README.md").read_text()
    missing = unbacked(readme, _values(ROOT))
    assert not missing, f"README numbers in no results file (regenerate or fix them): {missing}"


def test_the_check_catches_a_stale_number(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text(json.dumps({"mean": {"fvu": 0.31471}}))
    values = _values(tmp_path)
    assert unbacked("## Catalogue\nFVU 0.315 and 0.3147, paper 0.097\n## Next\n0.999", values) == []
    assert unbacked("## Catalogue\nFVU 0.322 -> 0.321\n", values) == ["0.322", "0.321"]
    assert unbacked("## Catalogue\n1,234.5 tokens in `x = 0.123`\n", values) == ["1,234.5"]
