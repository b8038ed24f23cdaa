from pathlib import Path

import pytest
import yaml

from mlsae import config
from mlsae.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def base():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_valid():
    p = config.load(ROOT / "params.yaml")
    assert p.base.model == "smollm2-135m" and "r8-k32" in p.sweep
    config.validate(p, d_model=576, n_ctx=8192)


def test_unknown_key_with_did_you_mean():
    raw = base()
    raw["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match=r"Unknown key 'train.learning_rate'"):
        config.from_dict(raw)
    raw = base()
    raw["train"]["dead_token"] = 5
    with pytest.raises(ConfigError, match=r"Did you mean 'train.dead_tokens'\?"):
        config.from_dict(raw)
    raw = base()
    raw["sweeps"] = {}
    with pytest.raises(ConfigError, match=r"Unknown key 'sweeps'. Did you mean 'sweep'\?"):
        config.from_dict(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("data", "context_length", "256", "data.context_length: expected an integer"),
        ("train", "lr", "fast", "train.lr: expected float"),
        ("lens", "train", "yes", "lens.train: expected true/false"),
        ("data", "train_tokens", 0, "data.train_tokens must be positive"),
        ("data", "test_fraction", 1.5, r"data.test_fraction must be in \(0, 1\)"),
    ],
)
def test_wrong_types_and_values(section, key, value, message):
    raw = base()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        config.from_dict(raw)


def test_sweep_entry_checks():
    raw = base()
    raw["sweep"]["bad"] = {"expansion_factor": -1, "k": 32}
    with pytest.raises(ConfigError, match="sweep.bad.expansion_factor must be positive"):
        config.from_dict(raw)
    raw = base()
    raw["sweep"]["big-k"] = {"expansion_factor": 1, "k": 1024}
    p = config.from_dict(raw)  # k vs n_latents needs d_model
    with pytest.raises(ConfigError, match="sweep.big-k.k = 1024 exceeds n_latents = 576"):
        config.validate(p, d_model=576)
    raw = base()
    raw["train"]["k_aux"] = 100_000
    with pytest.raises(ConfigError, match="train.k_aux = 100000 exceeds n_latents"):
        config.validate(config.from_dict(raw), d_model=576)


def test_context_longer_than_model_allows():
    raw = base()
    raw["data"]["context_length"] = 100_000
    with pytest.raises(ConfigError, match="exceeds the model's n_ctx 8192"):
        config.validate(config.from_dict(raw), n_ctx=8192)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="No params file"):
        config.load(tmp_path / "nope.yaml")


def test_baseline_settings_checked():
    raw = base()
    raw["analysis"]["baseline_layers"] = [0, "x"]
    with pytest.raises(ConfigError, match=r"analysis.baseline_layers\[1\]: expected an integer"):
        config.from_dict(raw)
    raw = base()
    raw["analysis"]["baseline_layers"] = [0, 30]
    with pytest.raises(ConfigError, match=r"baseline_layers \[30\] out of range for a 30-layer"):
        config.validate(config.from_dict(raw), n_layers=30)
    raw = base()
    raw["analysis"]["baseline_run"] = "nope"
    with pytest.raises(ConfigError, match="analysis.baseline_run 'nope' is not a sweep entry"):
        config.from_dict(raw)


def test_paper_preset_is_valid_for_pythia_70m():
    p = config.load(ROOT / "params-paper.yaml")
    config.validate(p, d_model=512, n_ctx=2048, n_layers=6)
    assert p.sweep["r64-k32"].expansion_factor == 64 and p.data.train_tokens == 10**9
    rs = sorted({r.expansion_factor for r in p.sweep.values() if r.k == 32})
    ks = sorted({r.k for r in p.sweep.values() if r.expansion_factor == 64})
    assert rs == [2.0**i for i in range(9)] and ks == [16, 32, 64, 128, 256, 512]


