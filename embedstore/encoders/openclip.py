"""open_clip-family model code: OmiCLIP/Loki (CoCa ViT-L/14), its tiny test variant, and ``open_clip:<arch>``.

Models are built with open_clip's public ``create_model`` from a named config. The image encoder
keeps the image tower and replaces the text tower (and a CoCa's text decoder) with a stub of
minimal size; the text encoder (:class:`TextEncoder`, for Loki's gene sentences) keeps the text
tower and stubs the vision tower and the decoder. So a tower never takes the memory of the other.
Weights are the full CLIP/CoCa state dict; each encoder loads its own tower's keys from it. The
test variant is a real CoCa (``coca_ViT-B-32`` at toy size, open_clip's own tokenizer and
vocabulary): only its config name and overrides differ from OmiCLIP. Imported only when an
open_clip encoder is created.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import open_clip
import torch

from embedstore import _schema
from embedstore.encoders._config import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderCfg,
    sha256_file,
    weights_fingerprint,
)
from embedstore.encoders._runtime import Encoder, seeded
from embedstore.encoders._weights import load_into, load_state_dict, resolve_weights
from embedstore.errors import BadInput, MissingWeights

# The test variant: open_clip's coca_ViT-B-32 config at toy size (the name enters its fingerprint).
TEST_ARCHITECTURE = "embedstore-tiny-coca_ViT-B-32"
TEST_BASE_CONFIG = "coca_ViT-B-32"
TEST_OPENCLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    # the same VisionTransformer + attentional pooler path as coca_ViT-L-14
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
    # open_clip's BPE tokenizer, its vocabulary and CoCa's context length, with a class token
    "text_cfg": {
        "context_length": 76,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 76,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "attn_pooler_heads": 2,
    },
}

# The towers open_clip builds beside the one kept, at their smallest.
_STUB_TEXT_CFG: dict[str, Any] = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}
_STUB_VISION_CFG: dict[str, Any] = {"image_size": 1, "patch_size": 1, "width": 8, "head_width": 8, "layers": 1}

# What a CLIP/CoCa holds besides its text tower: removed from the text encoder, and their keys
# ignored in a checkpoint (a CoCa's text tower is ``text.*``, a plain CLIP's is top-level).
_NOT_TEXT = ("visual", "text_decoder", "logit_scale", "logit_bias")
_NOT_TEXT_KEYS = ("visual.", "text_decoder.", "logit_scale", "logit_bias")


def _model_config(name: str) -> dict[str, Any]:
    """open_clip's model config (dict) named ``name``."""
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        msg = f"open_clip:{name}: not an open_clip model config; {hint}"
        raise BadInput(msg)
    return model_cfg


