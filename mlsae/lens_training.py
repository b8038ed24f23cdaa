r"""The ``regression`` lens (least-squares start, Adam on the KL, condition cap) and shared helpers.

`train_lens` minimises the KL of `mlsae.lens_kl` over cached residuals, from the identity or from
`regression_lens`; its settings are the ``lens`` section of params.yaml (`mlsae.config.Lens`:
``steps`` .. ``max_condition``). The other methods are `mlsae.lens_belrose` and
`mlsae.lens_ridge`; `heldout_split` and `gather_tokens` give them their data.
"""

from __future__ import annotations

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer

from mlsae import config
from mlsae.distributions import NextTokenDistribution
from mlsae.lens import TunedLens
from mlsae.lens_kl import Unembedder
from mlsae.precision import use_bf16
from mlsae.schedule import lr_factor


def block_inputs(
    model: HookedTransformer, acts: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """``(n_layers, token, d)`` inputs of blocks ``0 .. L-1``, the translators' inputs.

    From cached block outputs ``acts`` ``(layer, token, d)`` and their ``tokens`` ``(token,)``:
    resid_pre of block 0 is the token embedding (models with rotary or no positional embeddings
    only), resid_pre of block i is block i-1's output. On ``acts``'s device and dtype.
    """
    embed = model.embed(tokens.long().to(model.cfg.device))[None]
    return torch.cat([embed.to(acts.device, acts.dtype), acts[:-1]])


def heldout_split(n_tokens: int, n_heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(heldout, rest)``: sorted global token indices of a training cache, split at random.

    ``n_heldout`` tokens drawn by a ``seed``-ed permutation (spread over the cache's contexts)
    are held out of the belrose and ridge fits; ``rest`` are the other tokens in that random
    order (the fits' training order).
    """
    if not 0 < n_heldout < n_tokens:
        raise ValueError(f"Cannot hold out {n_heldout} of a cache of {n_tokens} tokens.")
    order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))
    return order[:n_heldout].sort().values, order[n_heldout:]


def gather_tokens(cache, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(acts (layer, len(idx), d) float32, token ids)`` of global token indices ``idx``.

    Indices count tokens across the cache's shards in order; the result keeps ``idx``'s order.
    """
    sizes = [cache.shard(i).shape[1] for i in range(len(cache))]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    idx = torch.as_tensor(idx).long()
    order = idx.argsort()
    shard_of = torch.searchsorted(starts, idx[order], right=True) - 1
    acts, toks = [], []
    for shard in shard_of.unique().tolist():
        local = (idx[order][shard_of == shard] - starts[shard]).numpy()
        acts.append(torch.from_numpy(cache.shard(shard)[:, local].astype("float32")))
        toks.append(torch.from_numpy(cache.tokens(shard)[local].astype("int64")))
    inverse = order.argsort()
    return torch.cat(acts, 1)[:, inverse], torch.cat(toks)[inverse]


@torch.no_grad()
def regression_lens(
    model: HookedTransformer,
    cache,
    max_tokens: int = 16384,
    ridge: float = 1e-3,
    max_condition: float = 100.0,
) -> TunedLens:
    """A lens whose translators are least-squares maps from each block's input to the last output.

    Translator ``i`` maps ``x`` (the input of block ``i``, a row) to ``x (I + W_i^T) + b_i``; this
    fits ``M_i = I + W_i^T`` and ``b_i`` to minimise ``sum_t ||h_L(t) - x_i(t) M_i - b_i||^2``
    over ``max_tokens`` cached training tokens (h_L: the last block's output, which the model
    unembeds), by the normal equations on centred data in float64 with a ridge of ``ridge`` times
    the mean diagonal of the covariance, then capped at condition number ``max_condition``
    (`cap_condition`). This is the linear shortcut of Din et al. (2023), used here as the
    starting point of `train_lens` (``lens.init: regression``): the KL objective then starts from a
    map that already carries each layer towards the last one instead of from the identity.
    Measured on SmolLM2 / Brown (512 held-out tokens, mean over 29 layers): KL 14.9 nats for the
    identity (logit lens), 2.14 for the uncapped fit (cond up to 5.7e5), 2.24 capped at 100; 60
    KL steps from the identity at lr 1e-3 reach 4.55, at 3e-3 4.55 as well, and are still falling.
    """
    d, n_layers = model.cfg.d_model, model.cfg.n_layers
    n = 0
    sx = torch.zeros(n_layers, d, dtype=torch.float64)
    sy = torch.zeros(d, dtype=torch.float64)
    sxx = torch.zeros(n_layers, d, d, dtype=torch.float64)
    sxy = torch.zeros(n_layers, d, d, dtype=torch.float64)
    for shard in range(len(cache)):
        if n >= max_tokens:
            break
        take = min(max_tokens - n, cache.shard(shard).shape[1])
        acts = torch.from_numpy(cache.shard(shard)[:, :take].astype("float32"))
        toks = torch.from_numpy(cache.tokens(shard)[:take])
        x = block_inputs(model, acts, toks).double()  # (n_layers, t, d)
        y = acts[-1].double()
        sx += x.sum(1)
        sy += y.sum(0)
        sxx += x.transpose(1, 2) @ x
        sxy += x.transpose(1, 2) @ y
        n += take
    if n < 2 * d:
        raise ValueError(f"regression_lens needs at least {2 * d} tokens, the cache has {n}.")
    mx, my = sx / n, sy / n
    cov = sxx / n - mx[:, :, None] * mx[:, None, :]
    cross = sxy / n - mx[:, :, None] * my[None, None, :]
    lens = TunedLens(d, n_layers, model.cfg.model_name)
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(n_layers):
        reg = ridge * cov[i].diagonal().mean() * eye
        m = torch.linalg.solve(cov[i] + reg, cross[i])  # (d, d): x_c M ~ y_c
        lens.translators[i].weight.copy_((m - eye).T.float())
        lens.translators[i].bias.copy_((my - mx[i] @ m).float())
    cap_condition(lens, max_condition)
    return lens.to(model.cfg.device)


@torch.no_grad()
def cap_condition(lens: TunedLens, max_condition: float) -> TunedLens:
    """Clip each translator's ``I + W`` to condition number ``max_condition``, in place.

    Singular values below ``s_max / max_condition`` are raised to it (``I + W = U S V^T``): the
    closest matrix in spectral norm with that condition number. A least-squares map to the last
    layer nearly collapses directions the unembedding ignores; the SAE's inverse
    ``(I + W)^{-1}`` would multiply its reconstruction errors along them by up to cond(I + W).
    """
    for t in lens.translators:
        eye = torch.eye(lens.d_model, dtype=torch.float64, device=t.weight.device)
        u, sv, vh = torch.linalg.svd(eye + t.weight.double())
        sv = sv.clamp_min(sv.max() / max_condition)
        t.weight.copy_(((u * sv) @ vh - eye).to(t.weight.dtype))
    lens.clear_cache()
    return lens


def train_lens(
    model: HookedTransformer,
    cache,
    settings: config.Lens | None = None,
    *,
    progress: bool = True,
    weight_decay: float = 1e-3,
    bf16: bool | str = "auto",
    init_tokens: int = 16384,
) -> tuple[TunedLens, list[float]]:
    """Fit translators so each layer's lens matches the model's final next-token distribution.

    Minimises ``sum_i mean_t KL(p_final(t) || p_lens_i(t))`` (Belrose et al. 2023; `mlsae.lens_kl`)
    over cached residuals with Adam; the model is frozen.

    Args:
        model: the language model (rotary or no positional embeddings: block 0's input is read
            from the token embeddings).
        cache: an `mlsae.activations.ActivationCache` of training block outputs.
        settings: the ``lens`` section of params.yaml (None: `mlsae.config.Lens` defaults); used
            here: ``steps`` and ``batch_tokens`` (tokens per step); ``lr`` with ``lr_decay``
            (`mlsae.schedule.lr_factor`: ``none``, ``linear``, ``cosine``, to 0 at the last step,
            so the lens settles instead of ending on a noisy step); ``init``: ``identity`` starts
            from zero translators (Belrose et al.), ``regression`` from `regression_lens` on
            ``init_tokens`` training tokens; ``max_condition``: cond(I + W) of every translator is
            capped at the start (regression) and after the last step (`cap_condition`).
        progress: show a progress bar.
        weight_decay: Adam's weight decay.
        bf16: run the unembedding matmuls of the training loss in bfloat16 (the model's own
            distribution, the softmax and the KL stay float32); several times faster on CPUs with
            bf16 units and on GPUs, far slower on CPUs without them (``auto``: where the device
            has them, `mlsae.precision`). Evaluation (`mlsae.lens_kl.lens_kl_per_layer`) takes
            float64 logits.
        init_tokens: training tokens of the regression start.

    Returns:
        ``(lens, history)``: the lens (eval mode) and the mean per-layer KL of each step.
    """
    settings = config.Lens() if settings is None else settings
    steps, batch_tokens, lr = settings.steps, settings.batch_tokens, settings.lr
    if model.cfg.positional_embedding_type not in ("rotary", "alibi"):
        raise ValueError("train_lens reads embeddings from token ids; needs a rotary model.")
    d, n_layers = model.cfg.d_model, model.cfg.n_layers
    if settings.init == "regression":
        lens = regression_lens(model, cache, init_tokens, max_condition=settings.max_condition)
    elif settings.init == "identity":
        lens = TunedLens(d, n_layers, model.cfg.model_name).to(model.cfg.device)
    else:
        raise ValueError(f"lens init must be 'identity' or 'regression', not {settings.init!r}.")
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(lens.parameters(), lr=lr, weight_decay=weight_decay)
    exact = Unembedder(model)
    bf16 = use_bf16(bf16, model.cfg.device)
    fast = Unembedder(model, torch.bfloat16) if bf16 else exact
    history: list[float] = []
    bar = tqdm(total=steps, desc="lens", disable=not progress)
    step = 0
    while step < steps:
        for shard in range(len(cache)):
            acts_all = torch.from_numpy(cache.shard(shard)[:].astype("float32"))
            toks_all = torch.from_numpy(cache.tokens(shard))
            for start in range(0, acts_all.shape[1], batch_tokens):
                if step >= steps:
                    break
                acts = acts_all[:, start : start + batch_tokens].to(model.cfg.device)
                inputs = block_inputs(model, acts, toks_all[start : start + batch_tokens])
                final = NextTokenDistribution(exact(acts[-1]), dtype=torch.float32, rows=None)
                loss = torch.zeros((), device=acts.device)
                for i in range(n_layers):
                    h = inputs[i] + lens.translators[i](inputs[i])
                    loss = loss + final.kl(fast(h)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for group in opt.param_groups:
                    group["lr"] = lr * lr_factor(step, steps, decay=settings.lr_decay)
                opt.step()
                history.append(loss.item() / n_layers)
                step += 1
                bar.update(1)
                bar.set_postfix(kl=f"{history[-1]:.3f}")
            if step >= steps:
                break
    bar.close()
    cap_condition(lens, settings.max_condition)
    return lens.eval(), history