def test_lens_requested_with_none_available_and_no_training(tmp_path):
    raw = base()  # smollm2-135m has no published lens; the sweep has a lens run
    raw["lens"] |= {"train": False, "lens_dir": str(tmp_path / "lenses")}
    lens_runs = raw["lens_sweep"]
    with pytest.raises(ConfigError, match="lens_method"):  # a method that is not made
        config.from_dict(raw | {"lens_sweep": {"x": {"lens_method": "ridge"}}})
    raw["lens_sweep"] = {n: r for n, r in lens_runs.items() if "lens_method" not in r}
    with pytest.raises(ConfigError, match=r"sweep.r8-k32-lens asks for a tuned lens.*smollm2-135m"):
        config.from_dict(raw)
    # a lens put in the folder, a model with a published lens, or training: all accepted
    folder = tmp_path / "lenses" / "lens" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "params.pt").write_bytes(b"")
    config.from_dict(raw)
    raw["lens"]["lens_dir"] = str(tmp_path / "elsewhere")
    raw["base"]["model"] = "EleutherAI/pythia-70m-deduped"
    config.from_dict(raw)
    raw["base"]["model"] = "EleutherAI/pythia-1b-deduped"  # no published lens for 1b
    with pytest.raises(ConfigError, match="pythia-1b-deduped"):
        config.from_dict(raw)
    raw["lens"]["train"] = True
    config.from_dict(raw)


def test_dataclass_defaults_are_the_values_of_params_yaml():
    """A params.yaml without a key behaves like the shipped one (no second set of defaults)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = config.Params()
    differ = [
        f"{section}.{key}: params.yaml {value!r}, "
        f"default {getattr(getattr(defaults, section), key)!r}"
        for section, values in raw.items()
        if section not in ("sweep", "lens_sweep")
        for key, value in values.items()
        if (section, key) != ("analysis", "lens_run")  # names a run of the shipped lens_sweep
        if getattr(getattr(defaults, section), key) != value
    ]
    assert not differ, differ


def test_lens_runs_live_under_lens_sweep():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = config.from_dict(raw)
    assert p.sweep["r8-k32-lens"].lens and not p.sweep["r8-k32"].lens
    raw["sweep"]["x"] = {"expansion_factor": 2, "k": 4, "lens": True}
    with pytest.raises(
        config.ConfigError, match="sweep.x.lens: runs through the tuned lens go under lens_sweep"
    ):
        config.from_dict(raw)
    raw["sweep"].pop("x")
    raw["lens_sweep"]["r8-k32"] = {"expansion_factor": 2, "k": 4}
    with pytest.raises(
        config.ConfigError, match="lens_sweep.r8-k32: the name is also a sweep entry"
    ):
        config.from_dict(raw)
    raw["lens_sweep"].pop("r8-k32")
    raw["analysis"]["lens_run"] = "r8-k32"
    with pytest.raises(
        config.ConfigError, match="analysis.lens_run 'r8-k32' is not a lens_sweep entry"
    ):
        config.from_dict(raw)


def test_paper_preset_as_dvc_overrides_turns_params_yaml_into_params_paper_yaml(tmp_path):
    """The -S arguments of `python -m mlsae preset`, applied by DVC's own override code."""
    import shlex

    from dvc.utils.hydra import apply_overrides

    from mlsae.presets import preset_arguments

    args = shlex.split(preset_arguments(ROOT / "params.yaml", ROOT / "params-paper.yaml"))
    assert args[0] == "-S" and len(args) % 2 == 0
    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(target, args[1::2])
    applied = config.load(target)
    assert applied == config.load(ROOT / "params-paper.yaml")
    assert applied.base.model == "EleutherAI/pythia-70m-deduped"
    assert applied.sweep["r64-k32-lens"].lens and applied != config.load(ROOT / "params.yaml")


def test_compare_tokens_below_the_budget_must_be_a_snapshot():
    raw = base()
    raw["train"]["snapshot_tokens"] = [16000, 32000]  # r8-k32 trains to 256k, compares at 64k
    with pytest.raises(ConfigError, match=r"analysis.compare_tokens 64000 is below r8-k32's"):
        config.from_dict(raw)
    raw["analysis"]["compare_tokens"] = 512000  # past the budget: the final SAE compares
    assert config.compare_tokens(config.from_dict(raw)) == 256000


def test_paper_preset_compares_final_saes():
    from mlsae.stages.sweeps import compare_point

    p = config.load(ROOT / "params-paper.yaml")  # 1B tokens per run, no longer baseline run
    assert config.compare_tokens(p) == p.data.train_tokens
    assert compare_point(p, p.analysis.baseline_run) == p.analysis.baseline_run
    assert compare_point(config.load(ROOT / "params.yaml"), "r8-k32") == "r8-k32@64000"
