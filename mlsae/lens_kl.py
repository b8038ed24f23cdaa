r"""KL between the model's next-token distribution and a tuned lens's, per layer.

For the output :math:`h_l` of block l and the model's own next-token distribution p (the final norm
and unembedding of the last block's output), the lens's distribution is the same final norm and
unembedding applied to the lens transform of :math:`h_l`; the KL at layer l is
:math:`\mathrm{mean}_t KL(p(t) \| p_{lens, l}(t))` (Belrose et al. 2023), the objective of
`mlsae.lens_training.train_lens` and the logit-lens vs tuned-lens table. KL from the one
definition of `mlsae.distributions`.
"""

from __future__ import annotations

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
