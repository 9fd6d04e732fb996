"""Encoders whose model code lives in a package that is not a core dependency.

- CONCH (MahmoodLab/conch): a CoCa whose image tower is a timm ViT-B/16 with an attentional
  pooler; its key layout does not match open_clip's CoCa, so it needs the ``conch`` package.
- Phikon-v2 (owkin/phikon-v2): a Hugging Face ``transformers`` Dinov2 model.

Both stay registered with their cfgs (listings, fingerprints, docs); building one without its
package raises :class:`MissingDependency` naming the package. These two loaders cannot be run in
this workplace (neither package nor weights are available) and are kept minimal.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from embedstore.encoders._base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Encoder,
    EncoderCfg,
    register_encoder,
    resolve_weights,
    weights_fingerprint,
)
from embedstore.errors import MissingDependency

LOG = logging.getLogger(__name__)

CONCH_CFG = EncoderCfg(
    name="conch",
    family="conch",
    architecture="conch_ViT-B-16",
    dim=512,
    hf_hub_id="MahmoodLab/conch",
    filename="pytorch_model.bin",
    input_size=448,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    interpolation="bicubic",
    target_mpp=0.5,
    license="CC-BY-NC-ND-4.0",
    gated=True,
    pooling="pooled",
    source="hf-hub:MahmoodLab/conch",
    requires="conch (pip install git+https://github.com/Mahmoodlab/CONCH.git)",
)

PHIKON_V2_CFG = EncoderCfg(
    name="phikon-v2",
    family="hf_transformers",
    architecture="dinov2-vitl16",
    dim=1024,
    hf_hub_id="owkin/phikon-v2",
    filename="model.safetensors",
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bicubic",
    target_mpp=0.5,
    license="Owkin non-commercial",
    gated=False,
    pooling="token",
    source="hf-hub:owkin/phikon-v2",
    requires="transformers",
)


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


_WRAPPERS: dict[str, Any] = {}


def _wrapper(kind: str) -> Any:
    """nn.Module wrappers returning ``(B, dim)``; defined on first use so torch stays lazy."""
    if not _WRAPPERS:
        import torch

        class ConchImage(torch.nn.Module):
            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: Any) -> Any:
                # the pre-projection pooled embedding, as the CONCH authors use for tile features
                return self.model.encode_image(x, proj_contrast=False, normalize=False)

        class HFClassToken(torch.nn.Module):
            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: Any) -> Any:
                return self.model(pixel_values=x).last_hidden_state[:, 0]

        _WRAPPERS.update(conch=ConchImage, hf=HFClassToken)
    return _WRAPPERS[kind]


@register_encoder("conch", cfg=CONCH_CFG)
def create_conch(weights: Any = None) -> Encoder:
    """Build CONCH's image encoder (needs the ``conch`` package)."""
    lib = _conch_module()
    path, source = resolve_weights(CONCH_CFG, weights)
    model, _ = lib.create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(path))
    return Encoder(CONCH_CFG, _wrapper("conch")(model).eval(), weights_fingerprint(CONCH_CFG, path), source)


@register_encoder("phikon-v2", cfg=PHIKON_V2_CFG)
def create_phikon_v2(weights: Any = None) -> Encoder:
    """Build Phikon-v2 (needs ``transformers``; the class token of the last layer)."""
    from embedstore._optional import import_optional

    transformers = import_optional("transformers", "encoder phikon-v2")
    path, source = resolve_weights(PHIKON_V2_CFG, weights)
    folder = Path(path).parent  # transformers reads config.json beside the weights
    if not (folder / "config.json").is_file() and weights is None:
        import huggingface_hub

        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        huggingface_hub.hf_hub_download(PHIKON_V2_CFG.hf_hub_id, "config.json", local_files_only=offline)
    model = transformers.AutoModel.from_pretrained(str(folder))
    return Encoder(PHIKON_V2_CFG, _wrapper("hf")(model).eval(), weights_fingerprint(PHIKON_V2_CFG, path), source)
