"""The notebook sentences (`mlsae.report`) state the facts of the setup they are rendered for.

Every report function is rendered for the default params (SmolLM2 on Brown, from the committed
results) and for the paper preset (Pythia-70m on the Pile, with synthetic results of its 6 layers
and of the tiny random Pythia of `conftest`); nothing of the default may leak into the second.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlsae import config, report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DEFAULT = config.load(ROOT / "params.yaml")
PAPER = config.load(ROOT / "params-paper.yaml")
PAPER_LAYERS = 6  # Pythia-70m
LEAKS = ("brown", "smollm2", "30 layers", "genre")  # facts of the default setup


def _read(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _layered(n_layers: int, first: float, step: float) -> list[float]:
    return [first + step * i for i in range(n_layers)]


def _run_result(n_layers: int, space: str = "raw", tokens: int | None = None) -> dict:
    """Shaped like `mlsae.stages.evaluate.evaluate_run`'s result (results/runs/<run>.json)."""
    mean = {
        "fvu": 0.12,
        "fvu_se": 0.004,
        "fvu_paper": 0.09,
        "l0": 32.0,
        "l1": 60.0,
        "delta_ce": 0.5,
        "delta_ce_se": 0.05,
        "kl": 0.55,
        "kl_se": 0.06,
    }
    if space == "lens":
        mean |= {"fvu_raw": 0.2, "fvu_paper_raw": 0.1}
    result = {
        "layers": list(range(n_layers)),
        "per_layer": {"fvu": _layered(n_layers, 0.1, 0.01), "l1": _layered(n_layers, 60, 1)},
        "mean": mean,
        "n_tokens": 4096,
        "n_ce_tokens": 4088,
        "n_ce_contexts": 2,
        "n_fvu_contexts": 2,
        "space": space,
    }
    if tokens is not None:
        result["tokens_trained"] = tokens
    return result


def synthetic(params, n_layers: int) -> dict:
    """Inputs of every report function for ``params`` on an ``n_layers``-layer model."""
    from mlsae.stages.sweeps import sweep_differences, sweep_groups
    from mlsae.stages.table1 import table1

    stream = params.train.source == "stream"
    summary = {
        "test": {"tokens": 4096, "contexts": 2, "documents": 3, "labels": 0, "source": "cache"},
        "train": {"source": "stream"}
        if stream
        else {"tokens": 8192, "contexts": 4, "documents": 7, "labels": 0, "source": "cache"},
    }
    drift = {
        "cosine": _layered(n_layers - 1, 0.8, 0.01),
        "cosine_centred": _layered(n_layers - 1, 0.7, 0.01),
        "norm": _layered(n_layers, 5.0, 2.0),
        "n_tokens": [4096.0],
    }
    logit = _layered(n_layers - 1, 6.0, -0.5) + [0.0]
    tuned = _layered(n_layers - 1, 2.0, -0.2) + [0.0]
    history = [] if not params.lens.train else [3.0 - 0.01 * i for i in range(params.lens.steps)]
    runs = {
        name: _run_result(n_layers, "lens" if entry.lens else "raw", params.data.train_tokens)
        for name, entry in params.sweep.items()
    }
    for i, res in enumerate(runs.values()):  # distinct means, so the sweep steps differ
        res["mean"] = res["mean"] | {"fvu": 0.3 - 0.01 * i, "delta_ce": 0.9 - 0.02 * i}
    layers = [ly for ly in params.analysis.baseline_layers if ly < n_layers] or [0]
    square = [[0.1 + 0.5 * (i != j) for j in range(len(layers))] for i in range(len(layers))]
    base = params.analysis.baseline_run
    baselines = {
        "layers": layers,
        "rows": [f"single layer {ly}" for ly in layers] + [f"MLSAE {base}"],
        "run": base,
        "fvu": square + [[0.15] * len(layers)],
        "delta_ce": square + [[0.2] * len(layers)],
        "kl": square + [[0.25] * len(layers)],
        "n_fvu_tokens": 4096,
        "n_ce_tokens": 4088,
        "n_layers": n_layers,
    }
    stats = {
        "n_latents_active": 1000,
        "mean_layers_active_ge1": n_layers / 2,
        "variance_ratio": 5.0,
        "variance_ratio_paper": 40.0,
    }
    return {
        "summary": summary,
        "drift": drift,
        "lens": (logit, tuned, history),
        "run": (runs[base], {"a": 3.0, "b": -0.2, "target": 0.2, "tokens_to_target": 1e9}, base),
        "table": table1(runs, params),
        "baselines": baselines,
        "differences": sweep_differences(runs, sweep_groups(params)),
        "latents": {"no lens": stats, "with tuned lens": stats},
    }


