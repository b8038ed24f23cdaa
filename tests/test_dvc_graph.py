"""dvc.yaml against what its stages really do: `dvc repro` of the whole graph on a tiny model.

A copy of the repository gets a tiny params.yaml (random 2-layer Llama, a 20-document text corpus)
and runs `dvc repro` with every Python process traced (`tests/trace/sitecustomize.py` logs each
file it opens). Then:

* every file a stage reads is a declared dependency (or params.yaml), every file it writes is a
  declared output, and every ``mlsae/`` file it declares is one it opens; the check is shown to
  fail when a declared dependency is removed or an unused module is added;
* an edit to evaluation, statistics, plotting, prose, a figure cell or the explorer page makes no
  cache or training stage stale (``dvc status``);
* the executed notebooks carry their figures inline and their explanations;
* `dvc exp run -S` re-runs only the stages that read the changed value, and `dvc exp apply`
  restores that experiment's outputs from the DVC cache without running anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CHROMIUM, chromium_dom

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRACER = ROOT / "tests" / "trace"
RUNS = {"r2-k4": (2, 4), "r1-k4": (1, 4), "r2-k8": (2, 8)}
LENS_RUNS = {"r2-k4-lens": (2, 4)}
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))


def tiny_params(corpus: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"] |= {"model": "tiny-random-llama", "corpus": f"text:{corpus}"}
    params["data"] |= {
        "context_length": 32,
        "batch_contexts": 4,
        "train_tokens": 512,
        "test_tokens": 256,
    }
    params["train"] |= {"batch_tokens": 32, "checkpoint_tokens": 256, "dead_tokens": 128}
    params["lens"] |= {
        "steps": 3,
        "batch_tokens": 64,
        "belrose_steps": 3,
        "belrose_batch_tokens": 32,
        "belrose_loss_vocab": 64,
        "belrose_tail_samples": 32,
        "heldout_tokens": 16,
        "ridge_tokens": 256,
        "eval_tokens": 64,
    }
    params["eval"] |= {"eval_tokens": 256, "ce_contexts": 8}
    params["train"] |= {"snapshot_tokens": [256, 512]}
    params["analysis"] |= {
        "drift_tokens": 128,
        "baseline_run": "r2-k4",
        "lens_run": "r2-k4-lens",
        "baseline_layers": [0, 1],
        "baseline_ce_contexts": 4,
        "compare_tokens": 512,
    }
    params["sweep"] = {n: {"expansion_factor": r, "k": k} for n, (r, k) in RUNS.items()}
    params["sweep"]["r2-k4"]["train_tokens"] = 1024  # two passes; snapshots at 256 and 512
    params["lens_sweep"] = {n: {"expansion_factor": r, "k": k} for n, (r, k) in LENS_RUNS.items()}
    return params


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    """Stage names from DVC's "Running stage 'x':" lines."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the repository, `dvc repro`-ed on tiny params with every file open traced."""
    root = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    skip = ("results/", "figures/", "notebooks/executed/", "dvc.lock")
    for name in listed:
        if name.startswith(skip) or not (ROOT / name).is_file():
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    corpus = root.parent / "corpus"
    corpus.mkdir(exist_ok=True)
    words = "the cat sat on the mat while a dog went to the store and John gave Mary a drink"
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join([words] * (3 + i % 4)))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(corpus), sort_keys=False))
    trace = root.parent / "trace"
    trace.mkdir(exist_ok=True)
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{root}{os.pathsep}{TRACER}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLSAE_TRACE_TAG", None)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "tiny"], root, env)
    output = run([str(BIN / "dvc"), "repro"], root, env | {"MLSAE_TRACE_DIR": str(trace)})
    return {"root": root, "trace": trace, "env": env, "output": output}


