"""The training loop: residuals -> (lens) -> MLSAE, Adam, atomic checkpoints, resume, a JSONL log.

Readable top to bottom: each optimizer step takes ``grad_accum`` micro-batches of
``batch_tokens`` tokens at every trained layer (``batch_tokens * n_layers`` vectors each) on each
of the data-parallel processes, computes ``FVU + aux_coef * AuxK``, removes the decoder gradient
parallel to each latent, steps Adam, renormalises the decoder, and advances the dead-latent
counters by the step's tokens (a latent fired if it fired in any micro-batch on any process).
Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPUs);
process r takes every r-th micro-batch, so W processes with ``grad_accum`` A train exactly as
one process with ``grad_accum`` A * W. The token budget and
the dead-latent window are counted in tokens. Checkpoints (weights, optimizer, dead-latent counters,
config, tokens seen, step) are written atomically (temporary file, then rename) and the
previous one is kept, so a crash never leaves the run without a loadable checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from mlsae.activations import ActivationCache
from mlsae.config import Run, Train, validate_run, validate_train
from mlsae.paths import snapshot_file
from mlsae.precision import use_bf16
from mlsae.sae import MLSAE
from mlsae.schedule import lr_factor
from mlsae.sources import CacheSource, TrainingSource

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One SAE training run: its size and the shared training settings, as params.yaml has them.

    ``run`` (expansion factor, k) and ``train`` (learning rate, batch, AuxK, shuffling, ...) are
    the validated `mlsae.config` sections themselves, so their defaults live in one place; the
    rest is what a stage decides for this run (its budget, layers, seed and device). For flat
    keywords (``TrainConfig.of(k=4, lr=3e-3)``) see `of`.
    """

    run: Run = field(default_factory=Run)
    """Size of the SAE (``sweep.<name>`` in params.yaml)."""
    train: Train = field(default_factory=Train)
    """Shared training settings (``train`` in params.yaml)."""
    max_tokens: int | None = None
    """Training budget in tokens (None: one pass over the source)."""
    layers: list[int] | None = None
    """Layers to train on (None: all, the MLSAE; one layer: a single-layer baseline)."""
    seed: int = 0
    """Seed of the SAE initialisation."""
    device: str = "cpu"
    """Training device."""
    log_every: int = 10
    """Write a log line every this many steps."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata saved with the run (run name, model, corpus, lens hash)."""

    def __post_init__(self):
        if isinstance(self.run, dict):  # read back from a checkpoint
            self.run = Run(**self.run)
        if isinstance(self.train, dict):
            self.train = Train(**self.train)
        validate_run(self.run, "run")
        validate_train(self.train)

    @classmethod
    def of(cls, **settings) -> TrainConfig:
        """A config from flat keywords, each given to the section (or field) that has it."""
        own = {f.name for f in fields(cls)} - {"run", "train"}
        sections = {
            name: {f.name for f in fields(c)} for name, c in (("run", Run), ("train", Train))
        }
        top, nested = {}, {name: {} for name in sections}
        for key, value in settings.items():
            where = [name for name, names in sections.items() if key in names]
            if key in own:
                top[key] = value
            elif where:
                nested[where[0]][key] = value
            else:
                raise TypeError(f"TrainConfig has no setting {key!r}.")
        return cls(run=Run(**nested["run"]), train=Train(**nested["train"]), **top)

    def flat(self) -> dict:
        """Every setting under its own name (``k``, ``lr``, ``max_tokens``, ...) and ``extra``."""
        return flatten_config(asdict(self))


def flatten_config(saved: dict) -> dict:
    """A saved `TrainConfig` (``asdict``) as one flat mapping, ``extra``'s keys included."""
    out = {k: v for k, v in saved.items() if k not in ("run", "train", "extra")}
    return {**saved.get("run", {}), **saved.get("train", {}), **out, **saved.get("extra", {})}


class NonFiniteError(RuntimeError):
    """Raised when activations or the loss contain NaN or inf."""


