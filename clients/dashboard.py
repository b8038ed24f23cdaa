"""sae-dashboard on our per-layer SAELens views of an MLSAE, offline (run in .venv-dashboard).

Runs in the environment `make clients` builds (sae-dashboard 0.8 with its own pins:
transformer-lens 2, transformers < 4.57), not the main one. What it needs from the main
pipeline, all on disk:

* the views: ``python -m mlsae export-layers r8-k32`` (``cache/saelens/r8-k32/layer_<L>``);
* SmolLM2 as de-quantized by the main environment's first model load (``$MLSAE_CACHE``,
  ``smollm2-135m-hf``): built here into TransformerLens's ``HookedSAETransformer`` with the same
  hand-made config and Llama weight conversion as `mlsae.models` (imported from this repo);
* held-out Brown contexts: the test activation cache's ``contexts.npy`` (stage ``build_cache``).

Which latents (`chosen_latents`): for each layer, the ``--per-layer`` latents with the largest
activation mass at that layer in the run's held-out latent statistics
(``cache/latent_stats/<run>.pt``) among those active on at most 5% of its tokens. Writes
``<out>/layer_<L>.html`` (sae-dashboard's feature-centric page) and ``<out>/latents.json``.

Workarounds, each the smallest we found:

* SAELens 6 refuses ``fold_W_dec_norm`` on a TopK SAE without ``rescale_acts_by_decoder_norm``
  and sae-dashboard calls it unconditionally; our export now declares the flag (exact for
  unit-norm decoders, `mlsae.saelens`), so nothing is patched here.
* sae-dashboard has no offline model loading; the model object is built here and passed in.
* its pages load d3 and plotly from CDNs, which offline browsers cannot reach: `offline_page`
  inlines the same libraries from their npm packages (`mlsae.dvcplots.library`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from offline_model import smollm2_hooked_sae_transformer, transformers4_tokenizer

__all__ = [
    "chosen_latents",
    "offline_page",
    "smollm2_hooked_sae_transformer",
    "transformers4_tokenizer",
]


CDN_SCRIPTS = {
    "https://d3js.org/d3.v6.min.js": "d3@6.7.0",
    "https://cdn.plot.ly/plotly-latest.min.js": "plotly.js-dist-min@1.58.5",
}


def offline_page(path: Path) -> None:
    """Replace the page's CDN ``<script src>`` tags by the libraries' code, inline."""
    from mlsae.dvcplots import library

    html = path.read_text()
    for url, spec in CDN_SCRIPTS.items():
        tag = f'<script src="{url}"'
        start = html.find(tag)
        if start < 0:
            continue
        end = html.index("</script>", start) + len("</script>")
        code = library(spec).replace("</script", "<\\/script")
        html = html[:start] + f"<script>/* {spec} */\n{code}\n</script>" + html[end:]
    missing = [u for u in CDN_SCRIPTS if u in html]
    if missing:
        raise RuntimeError(f"{path}: still loads {missing} from the network")
    path.write_text(html)


def chosen_latents(
    stats_file: Path, layers: list[int], per_layer: int, max_density: float = 0.05
) -> dict[int, list[int]]:
    """At each layer, the ``per_layer`` latents with the largest activation mass there.

    Among those active on at most ``max_density`` of the held-out tokens at that layer (the
    densest latents, active on most tokens, would otherwise fill every page).
    """
    state = torch.load(stats_file, weights_only=True)
    totals, density = state["totals"], state["counts"] / max(state["n_tokens"], 1)
    out = {}
    for ly in layers:
        mass = torch.where(density[ly] <= max_density, totals[ly], float("-inf"))
        out[ly] = mass.topk(per_layer).indices.tolist()
    return out


def main(argv: list[str] | None = None) -> None:
    """Write the dashboards (module docstring)."""
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="r8-k32")
    p.add_argument("--cache", default="cache", help="the pipeline's cache_dir")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    p.add_argument("--per-layer", type=int, default=4)
    p.add_argument("--max-density", type=float, default=0.05)
    p.add_argument("--contexts", type=int, default=48, help="held-out contexts (x 256 tokens)")
    p.add_argument("--out", default="cache/dashboard")
    args = p.parse_args(argv)
    cache, out = Path(args.cache), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = torch.from_numpy(
        np.load(cache / "activations" / "test" / "contexts.npy").astype(np.int64)
    )[: args.contexts]
    latents = chosen_latents(
        cache / "latent_stats" / f"{args.run}.pt", args.layers, args.per_layer, args.max_density
    )
    (out / "latents.json").write_text(json.dumps({str(k): v for k, v in latents.items()}))
    model = smollm2_hooked_sae_transformer()
    for layer in args.layers:
        sae = SAE.load_from_disk(str(cache / "saelens" / args.run / f"layer_{layer}"))
        cfg = SaeVisConfig(
            hook_point=sae.cfg.metadata.hook_name,
            features=latents[layer],
            minibatch_size_features=len(latents[layer]),
            minibatch_size_tokens=16,
            device="cpu",
            dtype="float32",
        )
        data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
        save_feature_centric_vis(sae_vis_data=data, filename=str(out / f"layer_{layer}.html"))
        offline_page(out / f"layer_{layer}.html")
        print(f"layer {layer}: latents {latents[layer]} -> {out / f'layer_{layer}.html'}")


if __name__ == "__main__":
    main()
