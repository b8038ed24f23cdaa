r"""The multi-layer TopK sparse autoencoder (Lawson et al. 2025, section 3, eqs. 1-7).

One SAE is trained on the residual vectors of every layer; each (layer, token) vector is a
training example. With per-vector standardization :math:`s(x) = (x - \mu_x) / (\sigma_x + \epsilon)`
(mean and unbiased std over d_model, the convention of SAELens's ``layer_norm``):

.. math::

    h = \mathrm{ReLU}(\mathrm{TopK}(W_{enc} (s(x) - b_{pre})))          \quad (1)

    \hat{x} = \sigma_x (W_{dec} h + b_{pre}) + \mu_x                     \quad (2)

    \mathcal{L} = \mathrm{FVU}(x, \hat{x}) + \alpha\,\mathrm{AuxK}       \quad (7)

``b_pre`` is one tied bias, initialised and used in the standardized space (the original code
initialised it on raw activations, NOTES.md defect 5). There is no encoder bias. The decoder is
initialised as the encoder's transpose with unit-norm latents and kept unit-norm.

AuxK (Gao et al. 2024, A.2; eqs. 4-6): the ``k_aux`` largest pre-activations among *dead* latents
reconstruct the main model's error :math:`e = s(x) - (W_{dec} h + b_{pre})`; target and
reconstruction are both in the standardized space (defect 4 mixed spaces). As in Gao et al.'s
reference code, the error reconstruction :math:`\hat e = W_{dec} h_{dead}` carries no bias (``e``
has the bias subtracted out already), the target is detached, and the squared error is normalised
by the variance of ``e`` over the batch so ``alpha = 1/32`` has the scale the paper assumes.

A latent is dead when it has not fired (been among the top-k with a positive value) at any layer
for ``dead_tokens`` tokens;
the counter advances by the number of *tokens* in a batch, whatever the number of layers
(defect 3 counted micro-batches).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mlsae.sparse import GatherDot, topk_rows

EPS = 1e-5


class ForwardOutput(NamedTuple):
    """What `MLSAE.forward` returns; leading shape ``(...)`` is the input's without d_model."""

    recons: torch.Tensor
    """``(..., d_model)`` reconstruction in the input space."""
    values: torch.Tensor
    """``(..., k)`` latent activations of the top-k (after ReLU; may contain zeros)."""
    indices: torch.Tensor
    """``(..., k)`` latent indices of the top-k."""
    fvu: torch.Tensor
    """Scalar FVU in the input space, per layer then averaged over layers (the loss term)."""
    auxk_loss: torch.Tensor
    """Scalar normalised AuxK loss (0 when no latent is dead)."""
    loss: torch.Tensor
    """``fvu + aux_coef * auxk_loss``."""


def nearest_power_of_2(x: float) -> int:
    """The power of 2 nearest to ``x`` (ties go down)."""
    lo = 2 ** math.floor(math.log2(x))
    return lo if x - lo <= 2 * lo - x else 2 * lo


def standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vector standardization over the last dim: ``((x - mu) / (std + eps), mu, std)``."""
    mu = x.mean(dim=-1, keepdim=True)
    centred = x - mu
    # unbiased std as a norm: ~30x faster than Tensor.std on CPU, equal to ~1e-7 relative
    std = torch.linalg.vector_norm(centred, dim=-1, keepdim=True) / math.sqrt(x.shape[-1] - 1)
    return centred / (std + EPS), mu, std


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, averaged over layers.

    For ``(token, d)``: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, the mean taken per
    dimension over the tokens. For ``(layer, token, d)``: that FVU per layer, then the unweighted
    mean over layers, so every layer counts equally whatever its variance (pooling the layers
    would weight each by its variance, the MSE behaviour the paper chose FVU to avoid).
    """
    x3 = x.reshape(-1, *x.shape[-2:])  # (layer, token, d)
    err = (x3 - x_hat.reshape(x3.shape)).pow(2).sum((1, 2))
    total = (x3 - x3.mean(dim=1, keepdim=True)).pow(2).sum((1, 2))
    return (err / total.clamp_min(torch.finfo(x.dtype).tiny)).mean()


