"""timm-family model code: pathology ViTs on the Hugging Face hub, their tiny test variants, and ``timm:<arch>``.

Each registered model (its cfg in ``_catalog``) names a timm architecture and the keyword
arguments its authors publish (UNI, UNI2-h, Virchow2, H-optimus-0/1, Prov-GigaPath). The model
is built with random weights and the state dict is loaded from the resolved file (safetensors or
``torch.load(weights_only=True)``), so the same code path serves hub, local folder and the random
test variants. Imported only when a timm encoder is created.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import SwiGLUPacked

from embedstore.encoders._config import EncoderCfg, weights_fingerprint
from embedstore.encoders._runtime import Encoder, seeded
from embedstore.encoders._weights import load_into, load_state_dict, resolve_weights
from embedstore.errors import BadInput


def _swiglu() -> dict[str, Any]:
    """Packed SwiGLU MLP with SiLU (Virchow2, UNI2-h)."""
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


# registered name -> its architecture keyword arguments for timm.create_model
ARCHITECTURE_KWARGS: dict[str, Callable[[], dict[str, Any]]] = {
    "uni": _uni,
    "uni2-h": _uni2,
    "virchow2": _virchow2,
    "h-optimus-0": _hoptimus,
    "h-optimus-1": _hoptimus,
    "prov-gigapath": _gigapath,
    "test-vit": _test_vit,
    "test-virchow": _test_virchow,
    "test-uni2": _test_uni2,
}


class PooledViT(torch.nn.Module):
    """A timm trunk plus the pooling its authors use; returns the ``(B, dim)`` embedding."""

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


def build_timm_model(cfg: EncoderCfg, kwargs: dict[str, Any], device: Any = None) -> PooledViT:
    """Build the pooled timm model of ``cfg`` with random weights (seeded when ``cfg.seed`` is set).

    Parameters
    ----------
    cfg
        Encoder configuration; ``cfg.architecture`` is the timm model name (a pretrained tag
        after a dot selects that tag's pretrained cfg).
    kwargs
        Architecture keyword arguments for ``timm.create_model``.
    device
        Build on this device (``"meta"`` checks shapes without allocating).
    """
    with seeded(cfg.seed), torch.device(device or "cpu"):
        trunk = timm.create_model(cfg.architecture, pretrained=False, num_classes=0, **kwargs)
    return PooledViT(trunk, cfg.pooling).eval()


def _has_meta_tensors(model: torch.nn.Module) -> bool:
    """Whether a tensor of ``model`` is still on the meta device (one no state dict holds: a non-persistent buffer)."""
    for module in model.modules():
        own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
        attributes = (v for v in vars(module).values() if isinstance(v, torch.Tensor))
        if any(t.is_meta for t in (*own, *attributes)):
            return True
    return False


def create_timm_encoder(
    cfg: EncoderCfg, kwargs: dict[str, Any], weights: Any = None, meta_model: PooledViT | None = None
) -> Encoder:
    """Resolve weights, build the model, load the state dict, fingerprint it.

    With a weight file the model is built on the meta device and takes the file's tensors:
    random initialisation of weights that are overwritten costs as much as building the model.
    A model with tensors that no state dict holds is built and initialised for real instead.

    Parameters
    ----------
    cfg, kwargs
        As for :func:`build_timm_model`.
    weights
        See :func:`embedstore.encoders._weights.resolve_weights`.
    meta_model
        ``build_timm_model(cfg, kwargs, device="meta")`` when the caller has built it already.
    """
    path, source = resolve_weights(cfg, weights)  # first: a missing file fails before building a giant model
    if path is None:
        model = build_timm_model(cfg, kwargs)
    else:
        sd = load_state_dict(path)
        model = meta_model if meta_model is not None else build_timm_model(cfg, kwargs, device="meta")
        # classifier heads are unused
        load_into(model.trunk, sd, str(path), cfg.name, ignore=("head.",), assign=True)
        if _has_meta_tensors(model):
            model = build_timm_model(cfg, kwargs)
            load_into(model.trunk, sd, str(path), cfg.name, ignore=("head.",))
    cnn = not cfg.architecture.startswith(("vit", "eva", "deit"))
    return Encoder(cfg, model, weights_fingerprint(cfg, path), source, channels_last=cnn)


def create(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Build the registered timm encoder of ``cfg`` with its published architecture arguments."""
    return create_timm_encoder(cfg, ARCHITECTURE_KWARGS[cfg.name](), weights)


def eval_preprocessing(name: str, data_config: dict[str, Any]) -> dict[str, Any]:
    """EncoderCfg preprocessing fields for timm's resolved data config, as ``timm.data.create_transform`` applies it.

    timm's eval transform resizes to ``floor(size / crop_pct)`` and centre-crops ``size``; on
    square tiles its crop modes (center, squash, border) all do that.

    Parameters
    ----------
    name
        Encoder name, for messages.
    data_config
        ``timm.data.resolve_model_data_config(model)``: input_size, interpolation, mean, std, crop_pct.
    """
    _, height, width = data_config["input_size"]
    if height != width:
        msg = f"{name}: timm resolves a {height}x{width} input; only square inputs are supported, pick another tag"
        raise BadInput(msg)
    scale = math.floor(height / data_config["crop_pct"])  # as timm.data.transforms_imagenet_eval
    return {
        "input_size": int(height),
        "resize_size": scale if scale != height else None,
        "mean": tuple(float(v) for v in data_config["mean"]),
        "std": tuple(float(v) for v in data_config["std"]),
        "interpolation": data_config["interpolation"],
    }


def create_generic_timm(arch: str, weights: Any = None, pretrained_tag: str | None = None) -> Encoder:
    """``timm:<arch>``: any timm model, pooled by its own head, preprocessed as timm resolves it.

    The transform comes from ``timm.data.resolve_model_data_config`` of the model built with the
    tag (input size, mean, std, interpolation, crop percentage), so it is the eval transform of
    ``timm.data.create_transform``; those settings enter the fingerprint.

    Parameters
    ----------
    arch
        timm model name, optionally with a pretrained tag (``"resnet50.a1_in1k"``).
    weights
        ``None`` (the hub repository of timm's pretrained cfg), ``"hf-hub:..."``, ``"local-dir:..."`` or a file.
    pretrained_tag
        Tag to use when ``arch`` has none.
    """
    name = f"{arch}.{pretrained_tag}" if pretrained_tag and "." not in arch else arch
    base = name.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        msg = f"timm:{arch}: not a timm architecture; {'did you mean ' + ', '.join(close) + '?' if close else 'see timm.list_models()'}"
        raise BadInput(msg)
    probe = build_timm_model(
        EncoderCfg(name=f"timm:{arch}", family="timm", architecture=name, dim=0, seed=0), {}, device="meta"
    )
    pcfg = probe.trunk.pretrained_cfg  # the tag's (or the architecture's default tag's) pretrained cfg
    hub = (pcfg.get("hf_hub_id") or "").rstrip("/") or None
    cfg = EncoderCfg(
        name=f"timm:{arch}",
        family="timm",
        architecture=name,
        dim=int(probe.trunk.num_features),
        hf_hub_id=hub,
        filename=pcfg.get("hf_hub_filename") or "model.safetensors",
        target_mpp=0.5,
        license=pcfg.get("license") or "unknown",
        gated=False,
        source=f"hf-hub:{hub}" if hub else "",
        **eval_preprocessing(f"timm:{arch}", resolve_model_data_config(probe.trunk)),
    )
    if cfg.hf_hub_id is None and weights is None:
        msg = f"timm:{arch}: timm knows no hub repository for these weights; pass weights='hf-hub:org/repo' or 'local-dir:/folder'"
        raise BadInput(msg)
    return create_timm_encoder(cfg, {}, weights, meta_model=probe)
