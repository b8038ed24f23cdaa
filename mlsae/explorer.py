"""A static explorer for every latent of an MLSAE: data in one streamed pass, sharded output.

`collect` makes one pass over the held-out activation cache and keeps, with memory bounded by
top-k selections (never latents x contexts):

* per (layer, latent): activation counts and sums (the layer profile, mean layer, entropy);
* per latent: a histogram of its nonzero activations over log-spaced bins;
* per latent: its ``n_top`` contexts of largest activation (each context once, at its peak token
  and layer), and per (latent, layer) its ``n_top_layer`` best contexts at that layer.

`details` then re-encodes only the residual vectors those contexts need: the latent's activation
on every token of each context window at its layer (for shading), and at every layer on the peak
token (the same-token trajectory). `write_explorer` writes ``index.html`` and ``data/*.js``: an
overview of every latent, the token stream and vocabulary, a token -> latents index, and the
per-latent pages in shards of `SHARD` latents loaded on demand as ``<script>`` files (browsers
block ``fetch`` of local files under ``file://``, not scripts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlsae.activations import ActivationCache, take_tokens
from mlsae.sae import MLSAE

SHARD = 256
"""Latents per data file."""
HIST_EDGES = np.geomspace(1e-2, 1e2, 33)
"""Bin edges of the activation histograms (values outside are clipped into the end bins)."""
LEVELS = "0123456789abcdefghijklmnopqrstuvwxyz"
"""Activation shading, quantised to one character (0 = none, z = the latent's largest)."""
PAGE = Path(__file__).with_name("explorer_page.html")


def top_per_group(
    group: torch.Tensor, item: torch.Tensor, value: torch.Tensor, payload: torch.Tensor, n: int
) -> tuple[torch.Tensor, ...]:
    """The ``n`` largest values per group, each item at most once (at its largest value).

    All arguments are 1-D and aligned; returns the kept ``(group, item, value, payload)`` sorted
    by group, then by value descending. Stable sorts make ties resolve the same way every run.
    """
    order = torch.argsort(value, descending=True, stable=True)
    group, item, value, payload = group[order], item[order], value[order], payload[order]
    key = group * (int(item.max()) + 1 if len(item) else 1) + item
    order = torch.argsort(key, stable=True)
    group, item, value, payload, key = (t[order] for t in (group, item, value, payload, key))
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    group, item, value, payload = group[first], item[first], value[first], payload[first]
    order = torch.argsort(value, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    group, item, value, payload = group[order], item[order], value[order], payload[order]
    _, counts = torch.unique_consecutive(group, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(group), device=group.device) - torch.repeat_interleave(starts, counts)
    keep = rank < n
    return group[keep], item[keep], value[keep], payload[keep]


@dataclass
class Collected:
    """What `collect` keeps: O(latents x (layers + bins + top)) numbers."""

    counts: torch.Tensor  # (layer, latent) activations
    totals: torch.Tensor  # (layer, latent) summed activations
    hist: torch.Tensor  # (latent, bins)
    top: tuple[torch.Tensor, ...]  # (latent, context, value, token * layers + layer)
    top_layer: tuple[torch.Tensor, ...]  # (latent * layers + layer, context, value, token)
    tokens: np.ndarray  # (token,) ids of the tokens read
    contexts: np.ndarray  # (token,) context id of each token
    n_tokens: int


@torch.no_grad()
def collect(
    sae: MLSAE,
    cache: ActivationCache,
    max_tokens: int,
    lens=None,
    n_top: int = 5,
    n_top_layer: int = 1,
    batch_tokens: int = 1024,
    device: str = "cpu",
) -> Collected:
    """One pass over ``cache`` (at most ``max_tokens`` tokens); see the module docstring."""
    n_layers, n_latents = cache.n_layers, sae.n_latents
    layers = list(range(n_layers))
    counts = torch.zeros(n_layers * n_latents, dtype=torch.float64, device=device)
    totals = torch.zeros_like(counts)
    bins = len(HIST_EDGES) - 1
    hist = torch.zeros(n_latents * bins, dtype=torch.float64, device=device)
    edges = torch.tensor(np.log(HIST_EDGES[1:-1]), dtype=torch.float32, device=device)
    context_ids = torch.as_tensor(cache.context_ids()).long()
    context_ids_device = context_ids.to(device)  # moved once, indexed every batch
    empty = tuple(torch.zeros(0, dtype=t, device=device) for t in (torch.long,) * 2)
    top = (*empty, torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device))
    top_layer = top
    seen = 0
    for x in take_tokens(cache.iter_batches(batch_tokens), max_tokens):
        x = x.to(device).float()
        if lens is not None:
            x = lens.transform_layers(x, layers)
        values, indices = sae.encode(x)  # (layer, token, k)
        n_tok = x.shape[1]
        layer = torch.arange(n_layers, device=device)[:, None, None].expand_as(indices)
        pos = (seen + torch.arange(n_tok, device=device))[None, :, None].expand_as(indices)
        live = values > 0
        v, lat, ly, p = values[live], indices[live], layer[live], pos[live]
        flat = ly * n_latents + lat
        counts.index_add_(0, flat, torch.ones_like(v, dtype=torch.float64))
        totals.index_add_(0, flat, v.double())
        b = torch.bucketize(v.log(), edges)
        hist.index_add_(0, lat * bins + b, torch.ones_like(v, dtype=torch.float64))
        ctx = context_ids_device[p]
        top = top_per_group(
            torch.cat([top[0], lat]),
            torch.cat([top[1], ctx]),
            torch.cat([top[2], v]),
            torch.cat([top[3], p * n_layers + ly]),
            n_top,
        )
        top_layer = top_per_group(
            torch.cat([top_layer[0], lat * n_layers + ly]),
            torch.cat([top_layer[1], ctx]),
            torch.cat([top_layer[2], v]),
            torch.cat([top_layer[3], p]),
            n_top_layer,
        )
        seen += n_tok
    tokens = np.concatenate([cache.tokens(i) for i in range(len(cache))])[:seen]
    return Collected(
        counts=counts.view(n_layers, n_latents).cpu(),
        totals=totals.view(n_layers, n_latents).cpu(),
        hist=hist.view(n_latents, bins).cpu(),
        top=tuple(t.cpu() for t in top),
        top_layer=tuple(t.cpu() for t in top_layer),
        tokens=tokens,
        contexts=context_ids.numpy()[:seen],
        n_tokens=seen,
    )


def _vectors(
    cache: ActivationCache, starts: np.ndarray, layer: np.ndarray, token: np.ndarray
) -> torch.Tensor:
    """Cached residuals at (layer, global token) pairs, ``(pairs, d)`` float32.

    ``starts``: the global position of each shard's first token (`_shard_starts`).
    """
    shard = np.searchsorted(starts, token, side="right") - 1
    out = np.zeros((len(token), cache.shard(0).shape[-1]), dtype=np.float32)
    for s in np.unique(shard):
        rows = np.flatnonzero(shard == s)
        out[rows] = cache.shard(int(s))[layer[rows], token[rows] - starts[s]]
    return torch.from_numpy(out)


def _shard_starts(cache: ActivationCache) -> np.ndarray:
    """Global position of the first token of each shard, and the total as the last entry."""
    return np.concatenate([[0], np.cumsum([cache.shard(i).shape[1] for i in range(len(cache))])])


@torch.no_grad()
def activations_at(
    sae: MLSAE,
    cache: ActivationCache,
    latent: np.ndarray,
    layer: np.ndarray,
    token: np.ndarray,
    lens=None,
    chunk: int = 4096,
    device: str = "cpu",
) -> np.ndarray:
    """The TopK activation of ``latent[i]`` at ``(layer[i], token[i])``, for every request i.

    Each distinct (layer, token) vector is read and encoded once (through the lens if given); a
    latent outside the vector's top k has activation 0.
    """
    pairs, where = np.unique(np.stack([layer, token], 1), axis=0, return_inverse=True)
    where = where.reshape(-1)
    # requests grouped by the chunk of their vector: one sort instead of a scan per chunk
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(0, len(pairs) + chunk, chunk))
    starts = _shard_starts(cache)
    out = np.zeros(len(latent), dtype=np.float32)
    for c, s in enumerate(range(0, len(pairs), chunk)):
        part = pairs[s : s + chunk]
        x = _vectors(cache, starts, part[:, 0], part[:, 1]).to(device)
        if lens is not None:  # the lens of each vector's layer, a layer at a time
            for ly in np.unique(part[:, 0]):
                rows = torch.from_numpy(np.flatnonzero(part[:, 0] == ly)).to(device)
                x[rows] = lens.transform(x[rows], int(ly))
        values, indices = sae.encode(x)  # (pairs, k)
        req = order[bounds[c] : bounds[c + 1]]
        rows = torch.from_numpy(where[req] - s).to(device)
        lat = torch.from_numpy(latent[req].astype(np.int64)).to(device)
        hit = indices[rows] == lat[:, None]
        out[req] = (values[rows] * hit).sum(-1).cpu().numpy()
    return out


