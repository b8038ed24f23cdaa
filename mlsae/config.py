"""params.yaml -> validated dataclasses, before any compute.

Every section is a dataclass mirroring the YAML 1:1; unknown keys get a did-you-mean, wrong types
and impossible values (k > n_latents, non-positive sizes) a clear `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlsae.lens_settings import LENS_METHODS as LENS_METHODS
from mlsae.lens_settings import Lens, lens_problem


class ConfigError(ValueError):
    """A problem in params.yaml, named by its dotted key."""


SOURCES = ("cache", "stream")
AUTOCAST = ("bfloat16", "float16", "none")
LR_DECAYS = ("none", "linear", "cosine")

HUB_REPO = "AlignmentResearch/tuned-lens"
_PYTHIA_WITH_LENS = ("70m", "160m", "410m", "1.4b", "2.8b", "6.9b", "12b")
PUBLISHED_LENSES = frozenset(
    [f"EleutherAI/pythia-{size}-deduped" for size in _PYTHIA_WITH_LENS]
    + ["gpt2", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-neox-20b"]
)
"""Model ids with a lens under ``lens/<model id>/`` in the `HUB_REPO` space (not Pythia-1b)."""


def local_lens_folder(model: str, lens_dir: str | Path) -> Path | None:
    """``lens_dir/lens/<model>`` when it holds a lens (config.json and params.pt), else None."""
    folder = Path(lens_dir) / "lens" / model
    return folder if (folder / "config.json").exists() and (folder / "params.pt").exists() else None


@dataclass
class Base:
    """Shared settings."""

    seed: int = 0
    model: str = "smollm2-135m"
    corpus: str = "brown"
    cache_dir: str = "cache"
    device: str = "cpu"


@dataclass
class Data:
    """Corpus split and tokenization."""

    test_fraction: float = 0.1
    context_length: int = 256
    batch_contexts: int = 8
    train_tokens: int = 64_000
    """Training budget in tokens (cached for ``train.source: cache``)."""
    test_tokens: int = 12_288
    """Held-out tokens in the test cache, sampled across every test document."""
    shuffle_documents: int = 1000
    """Document shuffle buffer for streamed (``hf:``) corpora; in-memory ones are permuted."""


@dataclass
class Train:
    """SAE training (shared by every sweep run)."""

    lr: float = 1e-3
    adam_eps: float = 6.25e-10
    batch_tokens: int = 64
    aux_coef: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int = 5000
    checkpoint_tokens: int = 20_000
    select_bf16: bool | str = "auto"
    """Top-k chosen with a bf16 encoder matmul in training: true, false, or ``auto`` (bf16 where
    the device has native bf16 units, `mlsae.precision`)."""
    grad_accum: int = 1
    lr_warmup_tokens: int = 0
    """Linear learning-rate warm-up (tokens; 0: none)."""
    lr_decay: str = "none"
    """``none`` (the paper), ``linear`` or ``cosine`` decay to 0 at the run's token budget."""
    epochs: int = 1
    """Passes over the training data (the cache, or the stream's corpus), each reshuffled."""
    source: str = "cache"
    """``cache``: read the training cache (stage 01); ``stream``: run the model while training."""
    shuffle_tokens: int = 16384
    """Token shuffle block (tokens; 0: off). Memory: tokens x layers x d_model x 2 bytes."""
    stream_autocast: str = "bfloat16"
    """Autocast dtype of the stream's forward on a GPU (bfloat16, float16 or none)."""
    snapshot_tokens: list[int] = field(default_factory=lambda: [16_000, 32_000, 64_000, 128_000])
    """Training lengths (tokens) at which a run's SAE is kept for analysis
    (`mlsae.paths.snapshot_path`); only those below the run's budget are written."""


