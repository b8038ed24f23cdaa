"""The explorer as a static site: ``index.html`` and ``data/*.js``, opened from disk.

`write_explorer` writes the data of `mlsae.explorer.build`: an overview of every latent, the token
stream and vocabulary, a token -> latents index, and the per-latent pages in shards of `SHARD`
latents loaded on demand as ``<script>`` files (browsers block ``fetch`` of local files under
``file://``, not scripts). The page itself is ``explorer_page.html``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SHARD = 256
"""Latents per data file."""
PAGE = Path(__file__).with_name("explorer_page.html")


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