def _window(pos: int, contexts: np.ndarray, width: int) -> tuple[int, int]:
    """Token range ``[start, stop)`` around ``pos`` within its context, ``width`` each side."""
    c = contexts[pos]
    start, stop = max(0, pos - width), min(len(contexts), pos + width + 1)
    while contexts[start] != c:
        start += 1
    while contexts[stop - 1] != c:
        stop -= 1
    return start, stop


@torch.no_grad()
def logit_effects(
    sae: MLSAE, model, lens=None, layers: np.ndarray | None = None, n: int = 8, chunk: int = 2048
) -> dict[str, np.ndarray]:
    """Top promoted and suppressed tokens of each decoder direction, ``(latent, n)`` token ids.

    ``last``: the direction unembedded as if at the last layer, ``W_U^T (g * d)`` with ``g`` the
    final norm's weight (the norm's scale ignored: a direction, not a vector). ``lens`` (for a
    run on raw residuals): at ``layers[i]`` for latent i, the direction first carried to the last
    layer's basis by the tuned lens's linear part, ``(I + W) d``. Also ``*_values``: the logit
    changes of those tokens per unit of the direction.
    """
    w_dec = sae.W_dec.detach().float()
    gain = getattr(model.ln_final, "w", None)
    gain = gain.detach().float() if gain is not None else torch.ones_like(w_dec[0])
    w_u = model.unembed.W_U.detach().float()  # (d, vocab)

    def top(directions):
        logits = (directions * gain) @ w_u
        up, down = logits.topk(n, -1), (-logits).topk(n, -1)
        return up.indices, up.values, down.indices, -down.values

    out: dict[str, list] = {}
    for s in range(0, len(w_dec), chunk):
        d = w_dec[s : s + chunk]
        parts = {"last": top(d)}
        if lens is not None and layers is not None:
            mapped = torch.empty_like(d)
            for ly in np.unique(layers[s : s + chunk]):
                rows = np.flatnonzero(layers[s : s + chunk] == ly)
                mapped[rows] = lens.transform(d[rows], int(ly)) - lens.transform(
                    torch.zeros_like(d[:1]), int(ly)
                )  # the linear part only: (I + W) d
            parts["lens"] = top(mapped)
        for name, (ui, uv, di, dv) in parts.items():
            for key, t in ((f"{name}_up", ui), (f"{name}_up_values", uv)):
                out.setdefault(key, []).append(t)
            for key, t in ((f"{name}_down", di), (f"{name}_down_values", dv)):
                out.setdefault(key, []).append(t)
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def similar_latents(sae: MLSAE, n: int = 8, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each latent's ``n`` nearest latents by decoder cosine similarity (itself excluded)."""
    w = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    ids, sims = [], []
    for s in range(0, len(w), chunk):
        c = w[s : s + chunk] @ w.T
        rows = torch.arange(len(c), device=c.device)
        c[rows, rows + s] = -2.0
        t = c.topk(n, -1)
        ids.append(t.indices)
        sims.append(t.values)
    return torch.cat(ids).cpu().numpy(), torch.cat(sims).cpu().numpy()


def _code(values: np.ndarray, scale: float) -> str:
    levels = np.clip(np.round(values / scale * (len(LEVELS) - 1)), 0, len(LEVELS) - 1)
    return "".join(LEVELS[int(v)] for v in levels)


def build(
    sae: MLSAE,
    cache: ActivationCache,
    model,
    max_tokens: int,
    lens=None,
    lens_for_logits=None,
    n_top: int = 5,
    n_top_layer: int = 1,
    width: int = 10,
    layer_width: int = 6,
    device: str = "cpu",
) -> dict:
    """Everything the explorer shows, as plain data (see `write_explorer`).

    ``lens``: the run's own lens (a lens run reads lens space); ``lens_for_logits``: a lens used
    only to carry decoder directions to the last layer's basis for the logit effects of a run on
    raw residuals.
    """
    col = collect(sae, cache, max_tokens, lens, n_top, n_top_layer, device=device)
    n_layers, n_latents = col.counts.shape
    counts, totals = col.counts.numpy(), col.totals.numpy()
    total = totals.sum(0)
    share = totals / np.where(total > 0, total, 1)
    mean_layer = (share * np.arange(n_layers)[:, None]).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(share > 0, share * np.log(share), 0.0), 0)
    fired_tokens = counts.sum(0)
    peak_layer = totals.argmax(0)

    # requests for the second pass: shading of every window at its layer, trajectories
    g, ctx, val, payload = (t.numpy() for t in col.top)
    tok, ly = payload // n_layers, payload % n_layers
    gl, _, vall, tokl = (t.numpy() for t in col.top_layer)
    lat_l, ly_l = gl // n_layers, gl % n_layers
    req_lat, req_ly, req_tok = [], [], []
    windows = []  # (latent, kind, layer, start, stop, peak token, value)
    for i in range(len(g)):
        start, stop = _window(int(tok[i]), col.contexts, width)
        windows.append((int(g[i]), "top", int(ly[i]), start, stop, int(tok[i]), float(val[i])))
    for i in range(len(gl)):
        start, stop = _window(int(tokl[i]), col.contexts, layer_width)
        windows.append(
            (int(lat_l[i]), "layer", int(ly_l[i]), start, stop, int(tokl[i]), float(vall[i]))
        )
    for lat, _, layer, start, stop, _, _ in windows:
        n = stop - start
        req_lat += [lat] * n
        req_ly += [layer] * n
        req_tok += list(range(start, stop))
    for i in range(len(g)):  # trajectory: every layer on the peak token
        req_lat += [int(g[i])] * n_layers
        req_ly += list(range(n_layers))
        req_tok += [int(tok[i])] * n_layers
    acts = activations_at(
        sae, cache, np.array(req_lat), np.array(req_ly), np.array(req_tok), lens, device=device
    )
    effects = (
        logit_effects(sae, model, lens_for_logits if lens is None else None, peak_layer)
        if model is not None
        else {}
    )
    sim_ids, sim_values = similar_latents(sae)

    max_act = np.zeros(n_latents, dtype=np.float32)
    np.maximum.at(max_act, g, val)
    pages: list[dict] = [{"top": [], "layers": [], "trajectory": []} for _ in range(n_latents)]
    cursor = 0
    for lat, kind, layer, start, stop, peak, value in windows:
        n = stop - start
        scale = max(float(max_act[lat]), 1e-9)
        entry = [
            start,
            stop - start,
            layer,
            peak - start,
            round(value, 3),
            _code(acts[cursor : cursor + n], scale),
        ]
        pages[lat]["top" if kind == "top" else "layers"].append(entry)
        cursor += n
    for i in range(len(g)):
        traj = acts[cursor : cursor + n_layers]
        pages[int(g[i])]["trajectory"].append([round(float(a), 3) for a in traj])
        cursor += n_layers
    token_index: dict[int, list] = {}
    for i in range(len(g)):
        token_index.setdefault(int(col.tokens[tok[i]]), []).append(
            [int(g[i]), round(float(val[i]), 3)]
        )
    for lat in range(n_latents):
        p = pages[lat]
        p["id"] = lat
        p["counts"] = counts[:, lat].astype(int).tolist()
        p["hist"] = col.hist[lat].numpy().astype(int).tolist()
        p["similar"] = [
            [int(a), round(float(b), 3)] for a, b in zip(sim_ids[lat], sim_values[lat], strict=True)
        ]
        for key in ("last", "lens"):
            if f"{key}_up" in effects:
                p[f"logits_{key}"] = {
                    "up": [
                        [int(t), round(float(v), 3)]
                        for t, v in zip(
                            effects[f"{key}_up"][lat], effects[f"{key}_up_values"][lat], strict=True
                        )
                    ],
                    "down": [
                        [int(t), round(float(v), 3)]
                        for t, v in zip(
                            effects[f"{key}_down"][lat],
                            effects[f"{key}_down_values"][lat],
                            strict=True,
                        )
                    ],
                }
    overview = [
        [
            lat,
            round(float(mean_layer[lat]), 2) if total[lat] > 0 else None,
            int(fired_tokens[lat]),
            round(float(entropy[lat]), 3),
            round(float(max_act[lat]), 3),
            int(peak_layer[lat]),
        ]
        for lat in range(n_latents)
    ]
    used = set(col.tokens.tolist())
    for p in pages:
        for key in ("logits_last", "logits_lens"):
            if key in p:
                used |= {t for t, _ in p[key]["up"] + p[key]["down"]}
    return {
        "n_layers": n_layers,
        "n_latents": n_latents,
        "n_tokens": col.n_tokens,
        "hist_edges": [float(e) for e in HIST_EDGES],
        "overview": overview,
        "pages": pages,
        "tokens": col.tokens.astype(int).tolist(),
        "contexts": col.contexts.astype(int).tolist(),
        "token_index": {t: sorted(v, key=lambda r: -r[1])[:30] for t, v in token_index.items()},
        "used_tokens": sorted(used),
    }