@dataclass
class Eval:
    """Evaluation on the held-out split."""

    eval_tokens: int = 8192
    """Held-out tokens (from the test cache) for FVU, L0, L1 and the latent statistics."""
    ce_contexts: int = 48
    """Held-out contexts (of ``data.context_length`` tokens) run through the model for delta CE
    and KL (Table 1's delta-CE standard error was 0.034 nats from 32; 48 bring it under 0.03)."""
    ce_stride: int = 3
    """Layer design of delta CE for the Table 1 SAEs (the baseline run's final SAE, the lens runs):
    context c is patched at the layers l with l = c (mod ce_stride), so every context and every
    layer is measured and a run costs 1/ce_stride of the full contexts x layers grid (1: all)."""
    sweep_ce_stride: int = 12
    """The same design for the other sweep runs and for checkpoints (a multiple of ``ce_stride``,
    so its (context, layer) pairs are a subset of Table 1's and paired comparisons share them)."""
    ce_bf16: bool | str = "auto"
    """Run the delta-CE forwards under bfloat16 autocast (`mlsae.patching.delta_ce_kl`): true,
    false, or ``auto`` (where the device has native bf16 units, `mlsae.precision`)."""


@dataclass
class Analysis:
    """Residual-stream drift and latent analyses."""

    drift_tokens: int = 4096
    baseline_run: str = "r8-k32"
    """Sweep entry whose size and budget the single-layer baselines copy."""
    baseline_layers: list[int] = field(default_factory=lambda: [0, 10, 20, 29])
    """Layers with a single-layer SAE (train layer x eval layer matrices over these)."""
    baseline_ce_contexts: int = 32
    """Contexts of held-out text for the delta-CE matrix (every SAE at every baseline layer)."""
    compare_tokens: int | None = 64_000
    """Training length at which sweep runs, lens runs and the baseline run are compared: the
    baseline run's snapshot at this many tokens stands for it (None: its final SAE)."""
    lens_run: str | None = None
    """The ``lens_sweep`` entry analysed beside ``baseline_run`` through the lens (null: none)."""


@dataclass
class Run:
    """One sweep entry (``sweep.<name>`` or ``lens_sweep.<name>``)."""

    expansion_factor: float = 8
    k: int = 32
    train_tokens: int | None = None
    """Training budget of this run (None: data.train_tokens)."""
    lens: bool = False
    """Set by the loader: True for ``lens_sweep`` entries (not a key of params.yaml)."""
    lens_method: str | None = None
    """``lens_sweep`` entries only: the lens method (`Lens.methods`) of this run; None: the
    default ``lens.method``."""


@dataclass
class Params:
    """All of params.yaml."""

    base: Base = field(default_factory=Base)
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)
    lens: Lens = field(default_factory=Lens)
    eval: Eval = field(default_factory=Eval)
    analysis: Analysis = field(default_factory=Analysis)
    sweep: dict[str, Run] = field(default_factory=lambda: {"r8-k32": Run()})
    """Every run: params.yaml's ``sweep`` (raw residuals) and ``lens_sweep`` (through the tuned
    lens) together; the two are separate in the file so that only the lens runs' DVC stages
    depend on the lens."""


def _check_type(value, annotation, key: str):
    hint = typing.get_type_hints(annotation) if dataclasses.is_dataclass(annotation) else None
    if hint is not None:
        return _build(annotation, value, key)
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if bool in options and isinstance(value, bool):
            return value  # e.g. ``bool | str``: true/false, or a word such as "auto"
        annotation = next((a for a in options if a is not bool), options[0])
    if typing.get_origin(annotation) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}.")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}.")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}.")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}.")
    return value


def _build(cls, raw, key: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    prefix = f"{key}." if key else ""
    for name, value in raw.items():
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            known = ", ".join(names)
            raise ConfigError(f"Unknown key '{prefix}{name}'.{hint} Known here: {known}.")
        values[name] = _check_type(value, hints[name], f"{prefix}{name}")
    return cls(**values)


def from_dict(raw: dict) -> Params:
    """Validate a params mapping; raises `ConfigError` naming the first problem."""
    raw = dict(raw or {})
    sweep_raw = raw.pop("sweep", None)
    lens_raw = raw.pop("lens_sweep", None) or {}
    params = _build(Params, raw, "")
    if sweep_raw is not None:
        if not isinstance(sweep_raw, dict) or not sweep_raw:
            raise ConfigError("sweep: expected a non-empty mapping of run name -> settings.")
        params.sweep = {name: _run(r, f"sweep.{name}", False) for name, r in sweep_raw.items()}
    if not isinstance(lens_raw, dict):
        raise ConfigError("lens_sweep: expected a mapping of run name -> settings.")
    for name, r in lens_raw.items():
        if name in params.sweep:
            raise ConfigError(
                f"lens_sweep.{name}: the name is also a sweep entry; runs need names of their own."
            )
        params.sweep[name] = _run(r, f"lens_sweep.{name}", True)
    validate(params)
    return params


def _run(raw, key: str, lens: bool) -> Run:
    if isinstance(raw, dict) and "lens" in raw:
        raise ConfigError(
            f"{key}.lens: runs through the tuned lens go under lens_sweep, the others under sweep "
            "(no 'lens' key): only the lens runs' stages then depend on the lens."
        )
    run = _build(Run, raw, key)
    run.lens = lens
    return run


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"No params file at {path}.")
    return from_dict(yaml.safe_load(path.read_text()))


