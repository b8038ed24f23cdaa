r"""Evaluation metrics, each stated as a formula, accumulated in float64 over an evaluation set.

* FVU at layer l (``fvu``, ours, Gao et al.'s normalised MSE):
  :math:`\sum_t \|x_t - \hat x_t\|^2 / \sum_t \|x_t - \bar x\|^2`, with :math:`\bar x` the
  per-dimension mean over the evaluation tokens. Reported per layer and as the unweighted mean
  over layers. ``space`` says whether x is the raw residual or its lens transform.
* ``fvu_paper``, the original code's FVU (tim-lawson/mlsae, ``mlsae/metrics/layerwise_fvu.py``,
  ``LayerwiseFVU``): per evaluation batch b, the mean squared error over every entry of the
  layer's ``(token, d)`` block, :math:`m_b = \mathrm{mean}_{t,j} (x_{tj} - \hat x_{tj})^2`, and
  the unbiased variance of all those entries around *one scalar* mean,
  :math:`v_b = \mathrm{var}_{t,j}(x_{tj})`; FVU = :math:`\sum_b m_b / \sum_b v_b`. The
  original compares de-standardised reconstructions with its inputs, so the space is the one
  the SAE reconstructs (raw, or lens space for a lens run; ``fvu_paper_raw`` is raw). Where the
  residual stream has large per-dimension offsets the scalar-mean variance is much larger than
  ours, so ``fvu_paper`` < ``fvu``. Our batches: 1024 test tokens (the original: one context).
* L0: mean number of nonzero latents per vector. L1: mean sum of latent activations per vector
  (the paper's Table 1 "L1 norm").
* delta CE at layer l: the output of block l at every non-special position is replaced by its
  reconstruction (mapped back through the inverse lens when there is one), the model runs on from
  block l + 1, and the clean next-token cross-entropy is subtracted; mean over the predictions
  made at replaced (non-special) positions.
* KL at layer l: :math:`KL(p_{clean} \| p_{patched})` per predicted token, averaged over tokens
  (the original code summed over positions, NOTES.md defect 7).
* MMCS: for dictionaries A and B, the mean over latents of A of the max cosine similarity with any
  latent of B (every latent of B, not only lower-index ones: defect 7). With B = A, self-pairs are
  excluded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from mlsae import bootstrap
from mlsae.activations import residual_stream, special_mask, take_tokens
from mlsae.models import special_token_ids
from mlsae.sae import MLSAE


class ReconstructionStats:
    """Streaming per-layer FVU, L0, L1 and latent-firing statistics, in float64.

    Feed batches with `update(x, recons, values)`, shapes ``(layer, token, d)`` and
    ``(layer, token, k)``; read the results with `compute()`.
    """

    def __init__(self, n_layers: int, d_model: int, n_latents: int):
        f64 = torch.float64
        self.batch_mse = torch.zeros(n_layers, dtype=f64)  # sum over batches (fvu_paper)
        self.batch_var = torch.zeros(n_layers, dtype=f64)
        self.groups: list[tuple[torch.Tensor, ...]] = []  # per-context sums (bootstrap)
        self.n = torch.zeros(n_layers, dtype=f64)
        self.sum_x = torch.zeros(n_layers, d_model, dtype=f64)
        self.sum_x2 = torch.zeros(n_layers, dtype=f64)
        self.sse = torch.zeros(n_layers, dtype=f64)
        self.l0 = torch.zeros(n_layers, dtype=f64)
        self.l1 = torch.zeros(n_layers, dtype=f64)
        self.fired = torch.zeros(n_layers, n_latents, dtype=torch.bool)

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        recons: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: x and recons `(layer, token, d)`, values and indices `(layer, token, k)`.

        ``groups`` ``(token,)``: each token's context, for `fvu_replicates`.
        """
        x, recons, values = x.double().cpu(), recons.double().cpu(), values.double().cpu()
        err = (x - recons).pow(2)
        self.n += x.shape[1]
        self.sum_x += x.sum(1)
        self.sum_x2 += x.pow(2).sum((1, 2))
        self.sse += err.sum((1, 2))
        self.batch_mse += err.mean((1, 2))
        self.batch_var += x.flatten(1).var(1)
        if groups is not None:
            ids, inverse = torch.unique(groups.cpu(), return_inverse=True)
            per = [
                torch.zeros(len(ids), *shape, dtype=torch.float64).index_add_(0, inverse, v)
                for shape, v in (
                    ((x.shape[0],), err.sum(2).T),
                    ((x.shape[0],), x.pow(2).sum(2).T),
                    ((x.shape[0], x.shape[2]), x.transpose(0, 1)),
                    ((), torch.ones(x.shape[1], dtype=torch.float64)),
                )
            ]
            self.groups.append((ids, *per))
        self.l0 += (values > 0).sum((1, 2)).double()
        self.l1 += values.sum((1, 2))
        if indices is not None:
            active = (values > 0).cpu()
            for layer in range(x.shape[0]):
                self.fired[layer, indices[layer].cpu()[active[layer]]] = True

    def compute(self) -> dict[str, list[float]]:
        """Per-layer ``fvu``, ``l0``, ``l1`` and ``inactive_fraction`` (never fired at a layer)."""
        total = self.sum_x2 - self.sum_x.pow(2).sum(-1) / self.n
        return {
            "fvu": (self.sse / total).tolist(),
            "fvu_paper": (self.batch_mse / self.batch_var).tolist(),
            "l0": (self.l0 / self.n).tolist(),
            "l1": (self.l1 / self.n).tolist(),
            "inactive_fraction": (1 - self.fired.double().mean(-1)).tolist(),
        }

    def group_sums(self) -> tuple[torch.Tensor, ...] | None:
        """Per-context ``(sse, sum ||x||^2, sum x, n)`` for `mlsae.bootstrap.fvu_replicates`."""
        if not self.groups:
            return None
        ids = torch.cat([g[0] for g in self.groups])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        out = []
        for j in range(1, 5):
            parts = torch.cat([g[j] for g in self.groups])
            out.append(
                torch.zeros(len(uniq), *parts.shape[1:], dtype=torch.float64).index_add_(
                    0, inverse, parts
                )
            )
        return tuple(out)


