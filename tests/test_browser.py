import shutil
import subprocess

import numpy as np
import pytest
import torch

from mlsae.browser import browser_data, choose_latents, write_browser
from mlsae.latents import TopContexts

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=3000",
]


def make_page(tmp_path, tokenizer):
    words = "the cat sat on the mat and the dog went to the store".split()
    token_ids = np.array(tokenizer.convert_tokens_to_ids(words * 3))
    n_layers, n_latents = 3, 12
    top = TopContexts(n_layers, n_latents, n=2)
    values = torch.zeros(n_layers, len(token_ids), 1)
    indices = torch.zeros(n_layers, len(token_ids), 1, dtype=torch.long)
    values[1, 4, 0], indices[1, 4, 0] = 2.5, 7  # latent 7 fires on token 4 ("the") at layer 1
    values[2, 9, 0], indices[2, 9, 0] = 1.0, 7
    values[0, 2, 0], indices[0, 2, 0] = 0.5, 3
    top.update(values, indices, offset=0)
    counts = torch.zeros(n_layers, n_latents)
    counts[1, 7], counts[2, 7], counts[0, 3] = 5, 1, 1
    dist = counts / counts.sum(0).clamp_min(1)
    latents = choose_latents(counts, n_frequent=1, n_random=5)
    assert latents == [3, 7]
    data = browser_data(latents, dist, counts, top, token_ids, tokenizer, window=3)
    return write_browser(tmp_path / "browser.html", data, "Test browser", "tiny"), data


def test_browser_data(tmp_path, tokenizer):
    _, data = make_page(tmp_path, tokenizer)
    seven = next(entry for entry in data["latents"] if entry["id"] == 7)
    assert seven["count"] == 6 and seven["dist"][1] == pytest.approx(5 / 6, abs=1e-4)
    first = seven["contexts"][0]
    assert first["layer"] == 1 and first["value"] == 2.5
    assert data["vocab"][str(first["ids"][first["at"]])].strip() == "the"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by `make test`")
def test_browser_renders_and_search_finds_a_latent(tmp_path, tokenizer):
    page, _ = make_page(tmp_path, tokenizer)

    def dom(fragment: str) -> str:
        out = subprocess.run(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                f"file://{page}{fragment}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    found = dom("#latent=7")
    assert 'id="latent-title">Latent 7<' in found
    assert "<mark>" in found and "L1 2.5" in found
    assert "<svg" in found
    missing = dom("#latent=5")
    assert "latent 5 not in this browser" in missing
    shot = tmp_path / "browser.png"
    subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            f"--screenshot={shot}",
            "--window-size=1000,600",
            f"file://{page}#latent=7",
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 5000
