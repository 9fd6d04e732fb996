"""Model code of encoders whose library is not a core dependency.

- CONCH (MahmoodLab/conch): a CoCa whose image tower is a timm ViT-B/16 with an attentional
  pooler; its key layout does not match open_clip's CoCa, so it needs the ``conch`` package.
- Phikon-v2 (owkin/phikon-v2): a Hugging Face ``transformers`` Dinov2 model.

Both stay registered with their cfgs (``_catalog``: listings, fingerprints, docs); building one
without its package raises :class:`MissingDependency` naming the package. These two loaders
cannot be run in this workplace (neither package nor weights are available) and are kept
minimal. Imported only when one of them is created.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from embedstore._optional import import_optional
from embedstore.encoders._config import EncoderCfg, weights_fingerprint
from embedstore.encoders._runtime import Encoder
from embedstore.encoders._weights import resolve_weights
from embedstore.errors import MissingDependency


class ConchImage(torch.nn.Module):
    """CONCH's image encoder; returns the pre-projection pooled embedding, as its authors use for tiles."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


class HFClassToken(torch.nn.Module):
    """A Hugging Face vision model; returns the class token of its last layer."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


def _conch_module() -> Any:
    try:
        from conch import open_clip_custom  # type: ignore[import-not-found]
    except ImportError as e:
        msg = (
            "conch is needed for encoder conch (its image tower does not map onto open_clip's CoCa); "
            "pip install git+https://github.com/Mahmoodlab/CONCH.git"
        )
        raise MissingDependency(msg) from e
    return open_clip_custom


def create_conch(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Build CONCH's image encoder (needs the ``conch`` package)."""
    lib = _conch_module()
    path, source = resolve_weights(cfg, weights)
    model, _ = lib.create_model_from_pretrained(cfg.architecture, checkpoint_path=str(path))
    return Encoder(cfg, ConchImage(model).eval(), weights_fingerprint(cfg, path), source)


def create_hf_class_token(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Build a ``transformers`` model (Phikon-v2) whose embedding is the last layer's class token."""
    transformers = import_optional("transformers", f"encoder {cfg.name}")
    path, source = resolve_weights(cfg, weights)
    folder = Path(path).parent  # transformers reads config.json beside the weights
    if not (folder / "config.json").is_file() and weights is None:
        import huggingface_hub

        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        huggingface_hub.hf_hub_download(cfg.hf_hub_id, "config.json", local_files_only=offline)
    model = transformers.AutoModel.from_pretrained(str(folder))
    return Encoder(cfg, HFClassToken(model).eval(), weights_fingerprint(cfg, path), source)


def create(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Build the registered encoder of ``cfg`` (family ``conch`` or ``hf_transformers``)."""
    builder = {"conch": create_conch, "hf_transformers": create_hf_class_token}[cfg.family]
    return builder(cfg, weights)