def _script(path: Path, call: str, *args) -> int:
    """``call(arg, ...);`` as a script file (JSON arguments); returns its size in bytes."""
    text = f"{call}({','.join(json.dumps(a, separators=(',', ':')) for a in args)});\n"
    path.write_text(text)
    return len(text.encode())


def write_explorer(folder: str | Path, data: dict, tokenizer, title: str, subtitle: str) -> dict:
    """Write ``folder/index.html`` and ``folder/data/*.js``; returns file count and bytes."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for old in (folder / "data").glob("*.js"):
        old.unlink()
    vocab = {int(t): tokenizer.convert_ids_to_tokens(int(t)) for t in data["used_tokens"]}
    vocab = {
        t: tokenizer.convert_tokens_to_string([s]) if s is not None else ""
        for t, s in vocab.items()
    }
    n_shards = math.ceil(data["n_latents"] / SHARD)
    meta = {
        "title": title,
        "subtitle": subtitle,
        "n_layers": data["n_layers"],
        "n_latents": data["n_latents"],
        "n_tokens": data["n_tokens"],
        "shard": SHARD,
        "n_shards": n_shards,
        "hist_edges": data["hist_edges"],
    }
    size = _script(folder / "data" / "meta.js", "EXPLORER.meta", meta)
    size += _script(folder / "data" / "overview.js", "EXPLORER.overview", data["overview"])
    size += _script(
        folder / "data" / "tokens.js",
        "EXPLORER.tokens",
        {
            "ids": data["tokens"],
            "contexts": data["contexts"],
            "vocab": vocab,
            "index": data["token_index"],
        },
    )
    for s in range(n_shards):
        size += _script(
            folder / "data" / f"shard_{s:04d}.js",
            "EXPLORER.shard",
            s,
            data["pages"][s * SHARD : (s + 1) * SHARD],
        )
    html = PAGE.read_text()
    (folder / "index.html").write_text(html)
    size += len(html.encode())
    return {"files": 4 + n_shards, "bytes": size}