def _create_model_args(cfg: EncoderCfg, keep: str = "image") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The open_clip config name to build, the config keys that replace its own, and the whole config.

    ``keep`` is the tower built for real: ``"image"`` (the text tower and decoder stubbed),
    ``"text"`` (the vision tower and decoder stubbed) or ``"all"`` (the whole model). The returned
    config is the model's own (the test variant's overrides applied, no stubs).
    """
    if cfg.architecture == TEST_ARCHITECTURE:
        name, replaced = TEST_BASE_CONFIG, dict(TEST_OPENCLIP_CONFIG)
    else:
        name, replaced = cfg.architecture, {}
    model_cfg = {**_model_config(name), **replaced}
    if keep == "image":
        replaced["text_cfg"] = _STUB_TEXT_CFG
    elif keep == "text":
        replaced["vision_cfg"] = _STUB_VISION_CFG
    if keep != "all" and "multimodal_cfg" in model_cfg:
        replaced["multimodal_cfg"] = _STUB_TEXT_CFG
    return name, replaced, model_cfg


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


def _build(cfg: EncoderCfg, keep: str, device: Any) -> Any:
    """The open_clip model of ``cfg`` with random weights (seeded by ``cfg.seed``), ``keep`` as in :func:`_create_model_args`."""
    name, replaced, _ = _create_model_args(cfg, keep)
    device = device or "cpu"
    with seeded(cfg.seed), torch.device(device), _quiet_random_init():
        return open_clip.create_model(name, pretrained=None, device=device, pretrained_text=False, **replaced)


def build_openclip_model(cfg: EncoderCfg, device: Any = None) -> ImageTower:
    """Build the image tower of ``cfg`` with random weights (seeded when ``cfg.seed`` is set).

    Parameters
    ----------
    cfg
        Encoder configuration; ``cfg.architecture`` is an open_clip model config name.
    device
        Build on this device (``"meta"`` checks shapes without allocating).
    """
    return ImageTower(_build(cfg, "image", device).visual).eval()


def build_openclip_full(cfg: EncoderCfg, device: Any = None) -> Any:
    """The whole open_clip model of ``cfg`` (both towers, and a CoCa's decoder), random and seeded.

    What a training run of the architecture starts from; its ``state_dict()`` is a checkpoint
    both :func:`create` and :func:`create_text` load.
    """
    return _build(cfg, "all", device).eval()


def create(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Resolve weights, build the image tower, load its ``visual.`` weights, fingerprint it."""
    path, source = resolve_weights(cfg, weights)
    model = build_openclip_model(cfg)
    if path is not None:
        sd = load_state_dict(path, prefix="visual.")
        load_into(model.visual, sd, str(path), cfg.name)
    return Encoder(cfg, model, weights_fingerprint(cfg, path), source)


def generic_cfg(arch: str, weights: Any = None, pretrained: str | None = None) -> EncoderCfg:
    """The :class:`EncoderCfg` of ``open_clip:<arch>`` (see :func:`create_generic_openclip`)."""
    model_cfg = _model_config(arch)
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
    return EncoderCfg(
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
    return create(generic_cfg(arch, weights, pretrained), weights)


# --------------------------------------------------------------------------- the text tower


class TextTower(torch.nn.Module):
    """An open_clip CLIP/CoCa with everything but its text tower removed; returns the pooled text latent.

    The model's own ``encode_text`` runs, so a CoCa gives its ``text`` tower's pooled (class
    token) output and a plain CLIP its end-of-text token, both projected (not normalised here).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        for attr in _NOT_TEXT:
            if hasattr(model, attr):
                delattr(model, attr)
        self.clip = model

    def forward(self, tokens: Any) -> Any:
        return self.clip.encode_text(tokens, normalize=False)


def build_text_tower(cfg: EncoderCfg, device: Any = None) -> TextTower:
    """Build the text tower of ``cfg`` with random weights (the vision tower and decoder stubbed)."""
    return TextTower(_build(cfg, "text", device)).eval()


class TextEncoder:
    """The text tower of an open_clip CLIP/CoCa encoder: gene sentences in, ``(N, dim)`` unit vectors out.

    Built only by :func:`embedstore.encoders.create_text_encoder`. Its vectors live in the image
    tower's space: a tile and a text compare by cosine similarity when both towers come from
    one checkpoint, which :attr:`image_fingerprint` (the image tower's :attr:`Encoder.fingerprint`
    for that checkpoint) lets a caller check.

    Attributes
    ----------
    name, dim, cfg
        The encoder's registry name, embedding length and :class:`EncoderCfg`.
    fingerprint
        Hash of the weight bytes (or the random-init seed) and the text settings (tower,
        architecture, tokenizer, context length).
    image_fingerprint
        The fingerprint ``create_encoder(name, weights)`` gives the image tower of the same weights.
    weights_source
        Where the weights came from (``hf-hub:org/repo``, ``local-dir:...``, ``file:...``, ``random-init(...)``).
    """

    def __init__(
        self,
        cfg: EncoderCfg,
        model: TextTower,
        tokenizer: Any,
        text: dict[str, Any],
        fingerprint: str,
        image_fingerprint: str,
        weights_source: str,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.dim = cfg.dim
        self.model = model
        self.tokenizer = tokenizer
        self.text = text
        self.fingerprint = fingerprint
        self.image_fingerprint = image_fingerprint
        self.weights_source = weights_source
        self.device = "cpu"

    def __repr__(self) -> str:
        return (
            f"TextEncoder({self.name!r}, dim={self.dim}, fingerprint={self.fingerprint}, "
            f"image_fingerprint={self.image_fingerprint}, device={self.device!r})"
        )

    def to(self, device: str = "cpu") -> TextEncoder:
        """Move to ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda[:N]"``."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            msg = f"{self.name}: device {device!r} is not known; use auto, cpu or cuda[:N]"
            raise BadInput(msg) from e
        self.model.to(dev)
        self.device = str(dev)
        return self

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts: ``(N, dim)`` float32, L2-normalised (CoCa's ``encode_text``), in batches.

        Parameters
        ----------
        texts
            Strings (a gene sentence each, e.g. ``"ERBB2 GRB7 KRT19"``); open_clip's tokenizer
            truncates each to the model's context length.
        batch_size
            Texts per forward pass.
        """
        if isinstance(texts, str):
            msg = f"{self.name}: encode takes a list of texts, got one string; pass [{texts[:40]!r}]"
            raise BadInput(msg)
        items = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)
        bad = next((t for t in items if not isinstance(t, str)), None)
        if bad is not None or (items and batch_size < 1):
            what = f"a {type(bad).__name__}" if bad is not None else f"batch_size={batch_size}"
            msg = f"{self.name}: cannot encode {what}; pass a list of strings and batch_size >= 1"
            raise BadInput(msg)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        dev = torch.device(self.device)
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                tokens = self.tokenizer(items[start : start + batch_size]).to(dev)
                latent = torch.nn.functional.normalize(self.model(tokens).float(), dim=-1)
                out[start : start + len(tokens)] = latent.cpu().numpy()
        return out

    def metadata(self) -> dict[str, Any]:
        """JSON-able description, like :meth:`Encoder.metadata`, plus the text settings and ``image_fingerprint``."""
        return {
            "name": self.name,
            "family": "open_clip-text",
            "cfg": self.cfg.to_dict(),
            "text": dict(self.text),
            "fingerprint": self.fingerprint,
            "image_fingerprint": self.image_fingerprint,
            "weights": self.weights_source,
        }


def _tokenizer(name: str, context_length: int, encoder: str) -> Any:
    """open_clip's tokenizer of config ``name`` (the bundled BPE vocabulary for CLIP and CoCa)."""
    try:
        return open_clip.get_tokenizer(name, context_length=context_length)
    except (OSError, ValueError, ImportError) as e:  # a Hugging Face tokenizer that is not cached
        msg = f"{encoder}: open_clip's tokenizer for {name} is not available ({type(e).__name__}); use a CLIP/CoCa config with open_clip's own tokenizer"
        raise MissingWeights(msg) from e


def create_text(cfg: EncoderCfg, weights: Any = None) -> TextEncoder:
    """Resolve weights as :func:`create` does, build the text tower, load its keys strictly, fingerprint it.

    Parameters
    ----------
    cfg
        An open_clip encoder's configuration (OmiCLIP, the test variant, ``open_clip:<arch>``).
    weights
        ``None`` (the hub cache; random init for the test variant), ``"hf-hub:org/repo"``,
        ``"local-dir:/folder"`` or a file: the full CLIP/CoCa checkpoint, as for the image tower.
    """
    path, source = resolve_weights(cfg, weights)
    name, _, model_cfg = _create_model_args(cfg, "text")
    context_length = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    tokenizer = _tokenizer(name, context_length, cfg.name)
    model = build_text_tower(cfg)
    if path is not None:
        sd = load_state_dict(path)
        if not any(not k.startswith(_NOT_TEXT_KEYS) for k in sd):
            msg = (
                f"{path}: holds no text tower (only {', '.join(sorted({k.split('.')[0] for k in sd})[:3])} keys); "
                f"pass the full CLIP/CoCa checkpoint of {cfg.name} (image and text towers)"
            )
            raise BadInput(msg)
        load_into(model.clip, sd, str(path), cfg.name, ignore=_NOT_TEXT_KEYS)
    text = {"tower": "text", "architecture": cfg.architecture, "tokenizer": name, "context_length": context_length}
    # the image tower's digest of the same weights: the bytes of the file, or the test variant's seed
    digest = f"random-init:{cfg.architecture}:seed={cfg.seed}" if path is None else sha256_file(path)
    fingerprint = _schema.fingerprint(digest, {**text, "dim": cfg.dim, "normalize": True})
    return TextEncoder(cfg, model, tokenizer, text, fingerprint, weights_fingerprint(cfg, path), source)
