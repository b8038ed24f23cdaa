"""The latent explorer's data pass at the paper's scale, on a GPU.

What is measured
----------------
* A held-out cache of ``--tokens`` tokens (random ids, BOS first in each context) through a
  GPT-NeoX shaped like Pythia-70m with random weights (6 layers, d_model 512), written as an
  `ActivationCache` like stage 01's.
* An MLSAE with the paper's R = 64 (``--latents`` 32,768) and k = 32, random weights.
* `mlsae.explorer_scan.collect` (the one streamed pass: per-layer counts, histograms, top-k
  contexts) alone, then `mlsae.explorer.build` whole (that pass again, the targeted re-encoding
  for shading and trajectories, logit effects through the unembedding, similar latents) and
  `write_explorer`: seconds for each, peak GPU memory, and the data's size on disk.

The pass holds O(latents x (layers + bins + top contexts)) numbers, never latents x contexts: the
printed peak memory is that, plus one batch. ``--quick`` is a CPU-sized smoke run of the same code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from stream_step import pythia_shaped  # noqa: E402

from mlsae import explorer, explorer_scan, explorer_site  # noqa: E402
from mlsae.activations import ActivationCache  # noqa: E402
from mlsae.data import Context  # noqa: E402
from mlsae.sae import MLSAE  # noqa: E402


class NumberedTokens:
    """A stand-in tokenizer: token i is written ``<i>`` (random ids have no text)."""

    def convert_ids_to_tokens(self, i):
        return f"<{i}>"

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(device: str) -> float:
    """Peak GPU memory so far (GiB); NaN on a CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--tokens", type=int, default=200_000, help="held-out tokens")
    parser.add_argument("--latents", type=int, default=32_768)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.latents, args.context = 2048, 1024, 256
    torch.manual_seed(0)
    model = pythia_shaped(device=args.device)
    n_ctx = max(1, args.tokens // args.context)
    gen = torch.Generator().manual_seed(0)
    contexts = []
    for _ in range(n_ctx):
        tokens = torch.randint(4, model.cfg.d_vocab, (args.context,), generator=gen)
        tokens[0] = 0
        contexts.append(Context(tokens, torch.zeros(args.context, dtype=torch.long)))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        with torch.no_grad():
            cache = ActivationCache.build(Path(tmp) / "test", model, contexts, 8, progress=False)
        took = time.time() - start
        print(f"cache: {cache.n_tokens:,} tokens x {cache.n_layers} layers in {took:.1f} s")
        sae = MLSAE(model.cfg.d_model, args.latents, 32).to(args.device).eval()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        start = time.time()
        explorer_scan.collect(sae, cache, cache.n_tokens, device=args.device)
        sync(args.device)
        t_collect, peak_collect = time.time() - start, gib(args.device)
        start = time.time()
        data = explorer.build(sae, cache, model, cache.n_tokens, device=args.device)
        sync(args.device)
        t_build, peak = time.time() - start, gib(args.device)
        start = time.time()
        size = explorer_site.write_explorer(
            Path(tmp) / "site", data, NumberedTokens(), "s", "random"
        )
        t_write = time.time() - start
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    n, tokens, layers = args.latents, cache.n_tokens, cache.n_layers
    print(f"device: {name}; {n:,} latents, k = 32, {tokens:,} held-out tokens x {layers} layers")
    print(f"one pass (collect): {t_collect:.1f} s, peak GPU memory {peak_collect:.2f} GiB")
    print(
        "build (pass + re-encoding + logit effects + similar latents): "
        f"{t_build:.1f} s, peak GPU memory {peak:.2f} GiB"
    )
    mb, per = size["bytes"] / 1e6, size["bytes"] / n / 1e3
    print(f"write: {t_write:.1f} s; {size['files']} files, {mb:.1f} MB ({per:.2f} kB per latent)")
    dense = n * tokens * layers * 4 / 2**30
    print(f"for scale: latents x tokens x layers in float32 would be {dense:.0f} GiB")


if __name__ == "__main__":
    main()
