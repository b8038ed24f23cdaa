"""Command line: ``python -m mlsae train RUN``, ``verify`` and ``preset FILE``.

``train`` trains one sweep entry of a params file; ``verify`` compares regenerated results with
the committed ones (`mlsae.verify`); ``preset`` prints the ``dvc exp run -S`` arguments that
switch params.yaml to a preset file (`mlsae.presets`).

Under ``torchrun --nproc_per_node N -m mlsae train RUN`` the run is data-parallel over N
processes. The source (cache or stream) and every setting come from the params file.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from mlsae import config, pipeline
from mlsae.train import init_distributed, train


def train_command(args: argparse.Namespace) -> None:
    """Train sweep entry ``args.run`` from the source ``train.source`` names."""
    params = config.load(args.params)
    device = init_distributed(params.base.device)
    lens, lens_sha = pipeline.run_lens(params, args.run, args.out, device)
    cfg = replace(pipeline.train_config(params, args.run, lens_sha=lens_sha), device=device)
    source = pipeline.training_source(params, args.out, device=device)
    run_dir = args.run_dir or Path(args.out) / params.base.cache_dir / "runs" / args.run
    train(cfg, source, run_dir, lens=lens, progress=not args.no_progress)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def verify_command(args: argparse.Namespace) -> None:
    """Print what moved beyond the tolerance; exit 1 if anything did."""
    from mlsae.verify import verify

    changes = verify(args.root, args.rev, args.rtol, args.atol)
    print(
        "\n".join(changes)
        or f"results agree with {args.rev} within rtol {args.rtol}, atol {args.atol}"
    )
    if changes:
        raise SystemExit(1)


def preset_command(args: argparse.Namespace) -> None:
    """Print the -S arguments for ``dvc exp run``."""
    from mlsae.presets import preset_arguments

    config.load(args.preset)  # a preset with a typo fails here, not halfway through a run
    print(preset_arguments(args.params, args.preset))


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run the command."""
    parser = argparse.ArgumentParser(prog="python -m mlsae", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train one sweep entry")
    p.add_argument("run", help="sweep entry to train (a key of `sweep` in the params file)")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--out", default=".", help="root of cache/ (as the pipeline lays it out)")
    p.add_argument("--run-dir", default=None, help="checkpoint folder (default: the run's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=train_command)
    v = commands.add_parser("verify", help="compare results/ with a git revision, within tolerance")
    v.add_argument("--root", default=".")
    v.add_argument("--rev", default="HEAD")
    v.add_argument("--rtol", type=float, default=0.02)
    v.add_argument("--atol", type=float, default=0.005)
    v.set_defaults(func=verify_command)
    s = commands.add_parser("preset", help="print dvc exp run -S arguments for a preset file")
    s.add_argument("preset", help="a params file, e.g. params-paper.yaml")
    s.add_argument("--params", default="params.yaml", help="the params file DVC edits")
    s.set_defaults(func=preset_command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    args.func(args)
