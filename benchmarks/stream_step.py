"""The paper's training step from the stream, end to end: model forward + MLSAE step.

What is measured
----------------
* The model: a GPT-NeoX shaped like Pythia-70m (d_model 512, 6 layers, 8 heads, d_mlp 2048,
  vocabulary 50,304, parallel attention/MLP, rotary on 25% of each head), random weights, built
  offline from a hand-written `HookedTransformerConfig` (the real weights are not needed for
  throughput).
* The SAE: R = 64 (32,768 latents), k = 32, the paper's step of 131,072 tokens (``--micro``
  tokens per micro-batch x accumulation), every layer's vector a training example.
* ``stream``: `mlsae.sources.ModelStream` (forward under ``--autocast``, stop after the last block,
  float16 residuals) through the shuffle block, batches drawn and discarded: tokens/s.
* ``whole step``: `mlsae.train.train` reading that stream for ``--steps`` optimizer steps (after
  one warm-up run): tokens/s and the projected hours for 1B tokens.
* ``SAE step alone``: `train_throughput.bench_config` on the Pythia shape (d=512, n=32,768, k=32),
  mlsae against sparsify and SAELens on the same card, every trainer in float32 (equal
  precision); skipped if those packages are missing.

Token ids are random (uniform over the vocabulary), BOS first in each context, so no position is
dropped. Run on a GPU: ``python benchmarks/stream_step.py --device cuda``; ``--quick`` is a
CPU-sized smoke run of the same code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mlsae.sources import ModelStream, TrainingSource
from mlsae.train import TrainConfig, train

PAPER_STEP = 131_072
"""Tokens per optimizer step in the original code (1 x 2048 tokens x 64 accumulation)."""


def pythia_shaped(d_model=512, n_layers=6, n_heads=8, d_vocab=50_304, n_ctx=2048, device="cpu"):
    """A random GPT-NeoX with Pythia-70m's shapes (hand-written config, no download)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=d_model // n_heads // 4,
        parallel_attn_mlp=True,
        original_architecture="GPTNeoXForCausalLM",
        device=device,
        seed=0,
    )
    return HookedTransformer(cfg).eval()


class RandomTokenStream(ModelStream):
    """`ModelStream` over random token ids (no tokenizer or corpus needed)."""

    def __init__(self, model, context_length, batch_contexts, seed=0, **kw):
        super().__init__(model, [], context_length, batch_contexts, seed=seed, **kw)

    def token_batches(self, epoch: int = 0):
        generator = torch.Generator().manual_seed(self.seed + 7919 * epoch)
        shape = (self.batch_contexts, self.context_length)
        while True:
            tokens = torch.randint(4, self.model.cfg.d_vocab, shape, generator=generator)
            tokens[:, 0] = 0
            yield tokens


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch-contexts", type=int, default=16, help="contexts per forward")
    parser.add_argument("--micro", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--shuffle", type=int, default=262_144, help="shuffle block (tokens)")
    parser.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "float16", "none"])
    parser.add_argument("--no-peers", action="store_true", help="skip the SAE-alone comparison")
    args = parser.parse_args(argv)
    dims = {}
    step_tokens, expansion = PAPER_STEP, 64
    if args.quick:
        dims = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_vocab": 1000, "n_ctx": 128}
        args.context, args.batch_contexts, args.micro, args.shuffle = 128, 4, 512, 2048
        args.steps, step_tokens, expansion = 2, 2048, 4
    device = args.device
    model = pythia_shaped(device=device, **dims)
    autocast = None if args.autocast == "none" or device == "cpu" else getattr(torch, args.autocast)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(
        f"device {name}; torch {torch.__version__}; model {model.cfg.n_layers} layers, "
        f"d_model {model.cfg.d_model}, vocab {model.cfg.d_vocab}; forward autocast {autocast}"
    )

    def source(seed=0):
        stream = RandomTokenStream(
            model, args.context, args.batch_contexts, seed=seed, autocast=autocast
        )
        return TrainingSource(stream, args.shuffle, seed)

    # the stream alone
    batches = source(1).batches(args.micro)
    next(batches)
    sync(device)
    t0, n = time.perf_counter(), 0
    while n < max(args.shuffle, 4 * step_tokens // 4):
        n += next(batches).shape[1]
    sync(device)
    stream_rate = n / (time.perf_counter() - t0)
    print(f"stream (forward + float16 + shuffle block): {stream_rate:,.0f} tokens/s")

    # the whole step
    accum = step_tokens // args.micro
    cfg = TrainConfig.of(
        expansion_factor=expansion,
        k=32,
        batch_tokens=args.micro,
        grad_accum=accum,
        select_bf16=device != "cpu",
        lr=1e-4,
        k_aux=256 if not args.quick else 16,
        shuffle_tokens=args.shuffle,
        device=device,
        log_every=10**9,
    )
    with tempfile.TemporaryDirectory() as tmp:
        warm = replace(cfg, max_tokens=step_tokens)
        train(warm, source(2), Path(tmp) / "warm", progress=False)
        timed = replace(cfg, max_tokens=args.steps * step_tokens)
        sync(device)
        t0 = time.perf_counter()
        train(timed, source(3), Path(tmp) / "timed", progress=False)
        sync(device)
        seconds = time.perf_counter() - t0
    rate = args.steps * step_tokens / seconds
    print(
        f"whole step (model forward + MLSAE R={expansion} k=32, {step_tokens:,} tokens/step = "
        f"{accum} x {args.micro} micro-batches): {rate:,.0f} tokens/s, "
        f"{seconds / args.steps:.2f} s/step (incl. checkpoint and start-up)"
    )
    print(f"projected time for 1B tokens: {1e9 / rate / 3600:.2f} h on {name}")

    if args.no_peers or args.quick:
        return
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import train_throughput as tt

        peer_args = argparse.Namespace(
            batch=args.micro * model.cfg.n_layers // 4,
            steps=5,
            warmup=2,
            seed=0,
            lr=1e-4,
            device=device,
        )
        res = tt.bench_config(model.cfg.d_model, 64 * model.cfg.d_model, 32, peer_args)
    except ImportError as err:
        print(f"SAE step alone: skipped ({err})")
        return
    tt.print_throughput([((model.cfg.d_model, 64 * model.cfg.d_model, 32), res)], peer_args.batch)
    tt.print_ratios([((model.cfg.d_model, 64 * model.cfg.d_model, 32), res)])


if __name__ == "__main__":
    main()
