r"""A language model's next-token distribution, kept for repeated CE and KL evaluations.

With p the distribution of reference logits (the clean run, or the model's own output for a lens),
z any other logits and :math:`\mathrm{lse}(z) = \log \sum_v e^{z_v}`:

.. math::

    \mathrm{CE} = \mathrm{lse}(z) - z_{y}, \qquad
    KL(p \| \mathrm{softmax}(z)) = \sum_v p_v \log p_v - p \cdot z + \mathrm{lse}(z)

so p, its negative entropy and its own CE are computed once, and each other set of logits costs
one logsumexp and one dot product per position (no log-softmax of z, no exp of the reference).
The delta-CE and KL metrics (`mlsae.patching`) and the tuned lens's objective and evaluation
(`mlsae.lens_kl`, `mlsae.lens_training`) use this one definition. Imports only torch.
"""

from __future__ import annotations

import torch

ROWS = 64
"""Positions per block in evaluation: a batch of vocabulary-sized float64 rows is ~1 GB of memory
traffic per step."""


def kl_from_logits(p: torch.Tensor, neg_entropy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``KL(p || softmax(z))`` per row: ``sum p log p + logsumexp(z) - p . z``.

    Args:
        p: ``(..., vocab)`` reference probabilities.
        neg_entropy: ``(...)`` ``sum p log p``, computed once per ``p``.
        z: ``(..., vocab)`` logits of the other distribution.

    Returns:
        ``(...)``. One pass over the vocabulary instead of forming ``log softmax(z)``; its gradient
        in z is ``softmax(z) - p``.
    """
    return neg_entropy + z.logsumexp(-1) - (p * z).sum(-1)


class NextTokenDistribution:
    """The next-token distribution p at each position of reference ``logits``, computed once.

    Computed a block of ``rows`` positions at a time, each block cast to ``dtype``.

    Args:
        logits: ``(..., vocab)`` reference logits; position i's row predicts ``targets[i]``.
        targets: ``(...)`` next-token ids, for `ce` and `ce_and_kl` (None: KL only).
        dtype: dtype of p and of every CE and KL (float64 for evaluation; the lens's training
            objective keeps its float32 logits in float32).
        rows: positions per block (None: all at once).

    Attributes:
        p: ``(positions, vocab)`` probabilities, the leading dims flattened.
        neg_entropy: ``(positions,)`` ``sum p log p``.
        ce: ``(...)`` cross-entropy of ``targets`` under p (None without targets).
    """

    @torch.no_grad()
    def __init__(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        rows: int | None = ROWS,
    ):
        self.shape, self.dtype, self.rows = logits.shape[:-1], dtype, rows
        device = logits.device
        self.p = torch.empty(logits.shape, dtype=dtype, device=device).view(-1, logits.shape[-1])
        self.neg_entropy = torch.empty(self.p.shape[0], dtype=dtype, device=device)
        self.targets = None if targets is None else targets.reshape(-1, 1).to(device)
        ce = None if targets is None else torch.empty_like(self.neg_entropy)
        for rows, z in self._blocks(logits):
            logp = z.log_softmax(-1)
            self.p[rows] = logp.exp()
            self.neg_entropy[rows] = (self.p[rows] * logp).sum(-1)
            if ce is not None:
                ce[rows] = -logp.gather(-1, self.targets[rows]).squeeze(-1)
        self.ce = None if ce is None else ce.view(self.shape)

    def _blocks(self, logits: torch.Tensor):
        """``(rows, block)`` pairs: a slice of positions and its ``(rows, vocab)`` logits."""
        flat = logits.reshape(-1, logits.shape[-1])
        step = max(1, flat.shape[0]) if self.rows is None else self.rows
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            yield rows, flat[rows].to(self.dtype)

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """``(...)`` KL(p || softmax(logits)) in one piece, differentiable in ``logits``."""
        z = logits.reshape(self.p.shape).to(self.dtype)
        return kl_from_logits(self.p, self.neg_entropy, z).view(self.shape)

    @torch.no_grad()
    def ce_and_kl(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(...)`` cross-entropy of the targets and KL(p || q) for the logits of q, by blocks."""
        if self.targets is None:
            raise ValueError("ce_and_kl needs the targets; this distribution was built without.")
        ce, kl = torch.empty_like(self.neg_entropy), torch.empty_like(self.neg_entropy)
        for rows, z in self._blocks(logits):
            ce[rows] = z.logsumexp(-1) - z.gather(-1, self.targets[rows]).squeeze(-1)
            kl[rows] = kl_from_logits(self.p[rows], self.neg_entropy[rows], z)
        return ce.view(self.shape), kl.view(self.shape)
