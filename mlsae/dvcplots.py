"""`dvc plots show` that renders offline.

DVC's HTML page loads vega, vega-lite and vega-embed from a CDN, which machines without internet
access cannot reach, so its data-series plots stay blank there. `offline_template` writes an HTML
template for ``dvc plots show --html-template`` with the same three libraries (the versions DVC's
page names) inlined, taken from their npm packages (``npm pack``; registries are reachable where
the rest of the network is not). ``make plots`` uses it.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

LIBRARIES = {  # npm package -> its browser build (the versions dvc-render's page loads)
    "vega@5.20.2": "package/build/vega.min.js",
    "vega-lite@5.2.0": "package/build/vega-lite.min.js",
    "vega-embed@6.18.2": "package/build/vega-embed.min.js",
    # what sae-dashboard's pages load from CDNs (d3 v6; plotly-latest is frozen at 1.58.5)
    "d3@6.7.0": "package/dist/d3.min.js",
    "plotly.js-dist-min@1.58.5": "package/plotly.min.js",
}


def _cache() -> Path:
    root = Path(os.environ.get("MLSAE_CACHE", Path.home() / ".cache" / "mlsae")) / "npm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def library(spec: str) -> str:
    """The minified browser build of an npm package ``name@version`` (downloaded once, cached)."""
    name, version = spec.rsplit("@", 1)
    tgz = _cache() / f"{name}-{version}.tgz"
    if not tgz.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                ["npm", "pack", spec, "--silent"], cwd=tmp, check=True, capture_output=True
            )
            (Path(tmp) / tgz.name).rename(tgz)
    with tarfile.open(tgz) as archive:
        return archive.extractfile(LIBRARIES[spec]).read().decode()


def offline_template(path: str | Path) -> Path:
    """Write the template (``{plot_divs}`` filled in by DVC; no ``{scripts}``: no CDN tags)."""
    scripts = "\n".join(f"<script>{library(spec)}</script>" for spec in LIBRARIES)
    page = (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        "<title>mlsae: dvc plots</title>\n"
        f"{scripts}\n<style>table {{ border-spacing: 15px; }} body {{ font-family: sans-serif; }}"
        "</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