def _one_of(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}.")


def _bf16_setting(key: str, value) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise ConfigError(f"{key} must be true, false or auto, got {value!r}.")


def _positive(key: str, value) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}.")


def validate_train(t: Train, key: str = "train") -> None:
    """Check the ``train`` section (also run by `mlsae.train.TrainConfig`)."""
    for name in ("lr", "batch_tokens", "dead_tokens", "checkpoint_tokens", "k_aux", "grad_accum"):
        _positive(f"{key}.{name}", getattr(t, name))
    _positive(f"{key}.epochs", t.epochs)
    if t.lr_warmup_tokens < 0:
        raise ConfigError(f"{key}.lr_warmup_tokens must be >= 0, got {t.lr_warmup_tokens}.")
    _one_of(f"{key}.lr_decay", t.lr_decay, LR_DECAYS)
    _one_of(f"{key}.source", t.source, SOURCES)
    _one_of(f"{key}.stream_autocast", t.stream_autocast, AUTOCAST)
    _bf16_setting(f"{key}.select_bf16", t.select_bf16)
    for i, tokens in enumerate(t.snapshot_tokens):
        _positive(f"{key}.snapshot_tokens[{i}]", tokens)
    if t.shuffle_tokens < 0 or 0 < t.shuffle_tokens < t.batch_tokens:
        raise ConfigError(
            f"{key}.shuffle_tokens = {t.shuffle_tokens} is smaller than one batch "
            f"({key}.batch_tokens = {t.batch_tokens}); use 0 to turn shuffling off."
        )


def validate_run(run: Run, key: str) -> None:
    """Check one sweep entry (``key``: its dotted name, for the message)."""
    _positive(f"{key}.train_tokens", run.train_tokens)
    _positive(f"{key}.expansion_factor", run.expansion_factor)
    _positive(f"{key}.k", run.k)


