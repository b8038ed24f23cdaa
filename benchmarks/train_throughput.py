"""Training throughput of TopK SAEs: mlsae against SAELens and EleutherAI's sparsify.

What is measured
----------------
Wall-clock time of one *training step* (forward, loss, backward, the trainer's gradient and
decoder-norm handling, an Adam step and the trainer's dead-latent bookkeeping) on one batch of
``--batch`` activation vectors, for four trainers built in the same process with the same shape
(``d_model``, ``n_latents``, ``k``), the same learning rate and the same input tensor:

* ``mlsae fp32``        `mlsae.sae.MLSAE` as `mlsae.train` steps it, float32 selection matmul;
* ``mlsae bf16-select`` the same with ``select_bf16=True`` (top-k chosen by a bf16 matmul);
* ``saelens``           SAELens 6.54 ``TopKTrainingSAE.training_forward_pass`` stepped as
                        ``sae_lens.training.sae_trainer.SAETrainer._train_step`` does it;
* ``sparsify``          EleutherAI sparsify 1.3.3 ``SparseCoder`` stepped as
                        ``sparsify.trainer.Trainer`` does it (but with Adam, see below).

Every trainer uses the same optimizer, `mlsae.train.adam` (``torch.optim.Adam(lr, eps=6.25e-10)``
with PyTorch's fused kernel, as mlsae trains), so the comparison is about the SAE implementations,
not the optimizers (sparsify defaults to signum, SAELens to a non-fused Adam with eps=1e-8).
Steps are interleaved round-robin (one step of each trainer per round, the order rotated each
round) after a few warm-up steps, so machine noise hits every trainer alike; the table reports the
median step. Read the *ratios*, which come from one run on one machine, not the absolute numbers.
In the timed steps no latent is dead yet (every trainer's dead window is far longer than the run),
so no trainer runs its AuxK pass; each still pays for its dead-mask check.

The same run times a dense ``(batch x d) @ (d x n)`` matmul (the encoder's shape) in float32 and
in bfloat16: this machine's matmul FLOP/s. ``flop_fraction`` is the FLOP rate of our training step
divided by that of the dense matmul in the precision of our selection matmul. FLOPs are counted
as what our step executes (`our_step_flops`): the selection matmul ``2*B*d*n``, the sparse encoder
gradient (``2*B*k*d`` for the selected encoder rows plus ``2*B*k*d`` for the input), and the sparse
decoder (``embedding_bag`` forward, weight gradient and per-sample-weight gradient, ``3*2*B*k*d``).
The top-k values are reused from the selection matmul, so no gather product is executed; no AuxK
pass runs; elementwise work (standardization, losses, Adam, top-k) is not counted. A fraction near
1 means the step costs little more than its one dense matmul.

``--quality`` also trains every trainer on the same real residual vectors of the activation
caches (layers and tokens flattened to vectors, the same batches in the same order, a fixed budget
of ``--quality-vectors``) and prints each one's held-out FVU on the test cache (per layer, then the
mean over layers; each trainer's own reconstruction in eval mode, without gradients).

The last line is ``mlsae/best_peer = R``: our fp32 step's vectors/s over the faster peer's, every
trainer in float32 (equal precision), on the first configuration; the lines above it give the
same ratio for every configuration, and our bf16-selection variant's ratio apart. Use ``--quick``
for a sub-minute smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mlsae.activations import ActivationCache
from mlsae.reconstruction import fvu_from_sums
from mlsae.sae import MLSAE
from mlsae.train import adam

ADAM_EPS = 6.25e-10
"""Adam epsilon of `mlsae.train.TrainConfig`, used for every trainer."""
AUX_COEF = 1 / 32
"""AuxK coefficient of mlsae, also given to sparsify (its trainer's default 0 disables AuxK)."""
SAELENS_DEAD_WINDOW = 1000
"""SAELens's default ``dead_feature_window`` (training steps)."""
SPARSIFY_DEAD_TOKENS = 10_000_000
"""sparsify's default ``dead_feature_threshold`` (tokens)."""
CONFIGS = [(576, 4608, 32), (512, 32768, 32)]
"""``(d_model, n_latents, k)``: the offline default at R=8, then Pythia-70m at R=64."""
REPO = Path(__file__).resolve().parents[1]


class Trainer:
    """One SAE and its optimizer; `step` is one training step, `reconstruct` an eval pass."""

    name: str

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One training step on ``x (vectors, d)``; returns the detached loss."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(vectors, d)`` reconstruction in eval mode, without gradients."""
        raise NotImplementedError


class Ours(Trainer):
    """`mlsae.sae.MLSAE`, stepped exactly as `mlsae.train.train` steps one micro-batch."""

    def __init__(self, d, n, k, lr, seed, x0, select_bf16, device):
        self.name = "mlsae bf16-select" if select_bf16 else "mlsae fp32"
        torch.manual_seed(seed)
        self.sae = MLSAE(d, n, k, aux_coef=AUX_COEF, select_bf16=select_bf16).to(device)
        self.opt = adam(self.sae.parameters(), lr=lr, eps=ADAM_EPS)
        self.sae.init_b_pre_(self.sae.preprocess(x0)[0])

    def step(self, x):
        sae = self.sae.train()
        out = sae(x)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        self.opt.step()
        sae.normalize_decoder_()
        sae.update_dead_(out.indices, x.shape[0], out.values)  # counters advance in vectors here
        return out.loss.detach()

    @torch.no_grad()
    def reconstruct(self, x):
        return self.sae.eval()(x).recons


class SAELens(Trainer):
    """SAELens ``TopKTrainingSAE``, stepped as ``SAETrainer._train_step`` does (no autocast).

    Per step: ``training_forward_pass(TrainStepInput(...))`` with the trainer's dead-neuron mask
    (steps since firing > ``dead_feature_window``) and coefficients (empty for TopK), the firing
    statistics update, ``loss.backward()``, ``clip_grad_norm_(params, 1.0)``, ``Adam.step()``,
    ``zero_grad()``. SAELens has no decoder-norm step for TopK: it trains with
    ``rescale_acts_by_decoder_norm=True`` instead. The constant LR schedule is left out.
    """

    name = "saelens"

    def __init__(self, d, n, k, lr, seed, device):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        self._input = TrainStepInput
        torch.manual_seed(seed)
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device=device))
        self.opt = adam(self.sae.parameters(), lr=lr, eps=ADAM_EPS)
        self.coefficients = {
            name: float(getattr(c, "value", c)) for name, c in self.sae.get_coefficients().items()
        }
        self.since_fired = torch.zeros(n, device=device)
        self.act_freq = torch.zeros(n, device=device)
        self.n_steps = 0

    def step(self, x):
        sae = self.sae.train()
        out = sae.training_forward_pass(
            step_input=self._input(
                sae_in=x,
                coefficients=self.coefficients,
                dead_neuron_mask=(self.since_fired > SAELENS_DEAD_WINDOW).bool(),
                n_training_steps=self.n_steps,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            self.since_fired += 1
            self.since_fired[firing.sum(-2).bool()] = 0
            self.act_freq += firing.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.n_steps += 1
        return out.loss.detach()

    @torch.no_grad()
    def reconstruct(self, x):
        return self.sae.eval()(x)


class Sparsify(Trainer):
    """sparsify ``SparseCoder``, stepped as ``sparsify.trainer.Trainer`` does (Adam, not signum).

    Per step: ``set_decoder_norm_to_unit_norm()`` (its trainer does it before each forward),
    ``sae(x, x, dead_mask=..., total_variance=...)``, ``loss = fvu + auxk_alpha * auxk_loss``,
    ``backward()``, the fired-latent mask, ``remove_gradient_parallel_to_decoder_directions()``,
    ``Adam.step()``, ``zero_grad()``, the tokens-since-fired update. ``b_dec`` starts at the mean
    of the first batch, as its trainer sets it at step 0.
    """

    name = "sparsify"

    def __init__(self, d, n, k, lr, seed, x0, device):
        if torch.device(device).type != "cuda":
            # sparsify picks its Triton decoder at import whenever triton imports (it comes with
            # PyPI's CUDA build of torch, which pip installs on a machine without this one's local
            # CPU wheel) and then fails on CPU tensors ("0 active drivers"): its eager decoder.
            os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
        with contextlib.redirect_stdout(io.StringIO()):  # "Triton not installed, ..." on import
            from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(seed)
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
        self.sae.b_dec.data = x0.mean(0).to(self.sae.dtype)
        self.opt = adam(self.sae.parameters(), lr=lr, eps=ADAM_EPS)
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)

    def step(self, x):
        sae = self.sae.train()
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = self.since_fired > SPARSIFY_DEAD_TOKENS
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire = torch.zeros_like(dead_mask)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + AUX_COEF * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[did_fire] = 0
        return loss.detach()

    @torch.no_grad()
    def reconstruct(self, x):
        return self.sae.eval()(x).sae_out


def build_trainers(d, n, k, lr, seed, x0, device) -> list[Trainer]:
    """The four trainers, each initialised from ``seed``."""
    return [
        Ours(d, n, k, lr, seed, x0, select_bf16=False, device=device),
        Ours(d, n, k, lr, seed, x0, select_bf16=True, device=device),
        SAELens(d, n, k, lr, seed, device=device),
        Sparsify(d, n, k, lr, seed, x0, device=device),
    ]


def our_step_flops(batch: int, d: int, n: int, k: int) -> tuple[int, int]:
    """``(selection, sparse)`` FLOPs executed by one `MLSAE` training step (no AuxK pass).

    selection: the no-grad encoder matmul ``2*B*d*n``. sparse: `GatherDot` backward (encoder-row
    gradient ``2*B*k*d`` by sparse mm, input gradient ``2*B*k*d`` by embedding_bag) plus the
    decoder's embedding_bag forward, weight gradient and per-sample-weight gradient
    (``3*2*B*k*d``). The top-k values come from the selection matmul itself (no gather product);
    elementwise ops, top-k and Adam are not counted.
    """
    return 2 * batch * d * n, (2 + 2 + 3 * 2) * batch * k * d


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds taken by ``fn()``."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_config(d, n, k, args) -> dict:
    """Median step seconds of every trainer and of the dense matmuls, all interleaved."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, d, generator=gen).to(args.device)
    trainers = build_trainers(d, n, k, args.lr, args.seed, x, args.device)
    a = torch.randn(args.batch, d, generator=gen).to(args.device)
    w = torch.randn(d, n, generator=gen).to(args.device)
    a16, w16 = a.bfloat16(), w.bfloat16()
    jobs: dict[str, Callable[[], object]] = {t.name: (lambda t=t: t.step(x)) for t in trainers}
    jobs["matmul fp32"] = lambda: a @ w
    jobs["matmul bf16"] = lambda: a16 @ w16
    losses = {t.name: [] for t in trainers}
    for _ in range(args.warmup):
        for t in trainers:
            losses[t.name].append(t.step(x))
        jobs["matmul fp32"]()
        jobs["matmul bf16"]()
    times = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(args.steps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(jobs[name], args.device))
    for t in trainers:  # the timed steps' losses, from the next step (not timed)
        losses[t.name].append(t.step(x))
        bad = [v.item() for v in losses[t.name] if not torch.isfinite(v)]
        if bad:
            raise FloatingPointError(f"{t.name}: non-finite loss {bad} at d={d} n={n} k={k}")
    dead = max(t.sae.dead_fraction() for t in trainers if isinstance(t, Ours))
    return {
        "median": {name: statistics.median(ts) for name, ts in times.items()},
        "loss": {name: (ls[0].item(), ls[-1].item()) for name, ls in losses.items()},
        "trainers": [t.name for t in trainers],
        "dead": dead,
    }


def print_throughput(results: list[tuple[tuple[int, int, int], dict]], batch: int) -> None:
    """The table of step times, vectors/s and ratios."""
    print(
        f"\nTraining-step throughput, batch {batch} vectors; median over interleaved rounds. "
        "ratio = vectors/s / (mlsae fp32 vectors/s). loss first->last: each trainer's own loss "
        "(FVU + aux for mlsae and sparsify, summed squared error + aux for SAELens)."
    )
    head = f"{'trainer':<18} {'config':<22} {'ms/step':>9} {'vectors/s':>11} {'ratio':>7}  loss"
    print(head)
    print("-" * (len(head) + 20))
    for (d, n, k), res in results:
        config = f"d={d} n={n} k={k}"
        ours = batch / res["median"]["mlsae fp32"]
        for name in res["trainers"]:
            sec = res["median"][name]
            first, last = res["loss"][name]
            print(
                f"{name:<18} {config:<22} {sec * 1e3:>9.1f} {batch / sec:>11.0f} "
                f"{batch / sec / ours:>7.2f}  {first:.4g} -> {last:.4g}"
            )


def print_flops(results: list[tuple[tuple[int, int, int], dict]], batch: int) -> None:
    """Our training FLOP rate against the dense matmul of the encoder's shape."""
    print(
        "\nFLOP rate. FLOPs counted = those our step executes: selection matmul 2*B*d*n + sparse "
        "encoder gradient 2*2*B*k*d + decoder embedding_bag fwd/bwd 3*2*B*k*d (no gather, no AuxK "
        "pass; elementwise, top-k and Adam not counted), divided by our median step time, over "
        "the dense (B x d) @ (d x n) matmul FLOP/s in our selection matmul's precision."
    )
    for (d, n, k), res in results:
        med = res["median"]
        dense, sparse = our_step_flops(batch, d, n, k)
        fp32 = 2 * batch * d * n / med["matmul fp32"]
        bf16 = 2 * batch * d * n / med["matmul bf16"]
        print(
            f"d={d} n={n} k={k} B={batch}: {(dense + sparse) / 1e9:.3f} GFLOP/step "
            f"({sparse / (dense + sparse):.1%} sparse); dense matmul "
            f"{fp32 / 1e9:.1f} GFLOP/s fp32, {bf16 / 1e9:.1f} GFLOP/s bf16"
        )
        if res["dead"] > 0:
            print(f"  note: {res['dead']:.1%} of our latents were dead, so AuxK ran uncounted")
        for name, peak in (("mlsae fp32", fp32), ("mlsae bf16-select", bf16)):
            print(f"flop_fraction({name}) = {(dense + sparse) / med[name] / peak:.2f}")


def quality(args) -> None:
    """Held-out FVU of every trainer after the same budget of real training vectors."""
    root = Path(args.cache_dir)
    try:
        train_cache, test_cache = ActivationCache(root / "train"), ActivationCache(root / "test")
    except FileNotFoundError as err:
        print(f"\nQuality: skipped, no complete activation caches under {root} ({err})")
        return
    d, layers = train_cache.d_model, train_cache.n_layers
    d0, n0, k = CONFIGS[0]
    n = round(n0 / d0 * d)
    per_batch = max(1, args.batch // layers)  # tokens per batch; every layer gives a vector
    batches = train_cache.iter_batches(per_batch)
    first = next(batches)
    x0 = first.reshape(-1, d).to(args.device)
    trainers = build_trainers(d, n, k, args.lr, args.seed, x0, args.device)
    seconds = {t.name: 0.0 for t in trainers}
    seen, x = 0, first
    while x is not None and seen + x.shape[0] * x.shape[1] <= args.quality_vectors:
        flat = x.reshape(-1, d).to(args.device)
        for t in trainers:
            seconds[t.name] += timed(lambda t=t, flat=flat: t.step(flat), args.device)
        seen += flat.shape[0]
        x = next(batches, None)
    # Held-out FVU: per layer sum ||x - x_hat||^2 / sum ||x - mean_layer(x)||^2, mean over layers.
    err = {t.name: torch.zeros(layers, dtype=torch.float64) for t in trainers}
    s1 = torch.zeros(layers, d, dtype=torch.float64)
    s2 = torch.zeros(layers, dtype=torch.float64)
    count = 0
    for xt in test_cache.iter_batches(per_batch):
        if count >= args.quality_test_tokens:
            break
        xt = xt.to(args.device)
        flat = xt.reshape(-1, d)
        for t in trainers:
            rec = t.reconstruct(flat).reshape(xt.shape).double()
            err[t.name] += (xt.double() - rec).pow(2).sum((1, 2)).cpu()
        s1 += xt.double().sum(1).cpu()
        s2 += xt.double().pow(2).sum((1, 2)).cpu()
        count += xt.shape[1]
    print(
        f"\nQuality at equal budget: {seen} training vectors ({layers} layers x tokens, flattened; "
        f"same batches for all), d={d} n={n} k={k}; held-out FVU on {count} test tokens x "
        f"{layers} layers (per layer, then mean)."
    )
    print(f"{'trainer':<18} {'test FVU':>9} {'train s':>8}")
    for t in trainers:
        fvu = fvu_from_sums(err[t.name], s2, s1, count).mean().item()
        print(f"{t.name:<18} {fvu:>9.4f} {seconds[t.name]:>8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="first config, batch 1024, 3 steps")
    parser.add_argument("--quality", action="store_true", help="also train on the caches")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    parser.add_argument("--batch", type=int, default=None, help="vectors per step (4096)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=str(REPO / "cache" / "activations"))
    parser.add_argument("--quality-vectors", type=int, default=400_000)
    parser.add_argument("--quality-test-tokens", type=int, default=20_000)
    args = parser.parse_args(argv)
    args.batch = args.batch or (1024 if args.quick else 4096)
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = CONFIGS[:1] if args.quick else CONFIGS
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per trainer; Gaussian inputs, "
        f"seed {args.seed}, Adam lr {args.lr} eps {ADAM_EPS}"
    )
    results = [(cfg, bench_config(*cfg, args)) for cfg in configs]
    print_throughput(results, args.batch)
    print_flops(results, args.batch)
    if args.quality and not args.quick:
        quality(args)
    print_ratios(results)


def print_ratios(results: list[tuple[tuple[int, int, int], dict]]) -> None:
    """Headline ratios at equal precision (every trainer in fp32), each configuration.

    Our bf16 top-k selection against the fp32 peers is printed apart: it is not an equal-
    precision comparison. The last line is the first configuration's equal-precision ratio.
    """
    print("\nHeadline: our fp32 step against the faster peer's fp32 step (equal precision).")
    for (d, n, k), res in results:
        med = res["median"]
        peer = min(med["saelens"], med["sparsify"])
        print(
            f"d={d} n={n} k={k}: mlsae fp32 / best peer fp32 = {peer / med['mlsae fp32']:.2f}; "
            f"(not equal precision: mlsae bf16-select / best peer fp32 = "
            f"{peer / med['mlsae bf16-select']:.2f})"
        )
    med = results[0][1]["median"]
    print(f"mlsae/best_peer = {min(med['saelens'], med['sparsify']) / med['mlsae fp32']:.2f}")


if __name__ == "__main__":
    main()
