"""open_clip-family encoders: OmiCLIP/Loki (CoCa ViT-L/14), its tiny test variant, and ``open_clip:<arch>``.

Only the image tower is built (from the model's JSON config as a dict, with open_clip's own
builder), so a CoCa checkpoint's text tower and decoder never take memory. Weights are the full
CLIP/CoCa state dict; the ``visual.`` keys are kept.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from embedstore.encoders._base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
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

# A CoCa model at toy size: the same VisionTransformer + attentional pooler path as coca_ViT-L-14.
TEST_OPENCLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 112,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 16,
        "attentional_pool": True,
        "attn_pooler_queries": 16,
        "attn_pooler_heads": 2,
        "output_tokens": True,
    },
}


def _model_config(cfg: EncoderCfg) -> dict[str, Any]:
    """The open_clip model config (dict) of ``cfg``: ours for test variants, open_clip's otherwise."""
    if cfg.architecture == "embedstore-test-coca":
        return TEST_OPENCLIP_CONFIG
    from embedstore._optional import import_optional

    open_clip = import_optional("open_clip", f"encoder {cfg.name}")
    model_cfg = open_clip.get_model_config(cfg.architecture)
    if model_cfg is None:
        close = difflib.get_close_matches(cfg.architecture, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        msg = f"open_clip:{cfg.architecture}: not an open_clip model config; {hint}"
        raise BadInput(msg)
    return model_cfg


_VISUAL_CLASS: list[Any] = []


def _image_tower(visual: Any) -> Any:
    """Wrap an open_clip vision tower so that calling it returns the pooled image latent."""
    if not _VISUAL_CLASS:  # defined on first use so that torch is imported lazily
        import torch

        class ImageTower(torch.nn.Module):
            """open_clip's vision tower; returns its pooled, projected output (CLIP's image latent)."""

            def __init__(self, visual: Any) -> None:
                super().__init__()
                self.visual = visual

            def forward(self, x: Any) -> Any:
                out = self.visual(x)
                # towers built with output_tokens return (pooled, tokens)
                return out[0] if isinstance(out, tuple) else out

        _VISUAL_CLASS.append(ImageTower)
    return _VISUAL_CLASS[0](visual)


def build_openclip_model(cfg: EncoderCfg, device: Any = None) -> Any:
    """Build the image tower of ``cfg`` with random weights (seeded when ``cfg.seed`` is set).

    Parameters
    ----------
    cfg
        Encoder configuration; ``cfg.architecture`` is an open_clip model config name.
    device
        Build on this device (``"meta"`` checks shapes without allocating).
    """
    import torch

    from embedstore._optional import import_optional

    import_optional("open_clip", f"encoder {cfg.name}")
    from open_clip.model import _build_vision_tower

    model_cfg = _model_config(cfg)
    with seeded(cfg.seed), torch.device(device or "cpu"):
        visual = _build_vision_tower(
            embed_dim=model_cfg["embed_dim"],
            vision_cfg=dict(model_cfg["vision_cfg"]),
            quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        )
    return _image_tower(visual).eval()


def create_openclip_encoder(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Resolve weights, build the image tower, load its ``visual.`` weights, fingerprint it."""
    path, source = resolve_weights(cfg, weights)
    model = build_openclip_model(cfg)
    if path is not None:
        sd = load_state_dict(path, prefix="visual.")
        load_into(model.visual, sd, str(path), cfg.name)
    return Encoder(cfg, model, weights_fingerprint(cfg, path), source)


def _add(cfg: EncoderCfg) -> None:
    def factory(weights: Any = None) -> Encoder:
        return create_openclip_encoder(cfg, weights)

    factory.__doc__ = f"Build the {cfg.name} encoder ({cfg.source})."
    register_encoder(cfg.name, cfg=cfg)(factory)


_add(
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
    )
)
_add(
    EncoderCfg(
        name="test-openclip",
        family="open_clip",
        architecture="embedstore-test-coca",
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
    )
)


def create_generic_openclip(arch: str, weights: Any = None, pretrained: str | None = None) -> Encoder:
    """``open_clip:<arch>``: the image tower of any open_clip model config.

    Parameters
    ----------
    arch
        open_clip model config name, e.g. ``"ViT-B-16"``.
    weights
        ``None`` (the hub repository of open_clip's pretrained tag), ``"hf-hub:..."``,
        ``"local-dir:..."`` or a file.
    pretrained
        open_clip pretrained tag (e.g. ``"laion2b_s34b_b88k"``); the first tag with a hub
        repository when not given.
    """
    from embedstore._optional import import_optional

    open_clip = import_optional("open_clip", f"encoder open_clip:{arch}")
    probe = EncoderCfg(name=f"open_clip:{arch}", family="open_clip", architecture=arch, dim=0)
    model_cfg = _model_config(probe)
    tags = [t for m, t in open_clip.list_pretrained() if m == arch]
    pcfg: dict[str, Any] = {}
    if pretrained is not None:
        if pretrained not in tags:
            msg = f"open_clip:{arch}: no pretrained tag {pretrained!r}; available: {', '.join(tags) or 'none'}"
            raise BadInput(msg)
        pcfg = open_clip.get_pretrained_cfg(arch, pretrained)
    else:
        for t in tags:
            c = open_clip.get_pretrained_cfg(arch, t)
            if c.get("hf_hub"):
                pcfg = c
                break
    hub = (pcfg.get("hf_hub") or "").strip("/") or None
    if hub is None and weights is None:
        msg = f"open_clip:{arch}: no hub repository known for its weights; pass weights='hf-hub:org/repo' or 'local-dir:/folder'"
        raise BadInput(msg)
    cfg = EncoderCfg(
        name=f"open_clip:{arch}",
        family="open_clip",
        architecture=arch,
        dim=int(model_cfg["embed_dim"]),
        hf_hub_id=hub,
        filename="open_clip_model.safetensors",
        input_size=int(model_cfg["vision_cfg"].get("image_size", 224)),
        mean=tuple(pcfg.get("mean") or OPENAI_CLIP_MEAN),
        std=tuple(pcfg.get("std") or OPENAI_CLIP_STD),
        interpolation=pcfg.get("interpolation") or "bicubic",
        target_mpp=0.5,
        license="see the model card",
        gated=False,
        normalize=True,
        source=f"hf-hub:{hub}" if hub else "",
    )
    return create_openclip_encoder(cfg, weights)