def geometric_median(points: torch.Tensor, n_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm for the geometric median of ``(n, d)`` points."""
    median = points.mean(dim=0)
    for _ in range(n_iter):
        dist = (points - median).norm(dim=-1).clamp_min(1e-8)
        weights = 1 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < tol * median.norm().clamp_min(1.0):
            return new
        median = new
    return median


class MLSAE(nn.Module):
    """Multi-layer TopK SAE.

    Args:
        d_model: width of the residual stream ``d``.
        n_latents: number of latents ``n`` (expansion factor ``R = n / d``).
        k: latents kept per vector.
        k_aux: dead latents used by AuxK; default the power of 2 nearest ``d_model / 2``.
        aux_coef: AuxK coefficient ``alpha`` (paper: 1/32).
        dead_tokens: tokens without firing after which a latent is dead (paper: 10M).
        standardize: standardize each vector before the encoder (paper: yes).
        select_bf16: in training, compute the encoder matmul in bfloat16 (several times faster on
            CPUs with bf16 units and on GPUs), as bf16 autocast would; the chosen values carry
            bf16 rounding (relative ~4e-3) and near-ties at the k-th place may resolve
            differently. Gradients are exact; evaluation (eval mode) is always float32.
    """

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        k_aux: int | None = None,
        aux_coef: float = 1 / 32,
        dead_tokens: int = 10_000_000,
        standardize: bool = True,
        select_bf16: bool = False,
    ):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents={n_latents}], got k={k}.")
        k_aux = nearest_power_of_2(d_model / 2) if k_aux is None else k_aux
        if not 0 < k_aux <= n_latents:
            raise ValueError(f"k_aux must be in [1, n_latents={n_latents}], got k_aux={k_aux}.")
        self.d_model, self.n_latents, self.k, self.k_aux = d_model, n_latents, k, k_aux
        self.aux_coef, self.dead_tokens, self.standardize = aux_coef, dead_tokens, standardize
        self.select_bf16 = select_bf16

        weight = torch.randn(n_latents, d_model)
        weight /= weight.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(weight.clone())  # (n_latents, d_model)
        self.W_dec = nn.Parameter(weight.clone())  # (n_latents, d_model), unit-norm rows
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("b_pre_initialized", torch.tensor(False))

    def config(self) -> dict:
        """Constructor arguments, saved with checkpoints and exports."""
        return dict(
            d_model=self.d_model,
            n_latents=self.n_latents,
            k=self.k,
            k_aux=self.k_aux,
            aux_coef=self.aux_coef,
            dead_tokens=self.dead_tokens,
            standardize=self.standardize,
            select_bf16=self.select_bf16,
        )

    # -- pieces ---------------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (..., d)`` -> ``(s(x), mu, std)``; identity when not standardizing."""
        if self.standardize:
            return standardize(x)
        return x, torch.zeros_like(x[..., :1]), torch.ones_like(x[..., :1])

    def pre_activations(self, x_std: torch.Tensor) -> torch.Tensor:
        """``(..., n_latents)`` encoder pre-activations ``W_enc (s(x) - b_pre)``, float32."""
        return (x_std - self.b_pre) @ self.W_enc.T

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (..., d)`` -> ``(values, indices)``, each ``(..., k)``."""
        x_std, _, _ = self.preprocess(x)
        values, indices, _ = self._encode_centred((x_std - self.b_pre).reshape(-1, self.d_model))
        return values.reshape(*x.shape[:-1], self.k), indices.reshape(*x.shape[:-1], self.k)

    def _select(self, x_c: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``(vectors, n_latents)`` for choosing latents; no gradient.

        In bfloat16 when ``select_bf16`` and training; evaluation is always float32.
        """
        with torch.no_grad():
            if self.select_bf16 and self.training:
                return (x_c.bfloat16() @ self.W_enc.bfloat16().T).float()
            return x_c @ self.W_enc.T

    def _encode_centred(self, x_c: torch.Tensor):
        """``x_c = s(x) - b_pre`` ``(vectors, d)`` -> ``(values, indices, pre)``.

        The top-k is chosen without gradient; the chosen values then go through `GatherDot`, so
        their gradient reaches only the chosen encoder rows (and ``x_c``).
        """
        pre = self._select(x_c)
        top, indices = topk_rows(pre, self.k)
        values = GatherDot.apply(x_c, self.W_enc, indices, top)
        return values.relu(), indices, pre

    def decode_std(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse decode in the standardized space: ``W_dec h + b_pre``, shape ``(..., d)``.

        Gathers the k selected decoder rows with ``embedding_bag``; never forms a dense
        ``(vectors, n_latents)`` tensor.
        """
        lead = indices.shape[:-1]
        out = F.embedding_bag(
            indices.reshape(-1, indices.shape[-1]),
            self.W_dec,
            per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype),
            mode="sum",
        )
        return out.reshape(*lead, self.d_model) + self.b_pre

    def decode(
        self, values: torch.Tensor, indices: torch.Tensor, mu: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """Decode and undo the standardization: ``(..., d)`` in the input space."""
        out = self.decode_std(values, indices)
        return out * std + mu if self.standardize else out

    def dense_latents(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``(..., n_latents)`` dense latent vector (for analysis and tests, not training)."""
        dense = values.new_zeros(*values.shape[:-1], self.n_latents)
        return dense.scatter_(-1, indices, values)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Encode, decode and compute the loss.

        Args:
            x: ``(layer, token, d_model)`` for an MLSAE batch, or ``(token, d_model)``.
        """
        x_std, mu, std = self.preprocess(x)
        if self.training and not bool(self.b_pre_initialized):
            self.init_b_pre_(x_std)
        x_c = (x_std - self.b_pre).reshape(-1, self.d_model)  # (vectors, d)
        values, indices, pre = self._encode_centred(x_c)
        values = values.reshape(*x.shape[:-1], self.k)
        indices = indices.reshape(*x.shape[:-1], self.k)
        recons_std = self.decode_std(values, indices)
        # Undo as SAELens's layer_norm does (x * std + mu), so exports reproduce us exactly.
        recons = recons_std * std + mu if self.standardize else recons_std
        loss_fvu = fvu(x, recons)
        if self.training:
            # Dead-latent counters are advanced by the training loop once per optimizer step.
            error = (x_std - recons_std).detach()
            auxk = self.auxk_loss(x_c, pre, error)
        else:
            auxk = x.new_zeros(())
        return ForwardOutput(
            recons, values, indices, loss_fvu, auxk, loss_fvu + self.aux_coef * auxk
        )

    def auxk_loss(self, x_c: torch.Tensor, pre: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """Normalised AuxK: FVU of the error ``e`` reconstructed by the top dead latents.

        Args:
            x_c: ``(vectors, d)`` centred standardized inputs ``s(x) - b_pre``.
            pre: ``(vectors, n_latents)`` selection pre-activations (no gradient).
            error: ``(..., d)`` main reconstruction error in the standardized space, detached.
        """
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x_c.new_zeros(())
        k_aux = min(self.k_aux, n_dead)
        with torch.no_grad():
            top, indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        values = GatherDot.apply(x_c, self.W_enc, indices, top).relu()
        e_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return fvu(error, e_hat.reshape(error.shape))

    # -- dead latents ---------------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        """``(n_latents,)`` True where a latent has not fired for ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        """Fraction of latents currently dead."""
        return self.dead_mask().float().mean().item()

    @torch.no_grad()
    def fired_mask(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_latents,)`` True for latents in ``indices`` with a positive value.

        A top-k latent that the ReLU zeroes did not fire; without ``values`` every selected
        latent counts.
        """
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=indices.device)
        selected = indices if values is None else indices[values > 0]
        fired[selected.flatten()] = True
        return fired

    @torch.no_grad()
    def advance_dead_(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Advance every counter by ``n_tokens`` and reset those of the ``fired`` latents."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0

    def update_dead_(
        self, indices: torch.Tensor, n_tokens: int, values: torch.Tensor | None = None
    ) -> None:
        """`advance_dead_` with the latents that fired in ``indices``/``values``."""
        self.advance_dead_(self.fired_mask(indices, values), n_tokens)

    # -- initialisation and constraints -----------------------------------------------------------
    @torch.no_grad()
    def init_b_pre_(self, x_std: torch.Tensor, max_points: int = 8192) -> None:
        """Set ``b_pre`` to the geometric median of (a sample of) a standardized batch."""
        points = x_std.reshape(-1, self.d_model).float()
        if points.shape[0] > max_points:
            gen = torch.Generator(device="cpu").manual_seed(0)
            points = points[torch.randperm(points.shape[0], generator=gen)[:max_points]]
        self.b_pre.copy_(geometric_median(points).to(self.b_pre.dtype))
        self.b_pre_initialized.fill_(True)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from each decoder row's gradient its component along that (unit) row."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.data
        parallel = (self.W_dec.grad * w).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * w)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-12)