def committed() -> dict:
    """The committed results of the default params (SmolLM2-135M on Brown, 30 layers)."""
    from mlsae.stages.sweeps import sweep_differences, sweep_groups
    from mlsae.stages.table1 import table1

    lens = _read("lens_kl.json")
    base = DEFAULT.analysis.baseline_run
    # runs of the params that have committed results (a run added to params.yaml has none
    # until the pipeline has run it)
    made = [n for n in DEFAULT.sweep if (ROOT / "results" / "runs" / f"{n}.json").exists()]
    runs = {name: _read(f"runs/{name}.json") for name in made}
    groups = {g: [n for n in names if n in runs] for g, names in sweep_groups(DEFAULT).items()}
    latents = _read("latents.json")["runs"]
    return {
        "summary": _read("data_mix.json")["summary"],
        "drift": _read("drift.json"),
        "lens": (lens["logit_lens"], lens["tuned_lens"], lens["train_history"]),
        "run": (runs[base], runs[base].get("fvu_fit"), base),
        "table": table1(runs, DEFAULT),
        "baselines": _read("baselines.json") | {"n_layers": len(runs[base]["layers"])},
        "differences": sweep_differences(runs, groups),
        "latents": {name: r["summary"] for name, r in latents.items()},
    }


def render(inputs: dict, params) -> dict[str, str]:
    """Every report function's markdown, by name (the notebooks' calls)."""
    return {
        "data_mix": report.data_mix(inputs["summary"], params),
        "drift": report.drift(inputs["drift"], params),
        "lens": report.lens(*inputs["lens"], params),
        "run": report.run(inputs["run"][0], inputs["run"][1], params, inputs["run"][2]),
        "table1": report.table1(inputs["table"], params),
        "baselines": report.baselines(inputs["baselines"], params),
        "sweeps": report.sweeps(inputs["differences"], params),
        "latents": report.latents(inputs["latents"], params),
    }


def rendered_layers(text: str) -> int:
    (match,) = re.findall(r"shares its budget with (\d+) layers?\b", text)
    return int(match)


@pytest.fixture
def tiny_pythia_layers(tiny_pythia) -> int:
    """The layer count of the tiny random Pythia, as `mlsae.models.load_model` sees it."""
    from mlsae.models import load_model

    model = load_model(PAPER.base.model)  # conftest saved it under the paper's model id
    assert model.cfg.n_layers == tiny_pythia[0].config.num_hidden_layers
    return model.cfg.n_layers


def test_the_paper_preset_is_pythia_on_the_pile():
    """The premises of the paper-preset tests below."""
    assert PAPER.base.model == "EleutherAI/pythia-70m-deduped"
    assert PAPER.base.corpus.startswith("hf:") and "pile" in PAPER.base.corpus
    assert not PAPER.lens.train and PAPER.lens.lens_dir is None
    assert DEFAULT.base.corpus == "brown" and DEFAULT.lens.train


@pytest.mark.parametrize("n_layers", [PAPER_LAYERS, "tiny"])
def test_paper_preset_names_its_own_setup(n_layers, request):
    if n_layers == "tiny":
        n_layers = request.getfixturevalue("tiny_pythia_layers")
    texts = render(synthetic(PAPER, n_layers), PAPER)
    for name, text in texts.items():
        for leak in LEAKS:
            assert leak not in text.lower(), (name, leak, text)
        assert PAPER.base.model in text, (name, text)
        assert PAPER.base.corpus in text, (name, text)
    assert rendered_layers(texts["baselines"]) == n_layers
    assert "no document labels" in texts["data_mix"]
    assert "none cached" in texts["data_mix"]
    assert f"{PAPER.data.train_tokens:,} tokens" in texts["data_mix"]
    assert "loaded, not trained" in texts["lens"] and config.HUB_REPO in texts["lens"]
    assert "trained here" not in texts["lens"]
    assert "no training curve" in texts["lens"]
    # Pythia-70m, the Pile, R = 64, k = 32 and 1B tokens: the paper's Table 1 setup
    assert "size and budget are the paper's" in texts["table1"] and "differ" not in texts["table1"]
    assert "R = 64, k = 32" in texts["table1"]


def test_default_names_brown_and_the_trained_lens():
    texts = render(committed(), DEFAULT)
    for name, text in texts.items():
        assert "smollm2-135m on brown" in text, (name, text)
    assert "Brown genres" in texts["data_mix"]
    assert "15 Brown genres" in texts["data_mix"]  # results/data_mix.json: train covers 15
    assert "this lens was trained here on the training cache" in texts["lens"]
    assert f"none is published for {DEFAULT.base.model}" in texts["lens"]
    assert "loaded" not in texts["lens"]
    assert rendered_layers(texts["baselines"]) == 30
    assert "Model, corpus, size and budget all differ" in texts["table1"]
    assert "budget of 64,000 tokens" in texts["data_mix"]
    # the committed lens history: its verdict follows the sign of the change it prints
    (change,) = re.findall(r"moved ([+-][0-9.]+)% against", texts["lens"])
    expected = "rising" if float(change) > 5 else "still falling" if float(change) < -5 else None
    assert f"({expected or 'settled'}:" in texts["lens"]


