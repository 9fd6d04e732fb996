"""timm-family encoders: pathology ViTs on the Hugging Face hub, their tiny test variants, and ``timm:<arch>``.

Each registered model names a timm architecture and the keyword arguments its authors publish
(UNI, UNI2-h, Virchow2, H-optimus-0/1, Prov-GigaPath). The model is built with random weights
and the state dict is loaded from the resolved file (safetensors or ``torch.load(weights_only=True)``),
so the same code path serves hub, local folder and the random test variants.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from embedstore.encoders._base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderCfg,
    load_into,
    load_state_dict,
    register_encoder,
    resolve_weights,
    seeded,
    weights_fingerprint,
)
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


def _swiglu() -> dict[str, Any]:
    """Packed SwiGLU MLP with SiLU (Virchow2, UNI2-h), imported lazily."""
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _uni() -> dict[str, Any]:
    return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}


def _uni2() -> dict[str, Any]:
    return {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "no_embed_class": True,
        "reg_tokens": 8,
        "dynamic_img_size": True,
        **_swiglu(),
    }


def _virchow2() -> dict[str, Any]:
    return {
        "img_size": 224,
        "init_values": 1e-5,
        "mlp_ratio": 5.3375,
        "reg_tokens": 4,
        "global_pool": "",
        "dynamic_img_size": True,
        **_swiglu(),
    }


def _hoptimus() -> dict[str, Any]:
    # vit_giant_patch14_reg4_dinov2 already has SwiGLU, 4 registers and no_embed_class; the
    # published model runs at 224 px with layer scale
    return {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}


def _gigapath() -> dict[str, Any]:
    return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "mlp_ratio": 5.33334}


def _test_vit() -> dict[str, Any]:
    return {"img_size": 224, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}


def _test_virchow() -> dict[str, Any]:
    # the Virchow2 path at toy size: SwiGLU, 4 registers, class + mean-of-patches pooling -> 2 x 32
    return {
        "img_size": 112,
        "patch_size": 14,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1e-5,
        "mlp_ratio": 5.3375,
        "reg_tokens": 4,
        "global_pool": "",
        "dynamic_img_size": True,
        **_swiglu(),
    }


def _test_uni2() -> dict[str, Any]:
    # the UNI2-h path at toy size: registers without position embeddings, SwiGLU
    return {**_uni2(), "img_size": 112, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}


# name -> (cfg, architecture kwargs); filled by _add below
TIMM_MODELS: dict[str, tuple[EncoderCfg, Callable[[], dict[str, Any]]]] = {}


_POOLED_CLASS: list[Any] = []


def _pooled(trunk: Any, pooling: str) -> Any:
    """Wrap a timm model so that calling it returns the pooled ``(B, dim)`` embedding."""
    if not _POOLED_CLASS:  # defined on first use so that torch is imported lazily
        import torch

        class PooledViT(torch.nn.Module):
            """A timm trunk plus the pooling its authors use."""

            def __init__(self, trunk: Any, pooling: str) -> None:
                super().__init__()
                self.trunk = trunk
                self.pooling = pooling

            def forward(self, x: Any) -> Any:
                if self.pooling == "cls_mean":
                    tokens = self.trunk.forward_features(x)
                    # register tokens sit between the class token and the patches: skip all prefixes
                    patches = tokens[:, self.trunk.num_prefix_tokens :].mean(dim=1)
                    return torch.cat([tokens[:, 0], patches], dim=-1)
                return self.trunk(x)

        _POOLED_CLASS.append(PooledViT)
    return _POOLED_CLASS[0](trunk, pooling)


def build_timm_model(cfg: EncoderCfg, kwargs: dict[str, Any], device: Any = None) -> Any:
    """Build the pooled timm model of ``cfg`` with random weights (seeded when ``cfg.seed`` is set).

    Parameters
    ----------
    cfg
        Encoder configuration; ``cfg.architecture`` is the timm model name.
    kwargs
        Architecture keyword arguments for ``timm.create_model``.
    device
        Build on this device (``"meta"`` checks shapes without allocating).
    """
    import torch

    from embedstore._optional import import_optional

    timm = import_optional("timm", f"encoder {cfg.name}")
    with seeded(cfg.seed), torch.device(device or "cpu"):
        trunk = timm.create_model(cfg.architecture, pretrained=False, num_classes=0, **kwargs)
    model = _pooled(trunk, cfg.pooling)
    return model.eval()


def create_timm_encoder(cfg: EncoderCfg, kwargs: dict[str, Any], weights: Any = None) -> Encoder:
    """Resolve weights, build the model, load the state dict, fingerprint it."""
    path, source = resolve_weights(cfg, weights)  # first: a missing file fails before building a giant model
    model = build_timm_model(cfg, kwargs)
    if path is not None:
        sd = load_state_dict(path)
        load_into(model.trunk, sd, str(path), cfg.name, ignore=("head.",))  # classifier heads are unused
    cnn = not cfg.architecture.startswith(("vit", "eva", "deit"))
    return Encoder(cfg, model, weights_fingerprint(cfg, path), source, channels_last=cnn)


def _add(cfg: EncoderCfg, kwargs: Callable[[], dict[str, Any]]) -> None:
    TIMM_MODELS[cfg.name] = (cfg, kwargs)

    def factory(weights: Any = None) -> Encoder:
        return create_timm_encoder(cfg, kwargs(), weights)

    factory.__doc__ = f"Build the {cfg.name} encoder ({cfg.source or 'random test weights'})."
    register_encoder(cfg.name, cfg=cfg)(factory)


_PATHO = {"target_mpp": 0.5, "interpolation": "bicubic"}

_add(
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
    _uni,
)
_add(
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
    _uni2,
)
_add(
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
    _virchow2,
)
for _name, _repo in (("h-optimus-0", "bioptimus/H-optimus-0"), ("h-optimus-1", "bioptimus/H-optimus-1")):
    _add(
        EncoderCfg(
            name=_name,
            family="timm",
            architecture="vit_giant_patch14_reg4_dinov2",
            dim=1536,
            hf_hub_id=_repo,
            filename="pytorch_model.bin",
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            license="Apache-2.0" if _name.endswith("0") else "CC-BY-NC-ND-4.0",
            gated=_name.endswith("1"),
            source=f"hf-hub:{_repo}",
            **_PATHO,
        ),
        _hoptimus,
    )
_add(
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
    _gigapath,
)
_TEST = {"license": "MIT", "gated": False, "source": "random (seed 0)", "seed": 0, "target_mpp": 0.5}
_add(EncoderCfg(name="test-vit", family="timm", architecture="vit_small_patch16_224", dim=64, **_TEST), _test_vit)
_add(
    EncoderCfg(
        name="test-virchow",
        family="timm",
        architecture="vit_huge_patch14_224",
        dim=64,
        input_size=112,
        pooling="cls_mean",
        **_TEST,
    ),
    _test_virchow,
)
_add(
    EncoderCfg(name="test-uni2", family="timm", architecture="vit_giant_patch14_224", dim=64, input_size=112, **_TEST),
    _test_uni2,
)


def create_generic_timm(arch: str, weights: Any = None, pretrained_tag: str | None = None) -> Encoder:
    """``timm:<arch>``: any timm model, pooled by its own head, preprocessing from its pretrained cfg.

    Parameters
    ----------
    arch
        timm model name, optionally with a pretrained tag (``"resnet50.a1_in1k"``).
    weights
        ``None`` (the hub repository of timm's pretrained cfg), ``"hf-hub:..."``, ``"local-dir:..."`` or a file.
    pretrained_tag
        Tag to use when ``arch`` has none.
    """
    from embedstore._optional import import_optional

    timm = import_optional("timm", f"encoder timm:{arch}")
    name = f"{arch}.{pretrained_tag}" if pretrained_tag and "." not in arch else arch
    base = name.split(".")[0]
    if not timm.is_model(base):
        import difflib

        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        msg = f"timm:{arch}: not a timm architecture; {'did you mean ' + ', '.join(close) + '?' if close else 'see timm.list_models()'}"
        raise BadInput(msg)
    pcfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(base)
    input_size = int(pcfg.input_size[-1]) if pcfg is not None else 224
    crop = float(pcfg.crop_pct or 1.0) if pcfg is not None else 1.0
    probe = build_timm_model(
        EncoderCfg(name=f"timm:{arch}", family="timm", architecture=base, dim=0, seed=0), {}, device="meta"
    )
    cfg = EncoderCfg(
        name=f"timm:{arch}",
        family="timm",
        architecture=base,
        dim=int(probe.trunk.num_features),
        hf_hub_id=(pcfg.hf_hub_id.rstrip("/") if pcfg is not None and pcfg.hf_hub_id else None),
        filename=(pcfg.hf_hub_filename or "model.safetensors") if pcfg is not None else "model.safetensors",
        input_size=input_size,
        resize_size=round(input_size / crop) if crop < 1.0 else None,
        mean=tuple(pcfg.mean) if pcfg is not None else IMAGENET_MEAN,
        std=tuple(pcfg.std) if pcfg is not None else IMAGENET_STD,
        interpolation=(pcfg.interpolation or "bicubic") if pcfg is not None else "bicubic",
        target_mpp=0.5,
        license=(pcfg.license or "unknown") if pcfg is not None else "unknown",
        gated=False,
        source=f"hf-hub:{pcfg.hf_hub_id}" if pcfg is not None and pcfg.hf_hub_id else "",
    )
    if cfg.hf_hub_id is None and weights is None:
        msg = f"timm:{arch}: timm knows no hub repository for these weights; pass weights='hf-hub:org/repo' or 'local-dir:/folder'"
        raise BadInput(msg)
    return create_timm_encoder(cfg, {}, weights)
