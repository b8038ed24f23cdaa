r"""KL between the model's next-token distribution and a tuned lens's, per layer.

For the output :math:`h_l` of block l and the model's own next-token distribution p (the final norm
and unembedding of the last block's output), the lens's distribution is the same final norm and
unembedding applied to the lens transform of :math:`h_l`; the KL at layer l is
:math:`\mathrm{mean}_t KL(p(t) \| p_{lens, l}(t))` (Belrose et al. 2023), the objective of the
lens trainers (`mlsae.lens_belrose`, `mlsae.lens_training`), the criterion of `mlsae.lens_ridge`
and the table of lenses against the logit lens. KL from the one definition of
`mlsae.distributions`.

`sampled_kl` is the cheaper training loss of `mlsae.lens_belrose`: the KL with the logits of a
support S exact and the sums over the rest of the vocabulary estimated from uniform samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from mlsae.activations import take_tokens
from mlsae.distributions import NextTokenDistribution
from mlsae.lens import TunedLens


class Unembedder:
    """Final norm + unembedding with the weight laid out once.

    TransformerLens's ``Unembed`` transposes (copies) ``W_U`` on every call, a 113 MB copy for
    SmolLM2; the lens calls it once per layer per step. ``dtype`` bfloat16 runs the matmul in
    bf16 (training only); logits are returned in ``out_dtype``.
    """

    def __init__(
        self,
        model: HookedTransformer,
        dtype: torch.dtype = torch.float32,
        out_dtype: torch.dtype = torch.float32,
    ):
        self.norm = model.ln_final
        self.weight = model.unembed.W_U.detach().T.contiguous().to(dtype)  # (vocab, d)
        self.bias = model.unembed.b_U.detach().to(dtype)
        self.out_dtype = out_dtype

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` residuals -> ``(..., vocab)`` logits in ``out_dtype``."""
        normed = self.norm(resid).to(self.weight.dtype)
        return F.linear(normed, self.weight, self.bias).to(self.out_dtype)

    def columns(self, resid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(..., len(ids))`` logits of the vocabulary entries ``ids`` only."""
        normed = self.norm(resid).to(self.weight.dtype)
        return F.linear(normed, self.weight[ids], self.bias[ids]).to(self.out_dtype)


def sampled_kl(
    neg_entropy: torch.Tensor,
    p_support: torch.Tensor,
    z_support: torch.Tensor,
    p_sample: torch.Tensor,
    z_sample: torch.Tensor,
    n_tail: int,
) -> torch.Tensor:
    r"""KL(p || softmax(z)) with the terms of the tail T = V \ S estimated from uniform samples.

    With R m tokens drawn uniformly without replacement from T and w = |T| / m:

    .. math::

        \widehat{KL} = \sum_v p_v \log p_v - \sum_{v \in S} p_v z_v - w \sum_{v \in R} p_v z_v
        + \log\Big(\sum_{v \in S} e^{z_v} + w \sum_{v \in R} e^{z_v}\Big)

    The exact KL is :math:`\sum p \log p - p \cdot z + \log \sum_v e^{z_v}`
    (`mlsae.distributions.kl_from_logits`): the sums over T are replaced by their unbiased
    estimates, so the linear terms are unbiased and, by Jensen, the log term is biased low
    (:math:`E \widehat{KL} \le KL`). R = T (m = |T|) or S = V (``n_tail`` 0) give the exact KL.

    Args:
        neg_entropy: ``(...)`` :math:`\sum_v p_v \log p_v` over the whole vocabulary.
        p_support: ``(..., |S|)`` p on S.
        z_support: ``(..., |S|)`` the logits of q on S.
        p_sample: ``(..., m)`` p on the tail samples (unused if ``n_tail`` is 0).
        z_sample: ``(..., m)`` the logits of q on the tail samples.
        n_tail: |T|.

    Returns:
        ``(...)`` estimate in nats, differentiable in the logits.
    """
    linear = (p_support * z_support).sum(-1)
    if n_tail == 0:
        return neg_entropy - linear + z_support.logsumexp(-1)
    log_w = math.log(n_tail / z_sample.shape[-1])
    linear = linear + math.exp(log_w) * (p_sample * z_sample).sum(-1)
    log_z = torch.cat([z_support, z_sample + log_w], -1).logsumexp(-1)
    return neg_entropy - linear + log_z


@torch.no_grad()
def kl_per_token(
    unembed: Unembedder, final_resid: torch.Tensor, resid: torch.Tensor
) -> torch.Tensor:
    """``(layer, token)`` exact KL(final || softmax(unembed(resid[layer]))) in float64.

    ``final_resid`` ``(token, d)``: the last block's output; ``resid`` ``(layer, token, d)``: the
    vectors to unembed (lens-transformed block outputs). Logits are taken in ``unembed``'s
    ``out_dtype`` (float64 for evaluation).
    """
    final = NextTokenDistribution(unembed(final_resid), rows=None)
    return torch.stack([final.kl(unembed(h)).double() for h in resid])


@torch.no_grad()
def lens_kl_per_layer(
    model: HookedTransformer, lens: TunedLens | None, cache, max_tokens: int
) -> list[float]:
    """Mean KL(final || lens) per block output over cached held-out residuals.

    Entry ``l`` is for the output of block ``l`` (translator ``l + 1``); with ``lens=None`` the
    logit lens (identity translators). The last entry is 0 by construction.

    Args:
        model: the language model.
        lens: the lens, or None for the logit lens.
        cache: an `mlsae.activations.ActivationCache` of held-out block outputs
            ``(layer, token, d)``.
        max_tokens: tokens of ``cache`` to average over (its first ones).

    Returns:
        ``(layer,)`` mean KL in nats, as a list.
    """
    n_layers = model.cfg.n_layers
    # float64 logits: the KL's terms cancel, and float32 leaves ~1e-4 nats of noise
    unembed = Unembedder(model, out_dtype=torch.float64)
    total = torch.zeros(n_layers, dtype=torch.float64)
    seen = 0
    for batch in take_tokens(cache.iter_batches(512), max_tokens):
        batch = batch.to(model.cfg.device)
        final = NextTokenDistribution(unembed(batch[-1]), rows=None)
        for layer in range(n_layers):
            h = batch[layer] if lens is None else lens.transform(batch[layer], layer)
            total[layer] += final.kl(unembed(h)).double().sum().cpu()
        seen += batch.shape[1]
    return (total / seen).tolist()
