"""Command line: ``python -m mlsae train RUN``, ``verify``, ``preset``, ``export-layers``, ...

``train`` trains one sweep entry of a params file; ``verify`` compares regenerated results with
the committed ones (`mlsae.verify`); ``preset`` prints the ``dvc exp run -S`` arguments that
switch params.yaml to a preset file (`mlsae.presets`); ``export-layers`` writes a trained run as one
SAELens SAE per layer (`mlsae.saelens.save_layer_views`); ``plots-template`` writes a
``dvc plots show`` template that renders without internet access (`mlsae.dvcplots`); ``deps``
prints (``--write``: puts into dvc.yaml) each stage's ``mlsae/`` dependencies (`mlsae.stagedeps`).

Under ``torchrun --nproc_per_node N -m mlsae train RUN`` the run is data-parallel over N
processes. The source (cache or stream) and every setting come from the params file.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from mlsae import config, hub_import, imported, paths, readme_catalogue, saelens, stagedeps
from mlsae.activations import ActivationCache
from mlsae.dvcplots import offline_template
from mlsae.presets import preset_arguments
from mlsae.stages.runs import run_lens, sweep_entry
from mlsae.stages.train import train_config, training_source
from mlsae.train import init_distributed, load_checkpoint, load_sae, train
from mlsae.verify import run_settings, verify


def train_command(args: argparse.Namespace) -> None:
    """Train sweep entry ``args.run`` from the source ``train.source`` names."""
    params = config.load(args.params)
    device = init_distributed(params.base.device)
    lens, lens_sha = run_lens(params, args.run, args.out, device)
    cfg = replace(train_config(params, args.run, lens_sha=lens_sha), device=device)
    source = training_source(params, args.out, device=device)
    run_dir = args.run_dir or Path(args.out) / params.base.cache_dir / "runs" / args.run
    train(cfg, source, run_dir, lens=lens, progress=not args.no_progress)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def verify_command(args: argparse.Namespace) -> None:
    """Print what moved beyond the tolerance; exit 1 if anything did."""
    changes, settings = run_settings(verify(args.root, args.rev, args.rtol, args.atol))
    if settings:
        print(f"recorded run settings that differ from {args.rev} (not results):")
        print("\n".join(f"  {c}" for c in settings))
    print(
        "\n".join(changes)
        or f"results agree with {args.rev} within rtol {args.rtol}, atol {args.atol}"
    )
    if changes:
        raise SystemExit(1)


def preset_command(args: argparse.Namespace) -> None:
    """Print the -S arguments for ``dvc exp run``."""
    config.load(args.preset)  # a preset with a typo fails here, not halfway through a run
    print(preset_arguments(args.params, args.preset))


def export_layers_command(args: argparse.Namespace) -> None:
    """Write ``<out>/<run>/layer_<L>`` SAELens views of a trained run (or its snapshot).

    ``--tokens N``: the run's training snapshot at N tokens, into ``<run>@<N>``. ``--baselines``:
    each single-layer baseline SAE (stage ``train_baselines``) at its own layer, into
    ``baselines/layer_<L>``.
    """
    params = config.load(args.params)
    root = Path(args.out or Path(args.root) / params.base.cache_dir / "saelens")
    if args.baselines:
        folder = paths.baselines_dir(params, args.root)
        ckpts = sorted(folder.glob("layer-*/checkpoint.pt"))
        if not ckpts:
            raise SystemExit(f"No baseline checkpoints in {folder}: run stage train_baselines.")
        for ckpt in ckpts:
            layer = int(ckpt.parent.name.removeprefix("layer-"))
            views = saelens.save_layer_views(
                load_sae(ckpt),
                root / "baselines",
                params.base.model,
                [layer],
                extra={"run": f"baseline layer {layer}"},
            )
            print(f"{views[0]}: single-layer baseline at layer {layer}")
        return
    entry = sweep_entry(params, args.run)
    if entry.lens:
        raise SystemExit(saelens.LENS_ERROR)
    ckpt = paths.run_dir(params, args.run, args.root) / "checkpoint.pt"
    layers = load_checkpoint(ckpt)["train_config"].get("layers")
    name = paths.snapshot_name(args.run, args.tokens)
    if args.tokens is not None:
        ckpt = paths.snapshot_path(params, args.run, args.tokens, args.root)
    sae = load_sae(ckpt)
    if layers is None:  # every layer: as many as the test cache holds
        layers = list(
            range(
                args.n_layers
                or ActivationCache(paths.cache_paths(params, args.root)["test"]).n_layers
            )
        )
    views = saelens.save_layer_views(
        sae, root / name, params.base.model, list(layers), extra={"run": name}
    )
    print(f"{len(views)} SAELens views of {name} in {root / name}")


def readme_command(args: argparse.Namespace) -> None:
    """Rewrite (--check: compare) the README's catalogue from results/ (`readme_catalogue`)."""
    fresh = readme_catalogue.write(args.params, args.root, check=args.check)
    if args.check and not fresh:
        raise SystemExit("README.md: the catalogue differs from results/ (python -m mlsae readme)")
    print("README.md: catalogue " + ("up to date" if fresh else "rewritten from results/"))


