"""Issue 22's GPU measurements in one script, sized for under 9 minutes on one H100/H200 (not yet
run on a GPU), written as JSON.

Run on a GPU machine: ``python benchmarks/gpu_step.py --out gpu_step.json``. ``--quick`` runs the
same code at toy sizes (on the CPU too: ``tests/test_benchmarks.py`` does, so the script is
known to run before a GPU is lent). Every timing on CUDA is taken with CUDA events.

What it writes (each section a key of the JSON; a section that fails records its error and the
rest still run):

* ``card``: the device name, memory, SM count, torch/triton versions, and the clocks and power
  from ``nvidia-smi`` before and after the run.
* ``kernels``: the Triton kernels of `mlsae.fast.kernels` on the GPU against float64 references
  computed here, with float32 and bf16 inputs (max relative error per output).
* ``sae_step``: vectors/s of one optimizer step, the reference trainer's (`mlsae.sae.MLSAE`
  autograd, "old") against `mlsae.fast.step.SyncFreeStep` ("new"), at 12,288 and 49,152
  vectors, d=512, n=32,768, k=32 (Pythia-70m, R=64), in fp32, TF32 and bf16 selection, with
  AuxK off (no dead latent) and with half the latents dead (reset to dead before every step).
  Precision is named as it runs: "fp32" float32 matmuls; "tf32" float32 tensors, TF32 matmuls;
  "bf16" bf16 selection matmul and top-k, float32 gradients and Adam, in both old and new.
* ``profile``: the top 15 CUDA kernels by device time (``torch.profiler``) over 3 steps, old and
  new, bf16 selection, half dead, 12,288 vectors.
* ``forward``: the model forward of the stream on a Pythia-70m-shaped GPT-NeoX with random
  weights (16 contexts x 2,048 tokens): TransformerLens under bf16 autocast (as
  `mlsae.sources.ModelStream` runs it; skipped if transformer_lens is not installed) against the
  Hugging Face model in bf16 with SDPA attention (`mlsae.fast.hf_forward.block_outputs`).
* ``whole_step``: tokens/s of the paper's 131,072-token optimizer step, SDPA forward + token
  shuffle + ``SyncFreeStep`` on 12,288-vector micro-batches, over 6 steps after a warm-up.
* ``learning``: training FVU against tokens for old and new from the same initialisation on the
  same synthetic sparse data (a known dictionary, 6 layers of different scales), bf16 selection:
  the new numerics must learn as the old ones do.

Where transformer_lens is missing on the GPU machine (it is not in the H200 image), carry its
wheels (``../.library/device/README.md``); every other section needs only torch, triton and
transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsae.fast import sparse_ops  # noqa: E402
from mlsae.fast.step import SyncFreeStep, autograd_step, tf32_matmuls  # noqa: E402
from mlsae.sae import MLSAE  # noqa: E402

PAPER_STEP = 131_072
FULL = dict(
    d=512, n=32_768, k=32, layers=6, heads=8, vectors=(12_288, 49_152), vocab=50_304, ctx=2048
)
QUICK = dict(d=32, n=512, k=8, layers=3, heads=2, vectors=(384, 768), vocab=500, ctx=64)


# -- timing ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Elapsed seconds of a region: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# -- the card --------------------------------------------------------------------------------------
def card(device: torch.device) -> dict:
    out = {"torch": torch.__version__, "device": str(device)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(
            name=p.name,
            memory_gib=round(p.total_memory / 2**30, 1),
            sms=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
        )
    out["nvidia_smi"] = nvidia_smi()
    return out


def nvidia_smi() -> str | None:
    query = "name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,driver_version"
    try:
        run = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return run.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- kernels on the GPU ----------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def kernel_checks(device: torch.device, shape: dict) -> dict:
    """The ops (Triton on CUDA) against float64 references, float32 and bf16 inputs."""
    d, n, k = shape["d"], shape["n"], shape["k"]
    vectors = shape["vectors"][0]
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(vectors)]).to(device)
    values = torch.randn(vectors, k, generator=g).relu().to(device)
    w = torch.randn(n, d, generator=g).to(device)
    grad = torch.randn(vectors, d, generator=g).to(device)
    x = torch.randn(vectors, d, generator=g).to(device)
    entries = sparse_ops.sort_entries([idx], n)
    out = {"implementation": "triton" if device.type == "cuda" else "torch reference (cpu)"}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        w_, g_, x_, v_ = w.to(dtype), grad.to(dtype), x.to(dtype), values.to(dtype)
        dec = sparse_ops.decode(idx, v_, w_)
        ref_dec = torch.nn.functional.embedding_bag(
            idx, w_.double(), per_sample_weights=v_.double(), mode="sum"
        )
        vs = v_.reshape(-1)[entries.order]
        got = sparse_ops.segment_grads(*entries[:4], vs, g_, x_, w_)
        lat, rows = entries.latent, entries.grad_row
        g64, x64, w64, v64 = g_.double()[rows], x_.double()[rows], w_.double()[lat], vs.double()
        gv = (g64 * w64).sum(-1) * (v64 > 0)
        zeros = torch.zeros(n, d, dtype=torch.float64, device=device)
        want = (
            zeros.index_add(0, lat, v64[:, None] * g64),
            zeros.index_add(0, lat, gv[:, None] * x64),
            torch.zeros(n, dtype=torch.float64, device=device).index_add(0, lat, gv),
            gv,
        )
        errs = {"decode": rel_err(dec, ref_dec)}
        errs.update(
            {
                k_: rel_err(a, b)
                for k_, a, b in zip(("g_dec", "g_enc", "s", "gv"), got, want, strict=True)
            }
        )
        out[name] = errs
    return out


# -- the SAE step ----------------------------------------------------------------------------------
def make_sae(shape: dict, precision: str, device: torch.device, seed: int = 0) -> MLSAE:
    torch.manual_seed(seed)
    sae = MLSAE(shape["d"], shape["n"], shape["k"], select_bf16=precision == "bf16").to(device)
    sae.b_pre_initialized.fill_(True)
    return sae.train()


def adam(sae: MLSAE) -> torch.optim.Adam:  # as mlsae.train.adam on CUDA (fused)
    fused = sae.W_enc.device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10, fused=fused)


class Stepper:
    """Old or new steps on one SAE, with half the latents made dead again before each step."""

    def __init__(self, kind: str, shape: dict, precision: str, dead: bool, device):
        self.kind, self.device = kind, device
        self.sae = make_sae(shape, precision, device)
        self.opt = adam(self.sae)
        n = shape["n"]
        self.dead = torch.zeros(n, dtype=torch.long, device=device)
        if dead:
            self.dead[torch.randperm(n, device=device)[: n // 2]] = self.sae.dead_tokens
        self.n_dead = n // 2 if dead else 0
        self.new = SyncFreeStep(self.sae, self.opt, tf32=precision == "tf32")
        self.tf32 = precision == "tf32"

    def reset(self) -> None:
        self.sae.tokens_since_fired.copy_(self.dead)
        self.new.n_dead = self.n_dead

    def __call__(self, x: torch.Tensor) -> None:
        if self.kind == "new":
            self.new.step([x])
            return
        with tf32_matmuls(self.tf32):
            autograd_step(self.sae, self.opt, [x])


def sae_steps(device, shape: dict, reps: int, warmup: int) -> list[dict]:
    rows = []
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    for vectors in shape["vectors"]:
        x = torch.randn(shape["layers"], vectors // shape["layers"], shape["d"], device=device)
        for precision in precisions:
            for dead in (False, True):
                for kind in ("old", "new"):
                    step = Stepper(kind, shape, precision, dead, device)
                    times = []
                    for r in range(warmup + reps):
                        step.reset()
                        with Timer(device) as t:
                            step(x)
                        if r >= warmup:
                            times.append(t.seconds)
                    peak = None
                    if device.type == "cuda":
                        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                        torch.cuda.reset_peak_memory_stats(device)
                    rows.append(
                        dict(
                            step=kind, vectors=vectors, precision=precision,
                            auxk="half dead" if dead else "off",
                            seconds=median(times), vectors_per_s=vectors / median(times),
                            peak_gib=peak,
                        )
                    )  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                    del step
    return rows


def profile(device, shape: dict) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    vectors = shape["vectors"][0]
    x = torch.randn(shape["layers"], vectors // shape["layers"], shape["d"], device=device)
    out = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for kind in ("old", "new"):
        step = Stepper(kind, shape, "bf16", True, device)
        for _ in range(2):
            step.reset()
            step(x)
        sync(device)
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                step.reset()
                step(x)
            sync(device)
        events = [e for e in prof.key_averages() if _device_us(e) > 0] or list(prof.key_averages())
        events.sort(key=_device_us if device.type == "cuda" else _cpu_us, reverse=True)
        out[kind] = [
            dict(name=e.key[:120], calls=e.count, device_us=_device_us(e), cpu_us=_cpu_us(e))
            for e in events[:15]
        ]
    return out


def _device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _cpu_us(event) -> float:
    return float(getattr(event, "self_cpu_time_total", 0.0))


# -- the model forward -----------------------------------------------------------------------------
def pythia_hf(shape: dict, device, dtype):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=shape["vocab"], hidden_size=shape["d"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], intermediate_size=4 * shape["d"], rotary_pct=0.25,
        use_parallel_residual=True, max_position_embeddings=shape["ctx"],
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(config)
    return model.to(dtype).eval()


def forward(device, shape: dict, contexts: int, reps: int) -> dict:
    from mlsae.fast.hf_forward import attn_implementation, block_outputs, with_sdpa

    tokens = torch.randint(0, shape["vocab"], (contexts, shape["ctx"]), device=device)
    n_tokens = tokens.numel()
    bf16 = torch.bfloat16
    hf = with_sdpa(pythia_hf(shape, device, bf16))
    out = {"contexts": contexts, "context_length": shape["ctx"]}

    def timed(fn):
        fn()
        times = []
        for _ in range(reps):
            with Timer(device) as t:
                fn()
            times.append(t.seconds)
        return n_tokens / median(times)

    out["hf_sdpa_bf16"] = dict(
        tokens_per_s=timed(lambda: block_outputs(hf, tokens)),
        precision=f"bf16 weights, {attn_implementation(hf)} attention",
    )
    try:
        from mlsae.activations import residual_stream
        from mlsae.fast.tl_twin import hooked_from_neox
    except ImportError as err:
        out["transformer_lens"] = f"skipped: {err}"
        return out
    tl = hooked_from_neox(pythia_hf(shape, device, torch.float32), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=bf16):
        ref = residual_stream(tl, tokens[:2])
    parity = rel_err(block_outputs(hf, tokens[:2]).float(), ref.float())

    def tl_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=bf16):
            residual_stream(tl, tokens)

    out["transformer_lens_autocast_bf16"] = dict(
        tokens_per_s=timed(tl_forward), precision="float32 weights under bf16 autocast"
    )
    out["parity_rel_err"] = parity  # bf16 HF against TL autocast: both bf16-rounded
    out["speedup"] = (
        out["hf_sdpa_bf16"]["tokens_per_s"] / out["transformer_lens_autocast_bf16"]["tokens_per_s"]
    )
    return out


def whole_step(device, shape: dict, contexts: int, steps: int, step_tokens: int) -> dict:
    """SDPA forward -> token shuffle -> SyncFreeStep, ``steps`` optimizer steps after one."""
    from mlsae.fast.hf_forward import block_outputs, with_sdpa

    hf = with_sdpa(pythia_hf(shape, device, torch.bfloat16))
    sae = make_sae(shape, "bf16", device)
    stepper = SyncFreeStep(sae, adam(sae))
    micro_tokens = shape["vectors"][0] // shape["layers"]
    per_forward = contexts * shape["ctx"]
    forwards = max(1, step_tokens // per_forward)
    gen = torch.Generator(device=device).manual_seed(0)

    def one_step():
        batches = []
        for _ in range(forwards):
            tokens = torch.randint(
                0, shape["vocab"], (contexts, shape["ctx"]), device=device, generator=gen
            )
            resid = block_outputs(hf, tokens).flatten(1, 2).half()  # (layer, token, d) float16
            resid = resid[:, torch.randperm(resid.shape[1], device=device, generator=gen)]
            batches += list(resid.split(micro_tokens, dim=1))
        return stepper.step(batches)

    one_step()
    with Timer(device) as t:
        for _ in range(steps):
            result = one_step()
    tokens = steps * forwards * per_forward
    return dict(
        tokens_per_s=tokens / t.seconds,
        seconds_per_step=t.seconds / steps,
        hours_per_1b_tokens=1e9 / (tokens / t.seconds) / 3600,
        steps=steps,
        tokens_per_step=forwards * per_forward,
        micro_batch_vectors=micro_tokens * shape["layers"],
        final_fvu=float(result.fvu),
        precision="model bf16 + SDPA; residuals float16; SAE bf16 selection, fp32 grads/Adam",
    )


def learning(device, shape: dict, steps: int) -> dict:
    """Training FVU of old and new steps from one initialisation on the same synthetic data."""
    d, layers = shape["d"], shape["layers"]
    vectors = shape["vectors"][0]
    g = torch.Generator(device="cpu").manual_seed(1)
    truth = torch.nn.functional.normalize(torch.randn(4 * shape["n"] // 8, d, generator=g), dim=-1)
    truth = truth.to(device)
    scales = torch.linspace(1.0, 8.0, layers, device=device)[:, None, None]

    def data(step: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(1000 + step)
        tokens = vectors // layers
        idx = torch.randint(0, truth.shape[0], (layers, tokens, 16), device=device, generator=gen)
        coef = torch.rand(layers, tokens, 16, device=device, generator=gen)
        x = torch.einsum("ltk,ltkd->ltd", coef, truth[idx])
        return x * scales + 0.05 * torch.randn(x.shape, device=device, generator=gen)

    base = make_sae(shape, "bf16", device)
    runs = {}
    for kind in ("old", "new"):
        sae = copy.deepcopy(base)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3, eps=6.25e-10)
        stepper = SyncFreeStep(sae, opt)
        curve = []
        for s in range(steps):
            x = data(s)
            if kind == "old":
                autograd_step(sae, opt, [x])
                if s % max(1, steps // 10) == 0 or s == steps - 1:
                    with torch.no_grad():
                        curve.append((s + 1, float(sae(x).fvu)))
            else:
                result = stepper.step([x])
                if s % max(1, steps // 10) == 0 or s == steps - 1:
                    curve.append((s + 1, float(result.fvu)))
        runs[kind] = [dict(step=s, tokens=s * (vectors // layers), fvu=f) for s, f in curve]
    last = {k: v[-1]["fvu"] for k, v in runs.items()}
    return dict(curves=runs, final_fvu=last, new_over_old=last["new"] / last["old"])


# -- main ------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="gpu_step.json")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = QUICK if args.quick else FULL
    reps, warmup = (2, 1) if args.quick else (10, 3)
    t0 = time.time()
    report: dict = {"quick": args.quick, "shape": {k: v for k, v in shape.items()}}
    sections = [
        ("card", lambda: card(device)),
        ("kernels", lambda: kernel_checks(device, shape)),
        ("sae_step", lambda: sae_steps(device, shape, reps, warmup)),
        ("profile", lambda: profile(device, shape)),
        ("forward", lambda: forward(device, shape, 2 if args.quick else 16, reps)),
        (
            "whole_step",
            lambda: whole_step(
                device,
                shape,
                2 if args.quick else 16,
                2 if args.quick else 6,
                4 * shape["ctx"] if args.quick else PAPER_STEP,
            ),
        ),  # fmt: skip
        ("learning", lambda: learning(device, shape, 20 if args.quick else 300)),
    ]
    for name, run in sections:
        started = time.time()
        try:
            report[name] = run()
        except Exception as err:  # one failing section must not lose the others' numbers
            report[name] = {
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc(),
            }
        report.setdefault("seconds", {})[name] = round(time.time() - started, 1)
        print(f"{name}: {report['seconds'][name]} s", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    report["card"]["nvidia_smi_after"] = nvidia_smi() if isinstance(report["card"], dict) else None
    report["total_seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    summary = summarise(report)
    print(json.dumps(summary, indent=1))


def summarise(report: dict) -> dict:
    """The issue's targets against what was measured (None where a section failed)."""

    def get(fn):
        try:
            return fn()
        except (KeyError, TypeError, IndexError, StopIteration):
            return None

    sae_new = get(
        lambda: max(
            r["vectors_per_s"] for r in report["sae_step"]
            if r["step"] == "new" and r["vectors"] == report["shape"]["vectors"][0]
            and r["auxk"] == "half dead"
        )
    )  # fmt: skip
    return {
        "whole_step_tokens_per_s": get(lambda: report["whole_step"]["tokens_per_s"]),
        "whole_step_target": 375_000,
        "sae_step_vectors_per_s_12288_auxk": sae_new,
        "sae_step_target": 3_000_000,
        "forward_sdpa_tokens_per_s": get(lambda: report["forward"]["hf_sdpa_bf16"]["tokens_per_s"]),
        "forward_target": 1_500_000,
        "errors": [k for k, v in report.items() if isinstance(v, dict) and "error" in v],
    }


if __name__ == "__main__":
    main()
