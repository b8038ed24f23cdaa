"""dvc.yaml's mlsae/ dependencies against the imports of each stage's notebook.

`mlsae.stagedeps` derives each stage's module list from its notebook's imports (closed over the
modules' own imports); dvc.yaml must declare exactly that list, so no stage reruns for a module
it never imports and none misses one it does. `tests/test_dvc_graph.py` checks the same against
the files each stage really opens.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mlsae import stagedeps

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STAGES = (
    "build_cache",
    "train_lens",
    "train_mlsae",
    "train_mlsae_lens",
    "train_baselines",
)
EVALUATION = (
    "mlsae/report.py",
    "mlsae/bootstrap.py",
    "mlsae/plotting.py",
    "mlsae/latents.py",
    "mlsae/metrics.py",
    "mlsae/reconstruction.py",
    "mlsae/patching.py",
    "mlsae/similarity.py",
    "mlsae/drift.py",
    "mlsae/analysis.py",
    "mlsae/baselines.py",
    "mlsae/explorer_page.html",
)


def test_dvc_yaml_declares_exactly_the_modules_each_stage_imports():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expected = stagedeps.expected_deps(ROOT)
    assert set(expected) == set(stages)
    for name, files in expected.items():
        body = stages[name].get("do", stages[name])
        declared = sorted(d for d in body["deps"] if isinstance(d, str) and d.startswith("mlsae/"))
        assert declared == files, f"{name}: run `python -m mlsae deps --write`"


def test_cache_and_training_stages_import_only_the_training_path():
    expected = stagedeps.expected_deps(ROOT)
    for name in TRAINING_STAGES:
        wide = [f for f in expected[name] if f in EVALUATION or f.startswith("mlsae/explorer")]
        assert not wide, f"{name} imports {wide}: an evaluation or figure edit would retrain"
    # and the evaluation stages do see those modules (a list that is always empty would pass)
    assert "mlsae/metrics.py" in expected["evaluate_run"]
    assert "mlsae/plotting.py" in expected["table1"] and "mlsae/report.py" in expected["table1"]


def test_the_package_import_graph_has_no_cycle():
    graph = stagedeps.import_graph(ROOT)
    assert "mlsae.train" in graph and graph["mlsae.train"]  # the graph was read
    assert stagedeps.find_cycle(graph) is None, stagedeps.find_cycle(graph)


def test_cycle_finder_and_deps_on_a_made_up_package(tmp_path):
    pkg = tmp_path / "mlsae"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from mlsae import b\n")
    (pkg / "b.py").write_text("def f():\n    from mlsae.c import g\n")
    (pkg / "c.py").write_text("import json\nPAGE = 'page.html'\n")
    (pkg / "page.html").write_text("<p>")
    (pkg / "stages" / "s.py").write_text("from mlsae.a import x\n")
    nb = {"cells": [{"cell_type": "code", "source": ["from mlsae.stages.s import x\n"]}]}
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    assert stagedeps.notebook_deps("nb.ipynb", tmp_path) == [
        "mlsae/__init__.py",
        "mlsae/a.py",
        "mlsae/b.py",  # its function-local import counts
        "mlsae/c.py",
        "mlsae/page.html",  # a file the module names
        "mlsae/stages/__init__.py",
        "mlsae/stages/s.py",
    ]
    assert stagedeps.find_cycle(stagedeps.import_graph(tmp_path)) is None
    (pkg / "c.py").write_text("from mlsae.a import x\n")  # a -> b -> c -> a
    cycle = stagedeps.find_cycle(stagedeps.import_graph(tmp_path))
    assert cycle is not None and cycle[0] == cycle[-1] and {"mlsae.a", "mlsae.c"} <= set(cycle)


@pytest.mark.parametrize("path", sorted((ROOT / "mlsae").rglob("*.py")), ids=lambda p: p.name)
def test_no_function_local_import_of_the_package(path):
    """Imports of mlsae modules sit at the top of each module: a function-local one hides a
    dependency from a reader (and usually dodged an import cycle)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("mlsae"):
                    pytest.fail(f"{path.name}:{inner.lineno} imports {inner.module} in a function")


LONGER = {  # modules allowed past 300 lines, and why
    "config.py": "one dataclass per params.yaml section, a docstring under every field, validators",
    "train.py": "the training loop, kept whole to read top to bottom (DDP, resume, checkpoints)",
    "report.py": "one paragraph builder per stage; prose, no logic to split",
    "sae.py": "the TopK SAE written as its equations, with AuxK and dead-latent bookkeeping",
}


@pytest.mark.parametrize("path", sorted((ROOT / "mlsae").rglob("*.py")), ids=lambda p: p.name)
def test_modules_stay_readable_in_one_sitting(path):
    lines = len(path.read_text().splitlines())
    limit = 430 if path.name in LONGER and path.parent.name == "mlsae" else 300
    assert lines <= limit, f"{path.name}: {lines} lines; split it by concept"