def kl_from_logits(p: torch.Tensor, neg_entropy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``KL(p || softmax(z))`` per row: ``sum p log p + logsumexp(z) - p . z``.

    ``neg_entropy`` is ``sum p log p``, computed once per ``p``. One pass over the vocabulary
    instead of forming ``log softmax(z)``; its gradient in z is ``softmax(z) - p``.
    """
    return neg_entropy + z.logsumexp(-1) - (p * z).sum(-1)


class NextTokenDistribution:
    """The clean next-token distribution p of a token batch, for CE and KL(p || q) of patched runs.

    With z the patched logits and lse(z) = log sum_v exp(z_v):
    CE = lse(z) - z[next token] and KL(p || q) = sum_v p_v log p_v - p . z + lse(z), so each
    patched run costs one float64 logsumexp and one dot product per position (no log-softmax of
    the patched logits, no exp of the clean ones). Computed in float64, a block of positions at a
    time (a whole batch of vocabulary-sized float64 rows is ~1 GB of memory traffic per step).
    """

    rows = 64  # positions per block

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor):
        z = logits[:, :-1]
        self.shape = z.shape[:-1]
        self.targets = tokens[:, 1:].reshape(-1, 1).to(z.device)
        self.p = torch.empty(z.shape, dtype=torch.float64, device=z.device).view(-1, z.shape[-1])
        self.neg_entropy = torch.empty(self.p.shape[0], dtype=torch.float64, device=z.device)
        self.ce = torch.empty_like(self.neg_entropy)
        for rows, zc in self._blocks(z):
            logp = zc.log_softmax(-1)
            self.p[rows] = logp.exp()
            self.neg_entropy[rows] = (self.p[rows] * logp).sum(-1)
            self.ce[rows] = -logp.gather(-1, self.targets[rows]).squeeze(-1)
        self.ce = self.ce.view(self.shape)

    def _blocks(self, z: torch.Tensor):
        flat = z.reshape(-1, z.shape[-1])
        for start in range(0, flat.shape[0], self.rows):
            rows = slice(start, start + self.rows)
            yield rows, flat[rows].double()

    def ce_and_kl(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, pos - 1)`` cross-entropy and KL(clean || patched) for patched ``logits``."""
        ce, kl = torch.empty_like(self.neg_entropy), torch.empty_like(self.neg_entropy)
        for rows, z in self._blocks(logits[:, :-1]):
            ce[rows] = z.logsumexp(-1) - z.gather(-1, self.targets[rows]).squeeze(-1)
            kl[rows] = kl_from_logits(self.p[rows], self.neg_entropy[rows], z)
        return ce.view(self.shape), kl.view(self.shape)


@torch.no_grad()
def patched_logits(model: HookedTransformer, resid: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits when ``resid`` ``(batch, pos, d)`` is the output of block ``layer``.

    Runs only blocks ``layer + 1 ..`` (and the final norm and unembedding), not the whole model.
    """
    return model(resid, start_at_layer=layer + 1)


Reconstructor = Callable[[torch.Tensor, int], torch.Tensor]
"""Maps ``(token, d)`` raw residual vectors of one layer to their raw-space reconstruction."""


@torch.no_grad()
def delta_ce_kl(
    model: HookedTransformer,
    tokens: torch.Tensor,
    reconstruct: Reconstructor,
    layers: Iterable[int] | None = None,
    resid: torch.Tensor | None = None,
    bf16: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-layer sums of delta CE and KL over one token batch, and the number of predictions.

    With ``bf16`` the clean and patched forwards (the blocks after the replaced layer, the final
    norm and the unembedding) run under bfloat16 autocast; CE and KL are still taken in float64
    from their logits. On SmolLM2 (r8-k32, 1,016 predictions) this moved the per-layer delta CE
    by at most 0.009 nats and its mean over layers by 0.0002, well inside the bootstrap standard
    error (~0.06), for ~1.6x less time on a bf16-capable CPU.

    Args:
        model: the language model.
        tokens: ``(batch, pos)`` token ids.
        reconstruct: raw-space reconstruction of one layer's vectors (lens inverse included).
        layers: layers to patch (default all).
        resid: ``(layer, batch, pos, d)`` residuals of ``tokens`` if already computed.
        bf16: run the forwards under bfloat16 autocast (see above).

    Returns:
        float64 sums: ``{"delta_ce": (layer,), "kl": (layer,), "n": ()}``, and the same per
        context (row of ``tokens``): ``"delta_ce_rows"``, ``"kl_rows"`` ``(layer, batch)`` and
        ``"n_rows"`` ``(batch,)``.
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    tokens = tokens.to(model.cfg.device)
    if resid is None:
        resid = residual_stream(model, tokens)
    device_type = torch.device(model.cfg.device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)
    # The clean logits are the final norm and unembedding of the last block's output.
    with autocast:
        clean = NextTokenDistribution(patched_logits(model, resid[-1], n_layers - 1), tokens)
    keep = ~special_mask(tokens, special_token_ids(model))
    d_ce = torch.zeros(n_layers, tokens.shape[0], dtype=torch.float64)
    kl = torch.zeros(n_layers, tokens.shape[0], dtype=torch.float64)
    # Predictions made at special positions (BOS, EOS) are left out of the mean: those
    # positions are not replaced, and at BOS the prediction cannot change at all.
    scored = keep[:, :-1]
    for layer in layers:
        patched = resid[layer].clone()
        patched[keep] = reconstruct(resid[layer][keep], layer).to(patched.dtype)
        with autocast:
            logits = patched_logits(model, patched, layer)
        ce, kl_tok = clean.ce_and_kl(logits)
        d_ce[layer] = torch.where(scored, ce - clean.ce, 0).sum(-1).cpu()
        kl[layer] = torch.where(scored, kl_tok, 0).sum(-1).cpu()
    n_rows = scored.sum(-1).double().cpu()
    return {
        "delta_ce": d_ce.sum(1),
        "kl": kl.sum(1),
        "n": n_rows.sum(),
        "delta_ce_rows": d_ce,
        "kl_rows": kl,
        "n_rows": n_rows,
    }


def mmcs(dict_a: torch.Tensor, dict_b: torch.Tensor | None = None, chunk: int = 4096) -> float:
    """Mean max cosine similarity of the rows of ``dict_a`` ``(n_a, d)`` with those of ``dict_b``.

    With ``dict_b`` None, ``dict_a`` is compared with itself, excluding each latent's self-pair.
    """
    a = F.normalize(dict_a.detach().float(), dim=-1)
    b = a if dict_b is None else F.normalize(dict_b.detach().float(), dim=-1)
    maxes = []
    for start in range(0, a.shape[0], chunk):
        sims = a[start : start + chunk] @ b.T
        if dict_b is None:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = float("-inf")
        maxes.append(sims.max(-1).values)
    return torch.cat(maxes).mean().item()


@torch.no_grad()
def evaluate(
    sae: MLSAE,
    model: HookedTransformer,
    token_batches: Iterable[torch.Tensor],
    lens=None,
    ce_batches: int | None = None,
    layers: list[int] | None = None,
    vectors: Iterable[torch.Tensor] | None = None,
    latent_stats=None,
    vector_contexts: torch.Tensor | None = None,
    n_boot: int = 1000,
    ce_bf16: bool = False,
) -> dict:
    """Evaluate an SAE on held-out data; per-layer metrics and their mean over layers.

    Args:
        sae: the SAE (trained on lens-space vectors when ``lens`` is given).
        model: the language model.
        token_batches: ``(batch, pos)`` token batches of held-out text.
        lens: a `mlsae.lens.TunedLens` or None. With a lens, ``fvu`` is in lens space (the space
            the SAE reconstructs) and ``fvu_raw`` in the raw residual space.
        ce_batches: compute delta CE and KL on the first this-many batches (all if None).
        layers: model layers the SAE was trained on (default all); for a single-layer SAE, one.
        vectors: raw residual batches ``(len(layers), token, d)`` for FVU, L0 and L1, e.g. from
            the test activation cache. Then the model runs only on the delta-CE batches; without
            it, FVU, L0 and L1 come from the residuals of every token batch.
        latent_stats: a `mlsae.latents.LayerStats` to feed with the same activations.
        vector_contexts: ``(token,)`` context index of each token of ``vectors`` (in order);
            with it FVU gets a standard error (``fvu_se``) by bootstrap over contexts. delta CE
            and KL always get one (``delta_ce_se``, ``kl_se``), over the contexts of
            ``token_batches`` (`mlsae.bootstrap`).
        n_boot: bootstrap replicates for the standard errors.
        ce_bf16: run the delta-CE forwards under bfloat16 autocast (`delta_ce_kl`).

    Returns:
        ``{"per_layer": {metric: [value per layer]}, "mean": {metric: value}, "layers": [...],
        "n_tokens": int, "n_ce_tokens": int}``.
    """
    sae.eval()
    device = next(sae.parameters()).device
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    specials = special_token_ids(model)
    stats = ReconstructionStats(len(layers), sae.d_model, sae.n_latents)
    raw_stats = ReconstructionStats(len(layers), sae.d_model, sae.n_latents) if lens else None
    ce_rows, kl_rows, n_rows = [], [], []  # per context: (layer,), (layer,), ()
    seen = 0

    def to_space(x: torch.Tensor, layer: int) -> torch.Tensor:
        return lens.transform(x, layer) if lens is not None else x

    def from_space(x: torch.Tensor, layer: int) -> torch.Tensor:
        return lens.invert(x, layer) if lens is not None else x

    def reconstruct(x: torch.Tensor, layer: int) -> torch.Tensor:
        return from_space(sae(to_space(x.to(device), layer)).recons, layer).to(x.dtype)

    def add(x_raw: torch.Tensor, groups: torch.Tensor | None = None) -> None:  # (layer, token, d)
        x_raw = x_raw.to(device)
        x = torch.stack([to_space(x_raw[j], layer) for j, layer in enumerate(layers)])
        out = sae(x)
        stats.update(x, out.recons, out.values, out.indices, groups)
        if raw_stats is not None:
            raw = torch.stack([from_space(out.recons[j], ly) for j, ly in enumerate(layers)])
            raw_stats.update(x_raw, raw, out.values, groups=groups)
        if latent_stats is not None:
            latent_stats.update(out.values, out.indices)

    for x_raw in vectors if vectors is not None else ():
        n = x_raw.shape[1]
        add(x_raw, None if vector_contexts is None else vector_contexts[seen : seen + n])
        seen += n
    if vectors is not None and ce_batches is not None:
        token_batches = itertools.islice(token_batches, ce_batches)  # read no batch past them
    for i, tokens in enumerate(token_batches):
        with_ce = ce_batches is None or i < ce_batches
        resid = residual_stream(model, tokens)  # (layer, batch, pos, d)
        if vectors is None:
            add(resid[layers][:, ~special_mask(tokens.to(resid.device), specials)])
        if with_ce:
            res = delta_ce_kl(model, tokens, reconstruct, layers, resid, bf16=ce_bf16)
            ce_rows += list(res["delta_ce_rows"][layers].T)
            kl_rows += list(res["kl_rows"][layers].T)
            n_rows += list(res["n_rows"])

    per_layer = stats.compute()
    if raw_stats is not None:
        raw = raw_stats.compute()
        per_layer["fvu_raw"], per_layer["fvu_paper_raw"] = raw["fvu"], raw["fvu_paper"]
    n_ce = float(sum(n_rows))
    if n_ce:
        per_layer["delta_ce"] = (torch.stack(ce_rows).sum(0) / n_ce).tolist()
        per_layer["kl"] = (torch.stack(kl_rows).sum(0) / n_ce).tolist()
    per_layer["dead_fraction_train"] = [sae.dead_fraction()] * len(layers)
    mean = {k: sum(v) / len(v) for k, v in per_layer.items()}
    # standard errors by bootstrap over contexts (mlsae.bootstrap)
    if len(n_rows) > 1:
        w = bootstrap.weights(len(n_rows), n_boot)
        counts = torch.stack(n_rows)
        for key, rows in (("delta_ce", ce_rows), ("kl", kl_rows)):
            reps = bootstrap.mean_replicates(torch.stack(rows), counts, w)
            per_layer[f"{key}_se"], mean[f"{key}_se"] = bootstrap.standard_errors(reps)
    for key, acc in (("fvu", stats), ("fvu_raw", raw_stats)):
        sums = acc.group_sums() if acc is not None else None
        if sums is not None and len(sums[3]) > 1:
            reps = bootstrap.fvu_replicates(*sums, bootstrap.weights(len(sums[3]), n_boot))
            per_layer[f"{key}_se"], mean[f"{key}_se"] = bootstrap.standard_errors(reps)
    mean["inactive_fraction_all_layers"] = stats.fired.any(0).logical_not().double().mean().item()
    return {
        "layers": layers,
        "per_layer": per_layer,
        "mean": mean,
        "n_tokens": int(stats.n[0].item()),
        "n_ce_tokens": int(n_ce),
        "n_ce_contexts": len(n_rows),
        "n_fvu_contexts": len(stats.group_sums()[3]) if stats.groups else None,
        "uncertainty": f"standard errors: bootstrap over contexts, {n_boot} replicates",
        "space": "lens" if lens is not None else "raw",
    }


@torch.no_grad()
def residual_drift(cache, max_tokens: int) -> dict[str, list[float]]:
    """Adjacent-layer similarity and norms of residual vectors (the paper's Figure 1).

    For each pair (l, l + 1) of block outputs: the mean over tokens of the cosine similarity of a
    token's two vectors, raw and after subtracting each layer's mean vector; and per layer the mean
    L2 norm. Computed over the first ``max_tokens`` tokens of ``cache``.
    """
    batches = take_tokens(cache.iter_batches(1024), max_tokens)
    x = torch.cat([b.double() for b in batches], dim=1)  # (layer, token, d)
    centred = x - x.mean(dim=1, keepdim=True)
    cos = F.cosine_similarity(x[:-1], x[1:], dim=-1).mean(-1)
    cos_c = F.cosine_similarity(centred[:-1], centred[1:], dim=-1).mean(-1)
    return {
        "cosine": cos.tolist(),
        "cosine_centred": cos_c.tolist(),
        "norm": x.norm(dim=-1).mean(-1).tolist(),
        "n_tokens": [float(x.shape[1])],
    }