def deps_command(args: argparse.Namespace) -> None:
    """Print each stage's mlsae/ deps (its notebook's imports); --write: into dvc.yaml."""
    if args.write:
        changed = stagedeps.write_dvc_yaml(Path(args.root))
        print(f"dvc.yaml: mlsae/ deps rewritten for {', '.join(changed) or 'no stage'}")
        return
    for stage, files in stagedeps.expected_deps(Path(args.root)).items():
        print(f"{stage}: {' '.join(files)}")


def import_hub_command(args: argparse.Namespace) -> None:
    """Read a published MLSAE (and, with --dists, its -dists statistics) into our formats."""
    out = Path(args.out)
    if args.dists:
        stats, info = hub_import.read_dists(args.source)
        out.mkdir(parents=True, exist_ok=True)
        stats.save(out / "latent_stats.pt")
        print(
            f"{out / 'latent_stats.pt'}: {info['n_layers']} layers x {info['n_latents']} latents; "
            f"layer_std recomputed within {info['layer_std_max_abs_diff']:.2e} of the dataset's"
        )
        return
    sae, info = hub_import.import_mlsae(args.source)
    path = imported.save_imported(sae, info, out)
    lo, hi = info["decoder_norm_range"]
    print(
        f"{path}: d={sae.d_model}, n={sae.n_latents}, k={sae.k} from {info['source']} "
        f"(keys{' under autoencoder.' if info['tfm'] else ''}; decoder norms {lo:.6f}-{hi:.6f}, "
        f"kept as stored){'; reads tuned-lens residuals' if info['lens'] else ''}"
    )


def evaluate_imported_command(args: argparse.Namespace) -> None:
    """Our held-out metrics of an imported SAE on the model and test cache of ``--params``."""
    params = config.load(args.params)
    result = imported.evaluate_imported(params, args.checkpoint, args.root, args.out)
    m = {k: float("nan") for k in ("delta_ce", "delta_ce_se")} | result["mean"]
    print(
        f"{args.out}: FVU {m['fvu']:.4f} (paper's definition {m['fvu_paper']:.4f}), "
        f"delta CE {m['delta_ce']:.4f} +- {m['delta_ce_se']:.4f}"
    )


def plots_template_command(args: argparse.Namespace) -> None:
    """Write the offline template for ``dvc plots show --html-template``."""
    print(offline_template(args.path))


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
    e = commands.add_parser("export-layers", help="a trained run as one SAELens SAE per layer")
    e.add_argument(
        "run",
        nargs="?",
        default=None,
        help="a sweep entry (lens runs cannot be expressed in SAELens)",
    )
    e.add_argument("--params", default="params.yaml")
    e.add_argument("--root", default=".", help="root of cache/")
    e.add_argument("--out", default=None, help="folder (default <cache_dir>/saelens)")
    e.add_argument("--tokens", type=int, default=None, help="the run's snapshot at N tokens")
    e.add_argument(
        "--baselines", action="store_true", help="the single-layer baselines instead of a run"
    )
    e.add_argument("--n-layers", type=int, default=None, help="layers, if not in the checkpoint")
    e.set_defaults(func=export_layers_command)
    d = commands.add_parser(
        "deps", help="each DVC stage's mlsae/ deps, from its notebook's imports"
    )
    d.add_argument("--root", default=".", help="the repository")
    d.add_argument("--write", action="store_true", help="rewrite them in dvc.yaml")
    d.set_defaults(func=deps_command)
    r = commands.add_parser("readme", help="the README's catalogue, generated from results/")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--root", default=".", help="the repository")
    r.add_argument("--check", action="store_true", help="fail if the README differs")
    r.set_defaults(func=readme_command)
    h = commands.add_parser(
        "import-hub", help="an MLSAE published by the paper's authors, into our checkpoint format"
    )
    h.add_argument("source", help="hub repo id (tim-lawson/mlsae-...) or a local folder")
    h.add_argument("--out", required=True, help="folder for checkpoint.pt (or latent_stats.pt)")
    h.add_argument("--dists", action="store_true", help="source is a -dists dataset")
    h.set_defaults(func=import_hub_command)
    ei = commands.add_parser(
        "evaluate-imported", help="our metrics of an imported SAE (import-hub) on held-out text"
    )
    ei.add_argument("checkpoint", help="checkpoint.pt written by import-hub")
    ei.add_argument("--params", default="params.yaml", help="the model, test cache and eval")
    ei.add_argument("--root", default=".", help="root of cache/")
    ei.add_argument("--out", required=True, help="JSON file for the result")
    ei.set_defaults(func=evaluate_imported_command)
    t = commands.add_parser("plots-template", help="dvc plots HTML template that works offline")
    t.add_argument("path", nargs="?", default="dvc_plots/offline_template.html")
    t.set_defaults(func=plots_template_command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    args.func(args)