def test_table1_names_what_differs_from_the_paper():
    table = synthetic(PAPER, PAPER_LAYERS)["table"]
    table["train tokens"] = 1e6
    text = report.table1(table, PAPER)
    assert (
        "Budget differs from the paper's" in text and "size and budget are the paper's" not in text
    )
    bigger = dataclasses.replace(
        PAPER, base=dataclasses.replace(PAPER.base, model="EleutherAI/pythia-160m-deduped")
    )
    table = synthetic(bigger, PAPER_LAYERS)["table"]
    text = report.table1(table, bigger)
    assert "The paper's Pythia-160m" in text and "size and budget are the paper's" in text
    assert f"delta CE {report.PAPER_TABLE1['Pythia-160m'][2]}." in text


def test_baselines_without_a_layer_count_say_every_layer():
    res = synthetic(PAPER, PAPER_LAYERS)["baselines"]
    del res["n_layers"]
    text = report.baselines(res, PAPER)
    assert "shares its budget with every layer" in text
    assert not re.search(r"with \d+ layers", text)
    res["n_layers"] = 1
    assert rendered_layers(report.baselines(res, PAPER)) == 1
    assert "with 1 layer " in report.baselines(res, PAPER)


def test_text_corpus_labels_are_not_genres():
    params = dataclasses.replace(
        DEFAULT, base=dataclasses.replace(DEFAULT.base, corpus="text:docs")
    )
    summary = {"test": {"tokens": 10, "contexts": 1, "documents": 2, "labels": 2}}
    text = report.data_mix(summary, params)
    assert "2 document labels (file names)" in text and "genre" not in text.lower()
    summary["test"]["labels"] = 0
    assert "no document labels (text:docs has none)" in report.data_mix(summary, params)


def _with_lens(params, **lens):
    return dataclasses.replace(params, lens=dataclasses.replace(params.lens, **lens))


def test_lens_origin_follows_the_params():
    logit, tuned = [3.0, 2.0, 0.0], [1.0, 0.5, 0.0]
    local = report.lens(logit, tuned, [], _with_lens(PAPER, lens_dir="/data/lenses"))
    assert "loaded, not trained, from `/data/lenses/lens/EleutherAI/pythia-70m-deduped`" in local
    hub = report.lens(logit, tuned, [], PAPER)
    assert "as the paper did" in hub and "/data/lenses" not in hub
    trained = report.lens(logit, tuned, [1.0] * 8, _with_lens(PAPER, train=True))
    assert "trained here on the training cache" in trained
    assert f"a published lens exists for {PAPER.base.model}" in trained
    assert "loaded" not in trained


def verdict(history: list[float]) -> str | None:
    text = report.lens([3.0, 2.0, 0.0], [1.0, 0.5, 0.0], history, DEFAULT)
    found = re.findall(r"\(([a-z ]+): we call a change under 5% settled\)", text)
    return found[0] if found else None


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ([1.0, 1.0, 1.2, 1.2], "rising"),  # +20%
        ([1.0, 1.0, 0.8, 0.8], "still falling"),  # -20%
        ([1.0, 1.0, 1.04, 1.04], "settled"),  # +4%
        ([1.0, 1.0, 0.96, 0.96], "settled"),  # -4%
        ([1.0, 1.0, 1.06, 1.06], "rising"),  # +6%
        ([1.0, 1.0, 0.94, 0.94], "still falling"),  # -6%
    ],
)
def test_lens_training_verdict(tail, expected):
    history = [5.0, 4.0, 3.0, 2.0] + tail  # 8 steps: quarters of 2, the last two compared
    assert verdict(history) == expected
    assert report.lens_verdict(history)[1] == expected


def test_short_lens_history_has_no_verdict():
    assert verdict([1.0, 2.0, 3.0]) is None


def test_report_imports_nothing_heavy():
    code = (
        "import sys, mlsae.report; "
        "bad = [m for m in ('torch', 'matplotlib', 'numpy', 'pandas', 'transformer_lens') "
        "if m in sys.modules]; "
        "bad += [m for m in sys.modules if m.startswith('mlsae.') "
        "and m not in ('mlsae.report', 'mlsae.config', 'mlsae.lens_settings')]; "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
