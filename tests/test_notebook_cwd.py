"""A source notebook run where Jupyter opens it: the kernel starts in ``notebooks/``.

Its parameter defaults (None) make `mlsae.notebook.setup` find the repository from there, so it
reads params.yaml and results/ at the root and writes where its DVC stage does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_table1_notebook_run_from_the_notebooks_folder_writes_what_its_stage_writes(tmp_path):
    repo = tmp_path / "repo"
    for rel in ("params.yaml", "dvc.yaml", "notebooks/06_table1.ipynb"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    shutil.copytree(ROOT / "results" / "runs", repo / "results" / "runs")
    out = tmp_path / "executed.ipynb"
    subprocess.run(
        [sys.executable, "-m", "papermill", "--no-progress-bar", "06_table1.ipynb", str(out)],
        cwd=repo / "notebooks",
        check=True,
        capture_output=True,
        text=True,
    )
    # the committed table was written by the DVC stage (papermill --cwd . from the root)
    assert (repo / "figures" / "table1.csv").read_text() == (
        ROOT / "figures" / "table1.csv"
    ).read_text()
    assert (repo / "figures" / "table1.md").read_text() == (
        ROOT / "figures" / "table1.md"
    ).read_text()
    assert {"per_layer_metrics.png", "per_layer_metrics.pdf"} <= {
        p.name for p in (repo / "figures").iterdir()
    }
    assert sorted(p.name for p in (repo / "notebooks").iterdir()) == ["06_table1.ipynb"]


def test_setup_finds_the_repository_from_a_subfolder(tmp_path, monkeypatch):
    from mlsae.notebook import setup
    from mlsae.paths import repo_root

    (tmp_path / "notebooks").mkdir()
    for rel in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / rel, tmp_path / rel)
    monkeypatch.chdir(tmp_path / "notebooks")
    params, out_dir = setup()
    assert out_dir == tmp_path.resolve() and params.base.model == "smollm2-135m"
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(FileNotFoundError, match="params.yaml"):
        repo_root()