def validate(
    p: Params, d_model: int | None = None, n_ctx: int | None = None, n_layers: int | None = None
) -> None:
    """Check values that types cannot; with the model's sizes also model-dependent ones."""
    for key in ("context_length", "batch_contexts", "train_tokens", "test_tokens"):
        _positive(f"data.{key}", getattr(p.data, key))
    if not 0 < p.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {p.data.test_fraction}.")
    validate_train(p.train)
    _positive("data.shuffle_documents", p.data.shuffle_documents)
    if p.train.source == "stream" and p.lens.train and any(r.lens for r in p.sweep.values()):
        raise ConfigError(
            "lens.train: true trains the lens on the training cache, which train.source: stream "
            "does not build; set lens.train: false (a published lens or lens.lens_dir) or "
            "train.source: cache."
        )
    problem = lens_problem(p.lens, p.sweep, LR_DECAYS)
    if problem:
        raise ConfigError(problem)
    _positive("eval.eval_tokens", p.eval.eval_tokens)
    _bf16_setting("eval.ce_bf16", p.eval.ce_bf16)
    for key in ("ce_contexts", "ce_stride", "sweep_ce_stride"):
        _positive(f"eval.{key}", getattr(p.eval, key))
    if p.eval.sweep_ce_stride % p.eval.ce_stride:
        raise ConfigError(
            f"eval.sweep_ce_stride {p.eval.sweep_ce_stride} must be a multiple of eval.ce_stride "
            f"{p.eval.ce_stride}: paired comparisons need the sweep's (context, layer) pairs to be "
            "a subset of Table 1's."
        )
    _positive("analysis.compare_tokens", p.analysis.compare_tokens)
    _positive("analysis.baseline_ce_contexts", p.analysis.baseline_ce_contexts)
    if n_ctx is not None and p.data.context_length > n_ctx:
        raise ConfigError(
            f"data.context_length {p.data.context_length} exceeds the model's n_ctx {n_ctx}."
        )
    if p.analysis.baseline_run not in p.sweep:
        raise ConfigError(
            f"analysis.baseline_run {p.analysis.baseline_run!r} is not a sweep entry "
            f"({', '.join(p.sweep)})."
        )
    at = baseline_snapshot(p)
    if at is not None and at not in p.train.snapshot_tokens:
        raise ConfigError(
            f"analysis.compare_tokens {at} is below {p.analysis.baseline_run}'s budget of "
            f"{baseline_budget(p)} tokens but not one of train.snapshot_tokens "
            f"{list(p.train.snapshot_tokens)}"
            ": no SAE would be kept at that length to compare with; add it there."
        )
    lens_run = p.analysis.lens_run
    if lens_run is not None and not (lens_run in p.sweep and p.sweep[lens_run].lens):
        runs = [name for name, run in p.sweep.items() if run.lens]
        raise ConfigError(
            f"analysis.lens_run {lens_run!r} is not a lens_sweep entry ({', '.join(runs) or 'none'}"
            "); name one, or null for no lens analysis."
        )
    if n_layers is not None:
        bad = [ly for ly in p.analysis.baseline_layers if not 0 <= ly < n_layers]
        if bad:
            raise ConfigError(
                f"analysis.baseline_layers {bad} out of range for a {n_layers}-layer model."
            )
    with_lens = [name for name, run in p.sweep.items() if run.lens]
    if with_lens and not p.lens.train:
        model = p.base.model
        local = p.lens.lens_dir and local_lens_folder(model, p.lens.lens_dir)
        if model not in PUBLISHED_LENSES and not local:
            where = (
                f"none at {Path(p.lens.lens_dir) / 'lens' / model}/{{config.json, params.pt}}"
                if p.lens.lens_dir
                else "lens.lens_dir is not set"
            )
            raise ConfigError(
                f"lens_sweep.{with_lens[0]} asks for a tuned lens and lens.train is false, but no "
                f"lens is available for {model!r}: none is published for it and {where}. Set "
                "lens.train: true to train one, or lens.lens_dir to a folder holding one."
            )
    for name, run in p.sweep.items():
        validate_run(run, f"{'lens_sweep' if run.lens else 'sweep'}.{name}")
        if d_model is not None:
            n_latents = int(round(run.expansion_factor * d_model))
            if run.k > n_latents:
                raise ConfigError(
                    f"sweep.{name}.k = {run.k} exceeds n_latents = {n_latents} "
                    f"(expansion_factor {run.expansion_factor} x d_model {d_model})."
                )
            if p.train.k_aux is not None and p.train.k_aux > n_latents:
                raise ConfigError(
                    f"train.k_aux = {p.train.k_aux} exceeds n_latents = {n_latents} "
                    f"for sweep.{name}."
                )


def baseline_budget(params: Params) -> int:
    """Training tokens of ``analysis.baseline_run`` (its ``train_tokens``, else the common one)."""
    return params.sweep[params.analysis.baseline_run].train_tokens or params.data.train_tokens


def baseline_snapshot(params: Params) -> int | None:
    """``analysis.compare_tokens`` when the baseline run trains past it, else None.

    The baseline run then keeps a snapshot there (`validate` makes it one of
    ``train.snapshot_tokens``; `mlsae.paths.snapshot_path`), which stands for it in comparisons.
    """
    at = params.analysis.compare_tokens
    return at if at is not None and at < baseline_budget(params) else None


def compare_tokens(params: Params) -> int:
    """Training length at which the baseline run is compared with the other runs and baselines.

    Its snapshot's length (`baseline_snapshot`), else the baseline run's own budget.
    """
    return baseline_snapshot(params) or baseline_budget(params)


def as_dict(p: Params) -> dict:
    """Plain-dict form (for saving with results)."""
    return dataclasses.asdict(p)
