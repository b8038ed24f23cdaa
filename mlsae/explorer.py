"""A static explorer for every latent of an MLSAE: what each latent's page shows, as plain data.

`build` reads the held-out cache twice (`mlsae.explorer_scan`): one streamed pass keeps the
per-layer counts and sums, histograms and top contexts (`collect`), then only the residual
vectors those contexts need are re-encoded (`activations_at`): the latent's activation on every
token of each context window at its layer (for shading), and at every layer on the peak token
(the same-token trajectory). The mean layer and entropy of each latent's layer distribution are
`mlsae.latents.layer_distribution`'s, as in the latent analysis. Each page adds the decoder
direction's logit effects (`logit_effects`) and nearest latents (`similar_latents`).
`mlsae.explorer_site.write_explorer` writes the result as a static site.
"""

from __future__ import annotations

import numpy as np
import torch

from mlsae.activations import ActivationCache
from mlsae.explorer_scan import HIST_EDGES, activations_at, collect
from mlsae.latents import layer_distribution
from mlsae.sae import MLSAE

LEVELS = "0123456789abcdefghijklmnopqrstuvwxyz"
"""Activation shading, quantised to one character (0 = none, z = the latent's largest)."""


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
    """Everything the explorer shows, as plain data (`mlsae.explorer_site.write_explorer`).

    ``lens``: the run's own lens (a lens run reads lens space); ``lens_for_logits``: a lens used
    only to carry decoder directions to the last layer's basis for the logit effects of a run on
    raw residuals.
    """
    col = collect(sae, cache, max_tokens, lens, n_top, n_top_layer, device=device)
    n_layers, n_latents = col.counts.shape
    counts, totals = col.counts.numpy(), col.totals.numpy()
    dist = layer_distribution(col.totals)  # a never-fired latent: no mean layer, entropy 0
    fired = (dist["mass"] > 0).numpy()
    mean_layer, entropy = dist["mean_layer"].numpy(), dist["entropy"].numpy()
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
            round(float(mean_layer[lat]), 2) if fired[lat] else None,
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
