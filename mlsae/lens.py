r"""Tuned lens (Belrose et al. 2023): per-layer affine translators and their exact inverse.

Layout follows the tuned-lens project: ``translators[i]`` is an ``nn.Linear(d_model, d_model)`` that
acts on ``blocks.{i}.hook_resid_pre`` (HF ``hidden_states[i]``; index 0 is the embeddings), saved as
``params.pt`` with keys ``{i}.weight``, ``{i}.bias`` beside a ``config.json``.

The paper (eq. 8) transforms the output of block l before the SAE and inverts after the decoder:

.. math::  x' = x + W x + b, \qquad x = (I + W)^{-1} (x' - b)      \quad (9)

The output of block l is ``blocks.{l+1}.hook_resid_pre``, so it takes translator ``l + 1``; the last
block's output is what the model unembeds, so it takes the identity. (The original code used
translator l, off by one, NOTES.md defect 2, and inverted with only the diagonal of
:math:`(I + W)^{-1}`, defect 1.) The inverse is computed once per layer in float64 and cached; a
singular or badly conditioned :math:`I + W` is an error.

The lens's KL to the model's own next-token distribution is `mlsae.lens_kl`; fitting a lens
(least-squares start, KL training, condition cap) is `mlsae.lens_training`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mlsae.config import HUB_REPO

MAX_CONDITION = 1e6
"""Largest cond(I + W) `TunedLens.inverse_matrix` accepts."""


class TunedLens(nn.Module):
    """Per-layer residual translators ``x -> x + W_i x + b_i``, zero-initialised (identity).

    Args:
        d_model: residual width.
        n_layers: number of transformer blocks; translators ``0 .. n_layers - 1``.
    """

    def __init__(self, d_model: int, n_layers: int, base_model: str = ""):
        super().__init__()
        self.d_model, self.n_layers, self.base_model = d_model, n_layers, base_model
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self._inverse: dict[int, torch.Tensor] = {}

    # -- the map for block outputs ----------------------------------------------------------------
    def translator_index(self, layer: int) -> int | None:
        """Translator for block ``layer``'s output: ``layer + 1``, or None (identity) if last."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a {self.n_layers}-layer lens.")
        return layer + 1 if layer + 1 < self.n_layers else None

    def transform(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``(..., d)`` output of block ``layer`` -> lens space."""
        i = self.translator_index(layer)
        return x if i is None else x + self.translators[i](x)

    def inverse_matrix(self, layer: int) -> torch.Tensor:
        """``(I + W)^{-T}`` for block ``layer``'s output, computed once (float64), cached."""
        if layer not in self._inverse:
            i = self.translator_index(layer)
            eye = torch.eye(self.d_model, dtype=torch.float64, device=self.device)
            if i is None:
                self._inverse[layer] = eye
            else:
                m = eye + self.translators[i].weight.detach().double()
                cond = torch.linalg.cond(m).item()
                if not cond < MAX_CONDITION:  # also catches inf/nan (singular)
                    raise ValueError(
                        f"Lens translator {i} (output of block {layer}) is singular or badly "
                        f"conditioned: cond(I + W) = {cond:.3g} >= {MAX_CONDITION:.0e}."
                    )
                self._inverse[layer] = torch.linalg.inv(m).T
        return self._inverse[layer]

    def invert(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Lens space -> ``(..., d)`` output of block ``layer``: ``(x' - b) (I + W)^{-T}``."""
        i = self.translator_index(layer)
        if i is None:
            return x
        # float64 for the solve: the round trip must hold to ~1e-6, not to float32 * cond.
        bias = self.translators[i].bias.detach().double()
        return ((x.double() - bias) @ self.inverse_matrix(layer)).to(x.dtype)

    def transform_layers(self, x: torch.Tensor, layers: torch.Tensor | list[int]) -> torch.Tensor:
        """``(layer, token, d)`` -> lens space, ``x[j]`` being the output of block ``layers[j]``."""
        return torch.stack([self.transform(x[j], int(ly)) for j, ly in enumerate(layers)])

    def invert_layers(self, x: torch.Tensor, layers: torch.Tensor | list[int]) -> torch.Tensor:
        """Inverse of `transform_layers`."""
        return torch.stack([self.invert(x[j], int(ly)) for j, ly in enumerate(layers)])

    def clear_cache(self) -> None:
        """Forget cached inverses (call after changing the weights)."""
        self._inverse.clear()

    @property
    def device(self) -> torch.device:
        """Device of the translators."""
        return self.translators[0].weight.device

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``params.pt`` (tuned-lens layout) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "base_model_name_or_path": self.base_model,
            "d_model": self.d_model,
            "num_hidden_layers": self.n_layers,
            "bias": True,
            "lens_type": "linear_tuned_lens",
        }
        (path / "config.json").write_text(json.dumps(config, indent=1))
        torch.save(
            {k: v.cpu() for k, v in self.translators.state_dict().items()}, path / "params.pt"
        )
        return path

    @classmethod
    def load(cls, path_or_model: str | Path, lens_dir: str | Path | None = None) -> TunedLens:
        """Load a lens from a folder, from ``lens_dir/lens/<model id>``, or from the hub.

        Args:
            path_or_model: a folder with ``config.json`` and ``params.pt``, or a model id such as
                ``EleutherAI/pythia-70m-deduped``.
            lens_dir: a local root laid out like the published lenses (``lens/<model id>/``).

        Raises:
            FileNotFoundError: when no lens is found locally and the hub cannot provide one.
        """
        folder = Path(path_or_model)
        if not (folder / "params.pt").exists() and lens_dir is not None:
            folder = Path(lens_dir) / "lens" / str(path_or_model)
        if (folder / "params.pt").exists() and (folder / "config.json").exists():
            return cls._from_files(folder / "config.json", folder / "params.pt")
        try:
            from huggingface_hub import hf_hub_download

            kw = dict(repo_id=HUB_REPO, repo_type="space")
            cfg = hf_hub_download(filename=f"lens/{path_or_model}/config.json", **kw)
            params = hf_hub_download(filename=f"lens/{path_or_model}/params.pt", **kw)
        except Exception as err:
            raise FileNotFoundError(
                f"No tuned lens for {path_or_model!r}: no config.json + params.pt in {folder}, and "
                f"the hub ({HUB_REPO}) could not provide one ({type(err).__name__}). Train one "
                "with mlsae.lens_training.train_lens (params.yaml: lens.train: true)."
            ) from err
        return cls._from_files(Path(cfg), Path(params))

    @classmethod
    def _from_files(cls, config_file: Path, params_file: Path) -> TunedLens:
        config = json.loads(config_file.read_text())
        lens = cls(
            config["d_model"],
            config["num_hidden_layers"],
            config.get("base_model_name_or_path", ""),
        )
        try:
            state = torch.load(params_file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"Lens parameters {params_file} are unreadable: {err}") from err
        lens.translators.load_state_dict(state)
        return lens


def random_lens(d_model: int, n_layers: int, scale: float = 0.3, seed: int = 0) -> TunedLens:
    """A lens with random, non-small translators (for tests of the inverse)."""
    gen = torch.Generator().manual_seed(seed)
    lens = TunedLens(d_model, n_layers)
    with torch.no_grad():
        for t in lens.translators:
            t.weight.copy_(torch.randn(d_model, d_model, generator=gen) * scale / d_model**0.5)
            t.bias.copy_(torch.randn(d_model, generator=gen))
    return lens
