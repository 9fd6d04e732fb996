"""open_clip-family model code: OmiCLIP/Loki (CoCa ViT-L/14), its tiny test variant, and ``open_clip:<arch>``.

Models are built with open_clip's public ``create_model`` from a named config, with the text
tower (and a CoCa's text decoder) replaced by a stub of minimal size: only the image tower is
kept, so a CoCa checkpoint's text tower and decoder never take memory. Weights are the full
CLIP/CoCa state dict; the ``visual.`` keys are kept. Imported only when an open_clip encoder is
created.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator
from typing import Any

import open_clip
import torch

from embedstore.encoders._config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EncoderCfg, weights_fingerprint
from embedstore.encoders._runtime import Encoder, seeded
from embedstore.encoders._weights import load_into, load_state_dict, resolve_weights
from embedstore.errors import BadInput

TEST_ARCHITECTURE = "embedstore-test-coca"

# A CoCa image tower at toy size: the same VisionTransformer + attentional pooler path as coca_ViT-L-14.
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

# The text tower (and text decoder) open_clip builds beside the image tower, at their smallest.
_STUB_TEXT_CFG: dict[str, Any] = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


def _model_config(cfg: EncoderCfg) -> dict[str, Any]:
    """open_clip's model config (dict) named by ``cfg.architecture``."""
    model_cfg = open_clip.get_model_config(cfg.architecture)
    if model_cfg is None:
        close = difflib.get_close_matches(cfg.architecture, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        msg = f"open_clip:{cfg.architecture}: not an open_clip model config; {hint}"
        raise BadInput(msg)
    return model_cfg


def _create_model_args(cfg: EncoderCfg) -> tuple[str, dict[str, Any]]:
    """The open_clip config name to build, and the config keys that replace its own."""
    if cfg.architecture == TEST_ARCHITECTURE:
        # every key of the plain CLIP config ViT-B-32 is replaced; a CLIP builds its image tower
        # first, so the seed alone decides the toy's weights
        return "ViT-B-32", {**TEST_OPENCLIP_CONFIG, "text_cfg": _STUB_TEXT_CFG}
    stubs = {"text_cfg": _STUB_TEXT_CFG}
    if "multimodal_cfg" in _model_config(cfg):
        stubs["multimodal_cfg"] = _STUB_TEXT_CFG
    return cfg.architecture, stubs


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's warning that it built a model without weights: they are loaded after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Silence open_clip's random-initialisation warning (logged on the root logger) in the block."""
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


class ImageTower(torch.nn.Module):
    """open_clip's vision tower; returns its pooled, projected output (CLIP's image latent)."""

    def __init__(self, visual: Any) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: Any) -> Any:
        out = self.visual(x)
        # towers built with output_tokens return (pooled, tokens)
        return out[0] if isinstance(out, tuple) else out


def build_openclip_model(cfg: EncoderCfg, device: Any = None) -> ImageTower:
    """Build the image tower of ``cfg`` with random weights (seeded when ``cfg.seed`` is set).

    Parameters
    ----------
    cfg
        Encoder configuration; ``cfg.architecture`` is an open_clip model config name.
    device
        Build on this device (``"meta"`` checks shapes without allocating).
    """
    name, replaced = _create_model_args(cfg)
    device = device or "cpu"
    with seeded(cfg.seed), torch.device(device), _quiet_random_init():
        model = open_clip.create_model(name, pretrained=None, device=device, pretrained_text=False, **replaced)
    return ImageTower(model.visual).eval()


def create(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Resolve weights, build the image tower, load its ``visual.`` weights, fingerprint it."""
    path, source = resolve_weights(cfg, weights)
    model = build_openclip_model(cfg)
    if path is not None:
        sd = load_state_dict(path, prefix="visual.")
        load_into(model.visual, sd, str(path), cfg.name)
    return Encoder(cfg, model, weights_fingerprint(cfg, path), source)


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
    return create(cfg, weights)