def stage_table(root: Path) -> dict[str, dict]:
    """``{stage: {"tag", "deps", "outs"}}`` from DVC's own reading of dvc.yaml."""
    from dvc.repo import Repo

    out = {}
    with Repo(str(root)) as dvc_repo:
        for stage in dvc_repo.index.stages:
            notebooks = [w for w in stage.cmd.split() if w.endswith(".ipynb")]
            out[stage.name] = {
                "tag": Path(notebooks[-1]).stem,
                "deps": {d.def_path for d in stage.deps},
                "outs": {o.def_path for o in stage.outs},
            }
    return out


def _within(path: str, declared: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def traced(log: Path, root: Path) -> list[tuple[str, str]]:
    """``(mode, path)`` of each repository file in the log, relative to ``root``.

    Paths outside the repository are dropped. An import reads ``mlsae/__pycache__/x.*.pyc``:
    that counts as reading ``mlsae/x.py`` (a ``.pyc`` written is Python's, not the stage's).
    """
    out = []
    for line in log.read_text().splitlines():
        mode, path = line.split(" ", 1)
        try:
            rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
        if "__pycache__/" in rel:
            if mode == "w":
                continue
            folder, name = rel.split("__pycache__/")
            rel = f"{folder}{name.split('.')[0]}.py"
        out.append((mode, rel))
    return out


def unused(log: Path, deps: set[str], root: Path) -> list[str]:
    """Declared ``mlsae/`` dependencies the stage never opened: each makes it rerun for nothing."""
    seen = {rel for _, rel in traced(log, root)}
    return sorted(
        f"declares {d} but never opens it" for d in deps if d.startswith("mlsae/") and d not in seen
    )


def undeclared(log: Path, deps: set[str], outs: set[str], root: Path) -> list[str]:
    """Files in ``log`` that the stage read but did not declare, or wrote outside its outs.

    DVC's and git's own folders and the tracer are ignored (`traced` drops the rest). A written
    file that no longer exists when the stage ends is a temporary (written, then renamed).
    """
    problems = set()
    for mode, rel in traced(log, root):
        if rel.startswith((".dvc/", ".git/", "tests/trace/")) or rel in (".", "dvc.lock"):
            continue
        if mode == "w":
            if not _within(rel, outs) and (root / rel).exists():
                problems.add(f"writes {rel}")
        elif rel != "params.yaml" and not _within(rel, deps | outs):
            problems.add(f"reads {rel}")
    return sorted(problems)


@pytest.mark.slow
def test_every_stage_reads_only_declared_deps_and_writes_only_declared_outs(repo):
    stages = stage_table(repo["root"])
    assert len(stages) == 12 + 2 * (len(RUNS) + len(LENS_RUNS))
    problems = {}
    for name, stage in stages.items():
        log = repo["trace"] / f"{stage['tag']}.log"
        assert log.exists() and log.stat().st_size > 0, f"{name}: nothing traced"
        found = undeclared(log, stage["deps"], stage["outs"], repo["root"])
        found += unused(log, stage["deps"], repo["root"])
        if found:
            problems[name] = found
    assert not problems, json.dumps(problems, indent=1)
    # the tracer sees imports and data files (a check that reads nothing would pass trivially)
    log = (repo["trace"] / "05_evaluate_run_r2-k4.log").read_text()
    assert "mlsae/__pycache__/metrics" in log or "mlsae/metrics.py" in log
    assert "cache/runs/r2-k4/checkpoint.pt" in log


@pytest.mark.slow
def test_the_check_fails_when_a_declared_dependency_is_removed(repo):
    stage = stage_table(repo["root"])["evaluate_run@r2-k4"]
    log = repo["trace"] / f"{stage['tag']}.log"
    assert undeclared(log, stage["deps"], stage["outs"], repo["root"]) == []
    for removed in ("mlsae/metrics.py", "cache/runs/r2-k4", "cache/activations/test"):
        found = undeclared(log, stage["deps"] - {removed}, stage["outs"], repo["root"])
        assert any(p.startswith(f"reads {removed}") for p in found), (removed, found)
    outs = stage["outs"] - {"results/runs/r2-k4.json"}
    assert "writes results/runs/r2-k4.json" in undeclared(log, stage["deps"], outs, repo["root"])
    assert unused(log, stage["deps"], repo["root"]) == []
    wider = stage["deps"] | {"mlsae/plotting.py", "mlsae/explorer_page.html"}
    trained = stage_table(repo["root"])["train_mlsae@r2-k4"]
    train_log = repo["trace"] / f"{trained['tag']}.log"
    assert unused(train_log, trained["deps"] | {"mlsae/metrics.py"}, repo["root"]) == [
        "declares mlsae/metrics.py but never opens it"
    ]
    assert "declares mlsae/explorer_page.html but never opens it" in unused(
        log, wider, repo["root"]
    )


@pytest.mark.slow
def test_executed_notebooks_show_figures_tables_and_explanations(repo):
    root = repo["root"]
    figures = {p.name for p in (root / "figures").iterdir()}
    for stem in [
        "residual_drift",
        "lens_kl",
        "train_fvu_r2-k4",
        "train_fvu_r2-k4-lens",
        "per_layer_metrics",
        "single_layer_matrices",
        "single_vs_mlsae",
        "sweeps",
        "latents_heatmaps",
        "latents_layer_histograms",
        "latents_thresholds",
        "latents_prompts",
        "latents_activity_sweeps",
        "latents_decoder_cosine",
        "latents_relative_thresholds",
        "latents_effective_layers",
        "latents_windows",
        "latents_sweep_layer_std",
        "latents_by_tokens",
        "snapshots_fvu",
        "verdicts_paired",
    ]:
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures, stem
    for name in ("02_residual_drift", "05_evaluate_run_r2-k4", "09_latents_over_layers"):
        nb = json.loads((root / "notebooks" / "executed" / f"{name}.ipynb").read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        texts = "".join("".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)
        assert images, f"{name}: no inline figure"
        assert "**" in texts and "tiny-random-llama" in texts, f"{name}: no explanation"
    run_result = json.loads((root / "results" / "runs" / "r2-k4-lens.json").read_text())
    assert run_result["space"] == "lens" and len(run_result["per_layer"]["fvu_raw"]) == 2
    metrics = json.loads((root / "results" / "metrics" / "runs" / "r2-k4.json").read_text())
    assert all(isinstance(v, int | float) for v in metrics.values()) and "fvu" in metrics
    sweeps = json.loads((root / "results" / "sweeps.json").read_text())
    assert [r["run"] for r in sweeps["R"]] == ["r1-k4", "r2-k4"]
    baselines = json.loads((root / "results" / "baselines.json").read_text())
    assert baselines["tokens_trained"] == 512  # the MLSAE at the single-layer SAEs' length
    verdicts = json.loads((root / "results" / "verdicts.json").read_text())["rows"]
    assert {"figure1", "table1a", "sweep_R", "single_layer", "figure2"} <= {
        r["key"] for r in verdicts
    }
    assert "| Figure 2 |" in (root / "figures" / "verdicts.md").read_text()
    assert (root / "figures" / "explorer" / "index.html").exists()
    assert (root / "figures" / "explorer" / "data" / "shard_0000.js").exists()
    table = (root / "figures" / "table1.md").read_text()
    assert "r2-k4-lens" in table and re.search(r"\|\s+2 \|", table)  # R printed as an integer
    assert not re.search(r"\|\s+2\.000 \|", table)


@pytest.mark.slow
def test_exp_run_reruns_only_what_reads_the_change_and_exp_apply_restores_it(repo):
    root, env = repo["root"], repo["env"]
    dvc = str(BIN / "dvc")
    assert "up to date" in run([dvc, "status"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "tiny results"], root, env)
    output = run([dvc, "exp", "run", "-n", "k6", "-S", "sweep.r2-k8.k=6"], root, env)
    assert ran_stages(output) == {
        "train_mlsae@r2-k8",
        "evaluate_run@r2-k8",
        "table1",
        "sweeps",
        "latents_over_layers",
        "verdicts",
    }, output
    assert "k6" in run([dvc, "exp", "show", "--no-pager", "--json"], root, env)
    # back to the committed state, then the experiment again: restored from the cache
    run(["git", "checkout", "--", "."], root, env)
    run([dvc, "checkout", "--force"], root, env)
    assert "up to date" in run([dvc, "status"], root, env)
    run([dvc, "exp", "apply", "k6"], root, env)
    assert "up to date" in run([dvc, "status"], root, env)
    assert yaml.safe_load((root / "params.yaml").read_text())["sweep"]["r2-k8"]["k"] == 6
    result = json.loads((root / "results" / "runs" / "r2-k8.json").read_text())
    assert result["config"]["k"] == 6


TRAINING = ("build_cache", "train_lens", "train_mlsae", "train_baselines")
EDITS = {  # what a researcher changes while working on the evaluation -> where
    "report": "mlsae/report.py",
    "standard errors": "mlsae/bootstrap.py",
    "plotting": "mlsae/plotting.py",
    "latent statistics": "mlsae/latents.py",
    "metrics": "mlsae/metrics.py",
    "explorer page": "mlsae/explorer_page.html",
}


def stale_after(root: Path, env: dict, path: str, edit) -> set[str]:
    """Stages ``dvc status`` calls changed after ``edit(text)`` of ``path`` (then undone)."""
    file = root / path
    old = file.read_text()
    file.write_text(edit(old))
    try:
        return set(json.loads(run([str(BIN / "dvc"), "status", "--json"], root, env) or "{}"))
    finally:
        file.write_text(old)


@pytest.mark.slow
def test_evaluation_and_figure_edits_make_no_cache_or_training_stage_stale(repo):
    root, env = repo["root"], repo["env"]
    assert "up to date" in run([str(BIN / "dvc"), "status"], root, env)
    comment = {"mlsae/explorer_page.html": lambda t: t + "\n<!-- edit -->\n"}
    found = {}
    for what, path in EDITS.items():
        found[what] = stale_after(root, env, path, comment.get(path, lambda t: t + "\n# edit\n"))

    def figure_cell(text: str) -> str:
        nb = json.loads(text)
        cell = next(
            c
            for c in nb["cells"]
            if 'save_figure(fig, "single_layer_matrices"' in "".join(c["source"])
        )
        cell["source"] = [*cell["source"], "\n# edit"]
        return json.dumps(nb)

    found["a figure cell of 07b"] = stale_after(
        root, env, "notebooks/07b_single_layer_baselines.ipynb", figure_cell
    )
    for what, stale in found.items():
        assert stale, f"{what}: nothing went stale (the edit was not seen)"
        retrained = sorted(
            s for s in stale if s.split("@")[0] in TRAINING or s.startswith("train_")
        )
        assert not retrained, f"editing {what} makes {retrained} stale"
    assert found["a figure cell of 07b"] == {"single_layer_baselines"}
    assert found["explorer page"] == {"latent_explorer"}
    # and an edit to the training path does retrain (the check can fail)
    stale = stale_after(root, env, "mlsae/sae.py", lambda t: t + "\n# edit\n")
    assert {"train_mlsae@r2-k4", "train_baselines"} <= stale and "build_cache" not in stale


def test_source_notebooks_have_no_outputs():
    assert len(NOTEBOOKS) == 14
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, name


@pytest.mark.slow
def test_dvc_plots_show_renders_offline_in_chromium(repo, tmp_path):
    """`make plots`'s route: the offline template (vega from npm, no CDN) and DVC's own page."""
    from mlsae.dvcplots import offline_template

    root, env = repo["root"], repo["env"]
    template = offline_template(tmp_path / "template.html")
    run(
        [str(BIN / "dvc"), "plots", "show", "--html-template", str(template), "-o", "plots"],
        root,
        env,
    )
    page = (root / "plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page
    assert "results/train/r2-k4.csv" in page and "figures/lens_kl.png" in page.replace("\\", "/")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is installed by `make test`")
    dom = chromium_dom(f"file://{root / 'plots' / 'index.html'}", tmp_path / "profile", 8000)
    assert dom.count('class="marks"') >= 5  # vega drew the data-series plots
