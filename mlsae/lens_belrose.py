r"""The ``belrose`` lens: the tuned-lens recipe of Belrose et al. (2023) on cached residuals.

As in their ``tuned_lens/scripts/train_loop.py`` and ``ingredients.py`` (AlignmentResearch/
tuned-lens): translators start at zero (the identity map, x' = x + W x + b); each step minimises

.. math::  \mathcal{L} = \sum_l \mathrm{mean}_t\, KL(p_{final}(t) \| q_l(t))

(q_l: final norm and unembedding of the lens-transformed output of block l, p_final: the model's
own next-token distribution at the same position) by SGD with Nesterov momentum
:math:`\beta` = ``belrose_momentum`` and learning rate :math:`s (1 - \beta)`, s =
``belrose_lr_scale`` (PyTorch's momentum scales a step by :math:`1 / (1 - \beta)`; they undo it
and take s = 1), decayed linearly to 0 at the last step (their schedule without warm-up);
weight decay on W and b, which is decay towards the identity; the gradient's global norm clipped
to ``belrose_clip`` before each step. They take 250 steps of 2^18 tokens; here
``belrose_steps`` of ``belrose_batch_tokens`` tokens drawn in a seeded order from the training
cache (a 2-core CPU budget), float32 on CPUs without bf16 (`mlsae.precision`).

Differences, all for cost: only translators 1 .. L-1 are trained, those the block outputs use
(translator l + 1 maps the output of block l, `mlsae.lens.TunedLens`); translator 0, on the
embeddings, stays the identity. The loss is `mlsae.lens_kl.sampled_kl`: exact logits on each
batch's ``belrose_loss_vocab`` likeliest tokens under p_final (largest summed probability), the
rest of the vocabulary estimated from ``belrose_tail_samples`` uniform samples drawn afresh each
step (~40x fewer unembedding flops than the exact KL for SmolLM2); ``belrose_loss_vocab`` null
gives the exact KL. Measured on SmolLM2 / Brown, 20 steps from the identity: held-out KL 5.68
nats with this loss, 5.82 with a coarse-grained loss (support + one tail bucket).

**Held-out curve and convergence.** ``heldout_tokens`` tokens of the training cache
(`mlsae.lens_training.heldout_split`, never trained on) get the exact KL (float64, full
vocabulary) at step 0, at ``belrose_evals`` equally spaced steps and at 80% of the steps. With
:math:`K_s(t)` the mean over layers of that KL at held-out token t after step s and
:math:`d(t) = K_{s_{80}}(t) - K_{T}(t)` (decrease over the last 20% of the steps):

    converged  iff  mean_t d(t) < 2 sd_t(d) / sqrt(n)

i.e. the held-out KL no longer falls by more than twice its paired standard error
(`convergence`). The linear decay makes late steps small, so a lens still far from its optimum
can pass; the relative decrease is recorded beside the verdict.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer

from mlsae import config
from mlsae.distributions import NextTokenDistribution
from mlsae.lens import TunedLens
from mlsae.lens_kl import Unembedder, kl_per_token, sampled_kl
from mlsae.lens_training import gather_tokens, heldout_split
from mlsae.precision import use_bf16
from mlsae.schedule import lr_factor


def eval_steps(steps: int, evals: int) -> list[int]:
    """Steps after which the held-out KL is taken: 0, ``evals`` equally spaced, and 80%."""
    at = {round(j * steps / evals) for j in range(evals + 1)} | {round(0.8 * steps)}
    return sorted(at)


def convergence(before: torch.Tensor, after: torch.Tensor) -> dict:
    """The convergence test on per-token held-out KL at 80% of the steps and at the end.

    ``before``, ``after``: ``(token,)`` mean-over-layers KL of the same held-out tokens. Returns
    ``{"decrease", "se", "relative_decrease", "converged"}``: ``decrease`` = mean(before - after),
    ``se`` = sd(before - after) / sqrt(n) (sample sd), ``converged`` = decrease < 2 se.
    """
    d = (before - after).double()
    decrease = d.mean().item()
    se = (d.std(unbiased=True) / math.sqrt(len(d))).item() if len(d) > 1 else math.inf
    return {
        "decrease": decrease,
        "se": se,
        "relative_decrease": decrease / before.double().mean().item(),
        "converged": bool(decrease < 2 * se),
    }


def step_loss(
    unembed: Unembedder,
    final: Unembedder,
    lens: TunedLens,
    acts: torch.Tensor,
    loss_vocab: int | None,
    tail_samples: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """``(layer,)`` mean training KL of blocks 0 .. L-2 on one batch ``acts`` ``(L, token, d)``.

    ``final`` gives the float32 reference logits; ``unembed`` the lens's (bf16 where native).
    Exact KL when ``loss_vocab`` is None or covers the vocabulary, else `sampled_kl`.
    """
    h = torch.stack([acts[i] + lens.translators[i + 1](acts[i]) for i in range(len(acts) - 1)])
    with torch.no_grad():
        logits = final(acts[-1])
    vocab = logits.shape[-1]
    if loss_vocab is None or loss_vocab >= vocab:
        ref = NextTokenDistribution(logits, dtype=torch.float32, rows=None)
        return torch.stack([ref.kl(unembed(x).float()).mean() for x in h])
    with torch.no_grad():
        logp = logits.log_softmax(-1)
        p = logp.exp()
        neg_entropy = (p * logp).sum(-1)
        support = p.sum(0).topk(loss_vocab).indices
        tail = torch.ones(vocab, dtype=torch.bool)
        tail[support] = False
        tail = tail.nonzero().flatten()
        sample = tail[torch.randperm(len(tail), generator=gen)[:tail_samples]]
    z = unembed.columns(h, torch.cat([support, sample])).float()
    zs, zr = z[..., :loss_vocab], z[..., loss_vocab:]
    kl = sampled_kl(neg_entropy, p[:, support], zs, p[:, sample], zr, len(tail))
    return kl.mean(-1)


@torch.no_grad()
def heldout_kl(unembed64: Unembedder, lens: TunedLens, acts: torch.Tensor) -> torch.Tensor:
    """``(layer, token)`` exact KL of blocks 0 .. L-2 through ``lens`` (float64 logits)."""
    h = torch.stack([lens.transform(acts[i], i) for i in range(len(acts) - 1)])
    return kl_per_token(unembed64, acts[-1], h)


def train_belrose(
    model: HookedTransformer,
    cache,
    settings: config.Lens | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    bf16: bool | str = "auto",
) -> tuple[TunedLens, dict]:
    """Train the ``belrose`` lens (module docstring) on training cache ``cache``.

    Returns:
        ``(lens, record)``: the lens (eval mode) and ``{"history"`` (mean training loss over
        layers per step, nats), ``"heldout"`` (``steps``, ``kl`` mean over layers, ``kl_layers``
        per layer, ``token_kl`` per held-out token), ``"convergence"`` (`convergence`),
        ``"seconds"`` (of which ``"seconds_heldout"``), ``"n_heldout"``, ``"layers_trained"}``.
    """
    s = config.Lens() if settings is None else settings
    d, n_layers = model.cfg.d_model, model.cfg.n_layers
    heldout, rest = heldout_split(cache.n_tokens, s.heldout_tokens, seed)
    lens = TunedLens(d, n_layers, model.cfg.model_name).to(model.cfg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for t in lens.translators[1:] for p in t.parameters()]
    for p in lens.translators[0].parameters():
        p.requires_grad_(False)
    lr0 = s.belrose_lr_scale * (1 - s.belrose_momentum)
    opt = torch.optim.SGD(
        params,
        lr=lr0,
        momentum=s.belrose_momentum,
        nesterov=s.belrose_momentum > 0,
        weight_decay=s.belrose_weight_decay,
    )
    exact = Unembedder(model)
    fast = Unembedder(model, torch.bfloat16) if use_bf16(bf16, model.cfg.device) else exact
    unembed64 = Unembedder(model, out_dtype=torch.float64)
    held_acts = gather_tokens(cache, heldout)[0].to(model.cfg.device)
    gen = torch.Generator().manual_seed(seed)
    checkpoints = eval_steps(s.belrose_steps, s.belrose_evals)
    history, curve = [], {"steps": [], "kl": [], "kl_layers": [], "token_kl": []}
    batch = torch.arange(s.belrose_batch_tokens)
    start = time.time()

    spent = {"heldout": 0.0}

    def evaluate(step: int) -> None:
        t0 = time.time()
        kl = heldout_kl(unembed64, lens, held_acts)
        spent["heldout"] += time.time() - t0
        curve["steps"].append(step)
        curve["kl"].append(kl.mean().item())
        curve["kl_layers"].append(kl.mean(1).tolist())
        curve["token_kl"].append(kl.mean(0).tolist())

    evaluate(0)
    bar = tqdm(total=s.belrose_steps, desc="belrose lens", disable=not progress)
    for step in range(s.belrose_steps):
        idx = rest[(step * s.belrose_batch_tokens + batch) % len(rest)]  # cycles over rest
        acts = gather_tokens(cache, idx)[0].to(model.cfg.device)
        per_layer = step_loss(
            fast, exact, lens, acts, s.belrose_loss_vocab, s.belrose_tail_samples, gen
        )
        opt.zero_grad(set_to_none=True)
        per_layer.sum().backward()
        if s.belrose_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.belrose_clip)
        for group in opt.param_groups:
            group["lr"] = lr0 * lr_factor(step, s.belrose_steps, decay="linear")
        opt.step()
        history.append(per_layer.mean().item())
        bar.update(1)
        bar.set_postfix(kl=f"{history[-1]:.3f}")
        if step + 1 in checkpoints:
            evaluate(step + 1)
    bar.close()
    at = curve["steps"]
    before = torch.tensor(curve["token_kl"][at.index(round(0.8 * s.belrose_steps))])
    record = {
        "history": history,
        "heldout": curve,
        "convergence": convergence(before, torch.tensor(curve["token_kl"][-1])),
        "seconds": time.time() - start,
        "seconds_heldout": spent["heldout"],
        "n_heldout": len(heldout),
        "layers_trained": list(range(n_layers - 1)),
    }
    lens.clear_cache()
    return lens.eval(), record