def build_sae(cfg: TrainConfig, d_model: int) -> MLSAE:
    """A freshly initialised SAE for ``cfg`` (seeded)."""
    torch.manual_seed(cfg.seed)
    return MLSAE(
        d_model=d_model,
        n_latents=int(round(cfg.run.expansion_factor * d_model)),
        k=cfg.run.k,
        k_aux=cfg.train.k_aux,
        aux_coef=cfg.train.aux_coef,
        dead_tokens=cfg.train.dead_tokens,
        select_bf16=use_bf16(cfg.train.select_bf16, cfg.device),
    )


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically to ``path``, keeping the previous file as ``path.prev``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if path.exists():
        # Hard-link the current file as .prev, then swap the new one in with one atomic rename:
        # at every moment checkpoint.pt is a complete checkpoint.
        prev = path.with_name(path.name + ".prev")
        prev.unlink(missing_ok=True)
        os.link(path, prev)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint; a clear error names a missing or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(
            f"Checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}). "
            f"The previous checkpoint, if any, is {path.name}.prev."
        ) from err
    missing = {"sae", "sae_config", "optimizer", "tokens_seen"} - set(state)
    if missing:
        raise ValueError(f"Checkpoint {path} lacks {sorted(missing)}; not an mlsae checkpoint.")
    return state


def load_sae(path: str | Path, device: str = "cpu") -> MLSAE:
    """An SAE from a training checkpoint."""
    state = load_checkpoint(path)
    sae = MLSAE(**state["sae_config"])
    sae.load_state_dict(state["sae"])
    return sae.to(device)


