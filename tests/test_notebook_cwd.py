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
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _table1_repo(root: Path) -> Path:
    """A copy holding notebook 06, the committed run results, and params naming only those runs."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    made = {p.stem for p in (ROOT / "results" / "runs").glob("*.json")}
    for section in ("sweep", "lens_sweep"):
        params[section] = {n: r for n, r in params[section].items() if n in made}
        for r in params[section].values():
            r.pop("train_tokens", None)  # the committed runs: the data budget, no snapshots
    (root / "notebooks").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for rel in ("dvc.yaml", "notebooks/06_table1.ipynb"):
        shutil.copy(ROOT / rel, root / rel)
    shutil.copytree(ROOT / "results" / "runs", root / "results" / "runs")
    return root


def _papermill(notebook: str, out: Path, cwd: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "papermill", "--no-progress-bar", *args, notebook, str(out)]
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


@pytest.mark.slow
def test_table1_notebook_run_from_the_notebooks_folder_writes_what_its_stage_writes(tmp_path):
    stage, opened = _table1_repo(tmp_path / "stage"), _table1_repo(tmp_path / "opened")
    # as the DVC stage runs it (papermill --cwd . from the root), and as a user opens it
    _papermill("notebooks/06_table1.ipynb", tmp_path / "a.ipynb", stage, "--cwd", ".")
    _papermill("06_table1.ipynb", tmp_path / "b.ipynb", opened / "notebooks")
    for name in ("table1.csv", "table1.md"):
        written = (opened / "figures" / name).read_text()
        assert written == (stage / "figures" / name).read_text() and "r8-k32" in written
    assert {"per_layer_metrics.png", "per_layer_metrics.pdf"} <= {
        p.name for p in (opened / "figures").iterdir()
    }
    assert sorted(p.name for p in (opened / "notebooks").iterdir()) == ["06_table1.ipynb"]


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
