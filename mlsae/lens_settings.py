"""The ``lens`` section of params.yaml (`Lens`, re-exported by `mlsae.config`) and its checks.

Kept beside `mlsae.config` rather than in it for length: three lens methods with their settings.
Imports nothing from mlsae; `lens_problem` returns a message that `mlsae.config.validate`
raises as a `mlsae.config.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LENS_INITS = ("regression", "identity")
LENS_METHODS = ("belrose", "ridge", "regression")


@dataclass
class Lens:
    """Tuned lenses: one per method in ``methods``, or a published one from ``lens_dir``/the hub.

    Methods (`mlsae.lens_belrose`, `mlsae.lens_ridge`, `mlsae.lens_training`): ``belrose``, the
    tuned-lens recipe of Belrose et al. (2023) from the identity; ``ridge``, the closed-form ridge
    map towards the identity; ``regression``, the capped least-squares map plus Adam steps (the
    ``steps`` .. ``max_condition`` keys). Stage ``train_lens`` writes each to
    ``<cache_dir>/lens/<model>/<method>``.
    """

    train: bool = True
    method: str = "belrose"
    """The lens of ``lens_sweep`` runs without a ``lens_method``, and of the analyses."""
    methods: list[str] = field(default_factory=lambda: list(LENS_METHODS))
    """Methods stage ``train_lens`` trains (``method`` must be one of them)."""
    heldout_tokens: int = 64
    """Training-cache tokens (a seeded sample) left out of the belrose and ridge fits: belrose's
    held-out KL curve and convergence test, and ridge's choice of lambda."""
    belrose_steps: int = 400
    """SGD steps of the belrose lens (Belrose et al.: 250 of 2^18 tokens)."""
    belrose_batch_tokens: int = 128
    belrose_lr_scale: float = 1.0
    """Learning rate ``lr_scale * (1 - momentum)`` (tuned-lens's SGD default), decayed linearly
    to 0 at the last step."""
    belrose_momentum: float = 0.9
    """Nesterov momentum."""
    belrose_weight_decay: float = 1e-3
    """L2 on the translators' W and b: a decay towards the identity map."""
    belrose_clip: float = 1.0
    """Clip of the gradient's global norm."""
    belrose_loss_vocab: int | None = 1024
    """Tokens with exact logits in the training loss (`mlsae.lens_kl.sampled_kl`: the batch's most
    probable tokens; the rest estimated from samples); null: the exact KL over the vocabulary."""
    belrose_tail_samples: int = 256
    """Uniform samples of the rest of the vocabulary in the training loss, drawn every step."""
    belrose_evals: int = 4
    """Held-out KL evaluations after step 0 (equally spaced, and one at 80% of the steps for the
    convergence test)."""
    ridge_lambdas: list[float] = field(
        default_factory=lambda: [0.01, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0]
    )
    """Ridge strengths tried per layer, in units of the mean eigenvalue of the centred Gram
    matrix X_c^T X_c; the one with the lowest held-out KL is kept (among the allowed)."""
    ridge_max_condition: float | None = 100.0
    """Largest cond(M) allowed for the ridge map (null: only the inverse's limit, 1e6)."""
    ridge_tokens: int = 16384
    """Training tokens of the ridge fit."""
    steps: int = 10
    """``regression``: Adam steps after the least-squares start (40 did not move it)."""
    batch_tokens: int = 128
    lr: float = 1e-3
    lr_decay: str = "none"
    """Step-size decay to 0 over ``steps`` (``none``, ``linear``, ``cosine``)."""
    init: str = "regression"
    """``regression``: start from the least-squares map to the last layer (`mlsae.lens_training`);
    ``identity``: start from x' = x (Belrose et al.)."""
    max_condition: float = 100.0
    """Cap on cond(I + W) of each translator: singular values are clipped at the regression start
    and after the last step."""
    lens_dir: str | None = None
    """Where to look for an existing lens (``lens/<model id>/``) when not training one.

    None: the published lenses on the hub. The pipeline's own copies are
    ``<cache_dir>/lens/<model>/<method>`` (a loaded lens is stored as ``method``).
    """
    eval_tokens: int = 1024
    """Held-out tokens (test cache) for the KL table of the lenses against the logit lens."""


def lens_problem(lens: Lens, runs: dict, lr_decays: tuple[str, ...]) -> str | None:
    """The first problem of the ``lens`` section and of the runs' ``lens_method``, or None.

    ``runs``: ``params.sweep`` (entries with ``lens`` and ``lens_method``); ``lr_decays``: the
    schedule names of `mlsae.config`.
    """
    choices = {"lens.method": (lens.method, LENS_METHODS), "lens.init": (lens.init, LENS_INITS)}
    choices |= {f"lens.methods[{i}]": (m, LENS_METHODS) for i, m in enumerate(lens.methods)}
    choices["lens.lr_decay"] = (lens.lr_decay, lr_decays)
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            return f"{key} must be one of {', '.join(allowed)}, got {value!r}."
    positive = ["steps", "eval_tokens", "heldout_tokens", "ridge_tokens", "belrose_evals"]
    positive += ["belrose_steps", "belrose_batch_tokens", "belrose_lr_scale"]
    positive += ["belrose_loss_vocab", "belrose_tail_samples"]
    values = {f"lens.{k}": getattr(lens, k) for k in positive}
    values |= {f"lens.ridge_lambdas[{i}]": v for i, v in enumerate(lens.ridge_lambdas)}
    for key, value in values.items():
        if value is not None and not value > 0:
            return f"{key} must be positive, got {value}."
    for key in ("belrose_weight_decay", "belrose_clip"):
        if not getattr(lens, key) >= 0:
            return f"lens.{key} must be >= 0, got {getattr(lens, key)}."
    if not 0 <= lens.belrose_momentum < 1:
        return f"lens.belrose_momentum must be in [0, 1), got {lens.belrose_momentum}."
    if lens.ridge_max_condition is not None and not lens.ridge_max_condition >= 1:
        return f"lens.ridge_max_condition must be at least 1, got {lens.ridge_max_condition}."
    if not lens.max_condition >= 1:
        return f"lens.max_condition must be at least 1, got {lens.max_condition}."
    if not lens.ridge_lambdas:
        return "lens.ridge_lambdas: expected at least one ridge strength."
    if lens.train and lens.method not in lens.methods:
        return f"lens.method {lens.method!r} is not in lens.methods {lens.methods}."
    trained = lens.methods if lens.train else [lens.method]
    for name, run in runs.items():
        if run.lens_method is None:
            continue
        if not run.lens:
            return f"sweep.{name}.lens_method: only lens_sweep entries go through a lens."
        if run.lens_method not in trained:
            return (
                f"lens_sweep.{name}.lens_method {run.lens_method!r}: no such lens is made "
                f"(lens.train {lens.train}, lens.method {lens.method!r}, lens.methods "
                f"{lens.methods})."
            )
    return None