def adam(params, lr: float, eps: float) -> torch.optim.Adam:
    """Adam (no weight decay) with PyTorch's fused kernel where it exists (CPU, CUDA).

    The fused kernel applies the same update as the default one in one pass over each tensor;
    on the 2-core CPU it is ~7x faster than the default at the MLSAE's size.
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=fused)


def as_source(data: ActivationCache | TrainingSource, cfg: TrainConfig) -> TrainingSource:
    """A cache read through ``cfg``'s shuffle buffer (its ``layers`` only), or ``data`` as given.

    A `TrainingSource` brings its own shuffle settings and layers (``cfg.layers`` must match).
    """
    if isinstance(data, ActivationCache):
        return TrainingSource(CacheSource(data, cfg.layers), cfg.train.shuffle_tokens, cfg.seed)
    return data


def train(
    cfg: TrainConfig,
    data: ActivationCache | TrainingSource,
    run_dir: str | Path,
    lens=None,
    resume: bool = True,
    progress: bool = True,
) -> MLSAE:
    """Train an SAE on residuals from a cache or a stream and return it.

    Args:
        cfg: hyperparameters.
        data: an `ActivationCache` (read through ``cfg.train.shuffle_tokens``), or a
            `mlsae.sources.TrainingSource` (a cache or the model run on the fly).
        run_dir: folder for ``checkpoint.pt`` and ``log.jsonl``.
        lens: optional `mlsae.lens.TunedLens`; the SAE then learns lens-space vectors.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists; the source is
            regenerated at the checkpoint's position (`mlsae.sources.shuffled_batches`).
        progress: show a tqdm bar.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    source = as_source(data, cfg)
    layers = cfg.layers if cfg.layers is not None else list(range(source.n_layers))
    if source.n_tokens is None and cfg.max_tokens is None:
        raise ValueError("A stream has no length: set a token budget (TrainConfig.max_tokens).")
    budget = min(t for t in (cfg.max_tokens, source.n_tokens) if t is not None)

    sae = build_sae(cfg, source.d_model).to(cfg.device)
    opt = adam(sae.parameters(), lr=cfg.train.lr, eps=cfg.train.adam_eps)
    tokens_seen, step = 0, 0
    prev_path = ckpt_path.with_name(ckpt_path.name + ".prev")
    if resume and not ckpt_path.exists() and prev_path.exists():
        logger.warning("No %s but %s exists; resuming from it", ckpt_path, prev_path)
        os.replace(prev_path, ckpt_path)
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if not same_run(state.get("train_config", {}), asdict(cfg)):
            stale = ckpt_path.with_name("checkpoint.stale.pt")
            logger.warning("%s was trained with other settings; moved to %s", ckpt_path, stale)
            os.replace(ckpt_path, stale)
            resume = False
    if resume and ckpt_path.exists():
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
        tokens_seen, step = state["tokens_seen"], state["step"]
        logger.info("Resumed %s at %d tokens (step %d)", ckpt_path, tokens_seen, step)
        if log_path.exists():  # drop rows logged after the checkpoint: they will be redone
            rows = [r for r in read_log(run_dir) if r["step"] <= step]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif log_path.exists():
        log_path.unlink()

    def checkpoint(path: Path = ckpt_path, optimizer: bool = True) -> None:
        save_checkpoint(
            path,
            {
                "sae": sae.state_dict(),
                "sae_config": sae.config(),
                "optimizer": opt.state_dict() if optimizer else None,
                "train_config": asdict(cfg),
                "layers": layers,
                "tokens_seen": tokens_seen,
                "step": step,
                "budget": budget,
            },
        )

    # SAEs kept for analysis at these training lengths (a snapshot: a checkpoint without the
    # optimizer, so `load_sae` reads it); one already written is kept on resume.
    snapshots = sorted(t for t in cfg.train.snapshot_tokens if tokens_seen < t < budget)

    rank, world = dist_info()
    step_tokens = cfg.train.batch_tokens * cfg.train.grad_accum * world
    if not bool(sae.b_pre_initialized):
        # Every rank initialises b_pre from the same first batch, so no broadcast is needed.
        x0 = next(source.batches(cfg.train.batch_tokens)).to(cfg.device)  # rank 0's first batch
        if lens is not None:
            with torch.no_grad():
                x0 = lens.transform_layers(x0, layers)
        sae.init_b_pre_(sae.preprocess(x0)[0])
    module = sae
    if world > 1:
        # Buffers (dead-latent counters) are reduced by hand at each step, not broadcast.
        module = torch.nn.parallel.DistributedDataParallel(sae, broadcast_buffers=False)
    micro = source.batches(cfg.train.batch_tokens, step * cfg.train.grad_accum, rank, world)
    next_ckpt = _next_multiple(tokens_seen, cfg.train.checkpoint_tokens)
    show = progress and rank == 0
    bar = tqdm(total=budget, initial=tokens_seen, unit="tok", desc="train", disable=not show)
    sae.train()
    t0 = time.time()
    log = open(log_path, "a") if rank == 0 else None
    try:
        while tokens_seen + step_tokens <= budget:
            opt.zero_grad(set_to_none=True)
            fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=cfg.device)
            losses = torch.zeros(2, device=cfg.device)  # summed FVU and AuxK of the micro-batches
            for a in range(cfg.train.grad_accum):
                x = next(micro, None)
                # An incomplete step is dropped (a 1-token single-layer batch has no variance);
                # every rank stops together, since ranks' parts of a stream may differ in length.
                if _any_rank(x is None or x.shape[1] < cfg.train.batch_tokens, cfg.device):
                    raise _EndOfData
                x = x.to(cfg.device)  # (layer, token, d_model)
                if _any_rank(not torch.isfinite(x).all(), cfg.device):
                    raise NonFiniteError(
                        f"NaN/inf in activations at step {step} (tokens {tokens_seen}); "
                        f"last good checkpoint: {ckpt_path if ckpt_path.exists() else 'none'}."
                    )
                if lens is not None:
                    with torch.no_grad():  # the lens is fixed: no graph through its weights
                        x = lens.transform_layers(x, layers)
                sync = world == 1 or a == cfg.train.grad_accum - 1
                with nullcontext() if sync else module.no_sync():
                    out = module(x)
                    if _any_rank(not torch.isfinite(out.loss), cfg.device):
                        raise NonFiniteError(
                            f"Non-finite loss at step {step} (tokens {tokens_seen}); last good "
                            f"checkpoint: {ckpt_path if ckpt_path.exists() else 'none'}."
                        )
                    (out.loss / cfg.train.grad_accum).backward()
                fired |= sae.fired_mask(out.indices, out.values)
                losses += torch.stack([out.fvu.detach(), out.auxk_loss.detach()])
            if world > 1:  # a latent fired if it fired on any rank
                fired_int = fired.int()
                torch.distributed.all_reduce(fired_int, op=torch.distributed.ReduceOp.MAX)
                fired = fired_int.bool()
            sae.remove_parallel_grad_()
            for group in opt.param_groups:
                group["lr"] = cfg.train.lr * lr_factor(
                    tokens_seen, budget, cfg.train.lr_warmup_tokens, cfg.train.lr_decay
                )
            opt.step()
            sae.normalize_decoder_()
            sae.advance_dead_(fired, step_tokens)
            tokens_seen += step_tokens
            step += 1
            bar.update(step_tokens)
            if step % cfg.log_every == 0 or tokens_seen >= budget:  # the same steps on every rank
                # the step's mean over its micro-batches and, under DDP, over the ranks
                if world > 1:
                    torch.distributed.all_reduce(losses)
                means = losses.double().cpu() / (cfg.train.grad_accum * world)
                row = {
                    "step": step,
                    "tokens": tokens_seen,
                    "fvu": means[0].item(),
                    "auxk": means[1].item(),
                    "dead_fraction": sae.dead_fraction(),
                    "seconds": round(time.time() - t0, 2),
                }
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.set_postfix(fvu=f"{row['fvu']:.4f}", dead=f"{row['dead_fraction']:.3f}")
            while snapshots and tokens_seen >= snapshots[0]:
                if rank == 0:
                    checkpoint(snapshot_file(run_dir, snapshots[0]), optimizer=False)
                snapshots.pop(0)
            if next_ckpt is not None and tokens_seen >= next_ckpt:
                if rank == 0:
                    checkpoint()
                next_ckpt = _next_multiple(tokens_seen, cfg.train.checkpoint_tokens)
    except _EndOfData:
        if budget - tokens_seen >= step_tokens:  # more than the last, incomplete step is missing
            logger.warning(
                "The training data ended after %d tokens, before the budget of %d "
                "(train_tokens): this run trained on %d tokens.",
                tokens_seen,
                budget,
                tokens_seen,
            )
    finally:
        if log is not None:
            log.close()
        bar.close()
    if rank == 0:
        checkpoint()
    if world > 1:
        torch.distributed.barrier()
    return sae.eval()


class _EndOfData(Exception):
    """The source ran out before the budget: the last, incomplete step is dropped."""


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` holds on any rank (so that every rank raises together)."""
    if dist_info()[1] == 1:
        return bool(flag)
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


RESUMABLE_CHANGES = {
    "max_tokens", "checkpoint_tokens", "epochs", "log_every", "device", "snapshot_tokens",
}  # fmt: skip
"""Settings a run may change between resumes; any other change starts the run afresh."""


def same_run(saved: dict, current: dict) -> bool:
    """Whether a checkpoint's training config describes the same run as ``current``."""
    saved, current = flatten_config(saved), flatten_config(current)
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    if current.get("lr_decay", "none") != "none":
        keys.add("max_tokens")  # the decay is a function of the budget
    return all(saved.get(k) == current.get(k) for k in keys)


def _next_multiple(tokens: int, every: int | None) -> int | None:
    return None if every is None else (tokens // every + 1) * every


def read_log(run_dir: str | Path) -> list[dict]:
    """The JSON-lines training log of a run."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def init_distributed(device: str) -> str:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device
