"""Registry of tile encoders: pathology foundation models, tiny test variants and a built-in baseline.

``create_encoder(name, weights=None)`` is the only way to build one; ``list_encoders()`` shows
what is registered. Every registered cfg lives in ``_catalog``; a family's model code (``timm_hub``,
``openclip``, ``imagenet``, ``external``), with torch and its library, is imported only when one of
its encoders is built.

``create_text_encoder(name, weights=None)`` builds the text tower of an open_clip CLIP/CoCa
encoder (OmiCLIP), which embeds gene sentences into the image tower's space.

Names: a registered name (``"uni2-h"``, ``"builtin"``, ...), ``"timm:<architecture>"`` or
``"open_clip:<model config>"``. Weights: ``None`` (the Hugging Face hub cache; ``HF_TOKEN`` for
gated repositories, ``HF_HUB_OFFLINE`` honoured), ``"hf-hub:org/repo"``, ``"local-dir:/folder"``
or a weight file's path.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from embedstore.encoders._catalog import register_catalog
from embedstore.encoders._config import EncoderCfg
from embedstore.encoders._preprocess import make_transform
from embedstore.encoders._registry import ENCODERS, register_encoder
from embedstore.encoders._runtime import Encoder
from embedstore.encoders._weights import looks_like_path
from embedstore.errors import BadInput

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "EncoderCfg",
    "create_encoder",
    "create_text_encoder",
    "get_encoder_cfg",
    "has_text_tower",
    "list_encoders",
    "make_transform",
    "register_encoder",
]

LOG = logging.getLogger(__name__)

DEFAULT_ENCODER = "builtin"

register_catalog()

_LISTED = ["family", "dim", "license", "gated", "hf_hub_id", "weights", "target_mpp", "requires"]


def create_encoder(name: str, weights: str | None = None, **kwargs: Any) -> Encoder:
    """Build an encoder by name.

    Parameters
    ----------
    name
        Registered name (see :func:`list_encoders`), ``"timm:<architecture>"`` or
        ``"open_clip:<model config>"``.
    weights
        ``None`` (the hub cache, or the encoder's own source), ``"hf-hub:org/repo"``,
        ``"local-dir:/path/to/folder"`` or a weight file.
    **kwargs
        Passed to the family's factory (``pretrained_tag=`` for ``timm:``, ``pretrained=`` for ``open_clip:``).

    Returns
    -------
    An :class:`Encoder` on the CPU in float32; call ``.to("cuda")`` to move it.
    """
    if not isinstance(name, str) or not name:
        msg = f"{name!r}: an encoder name must be a non-empty string; see list_encoders()"
        raise BadInput(msg)
    if name.startswith("timm:"):
        from embedstore.encoders import timm_hub

        return timm_hub.create_generic_timm(name[5:], weights=weights, **kwargs)
    if name.startswith("open_clip:"):
        from embedstore.encoders import openclip

        return openclip.create_generic_openclip(name[10:], weights=weights, **kwargs)
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or (name not in ENCODERS and looks_like_path(name)):
        msg = (
            f"{name}: looks like weights, not an encoder name; pass the encoder name and "
            "weights='local-dir:/path/to/folder' or weights='hf-hub:org/repo', e.g. "
            f"create_encoder('uni', weights='local-dir:{name.split(':', 1)[-1]}')"
        )
        raise BadInput(msg)
    factory = ENCODERS.get(name).factory
    try:
        inspect.signature(factory).bind(weights=weights, **kwargs)
    except TypeError:
        accepted = [p for p in inspect.signature(factory).parameters if p != "weights"]
        msg = (
            f"encoder {name!r}: unexpected keyword arguments {sorted(kwargs)}; it accepts {accepted or 'only weights='}"
        )
        raise BadInput(msg) from None
    return factory(weights=weights, **kwargs)


def has_text_tower(name: str) -> bool:
    """True for encoders with a text tower (open_clip CLIP/CoCa: ``omiclip``, ``open_clip:<arch>``); no model is built."""
    if not isinstance(name, str):
        return False
    if name.startswith("open_clip:"):
        return True
    cfg = ENCODERS.get(name).metadata.get("cfg") if name in ENCODERS else None
    return cfg is not None and cfg.family == "open_clip"


def create_text_encoder(
    name: str, weights: str | None = None, device: str = "cpu", pretrained: str | None = None
):  # -> TextEncoder
    """Build the text tower of an open_clip CLIP/CoCa encoder (OmiCLIP: Loki's gene sentences).

    Parameters
    ----------
    name
        ``"omiclip"``, ``"test-openclip"``, another registered open_clip encoder, or
        ``"open_clip:<model config>"``.
    weights
        As for :func:`create_encoder`: the same full CLIP/CoCa checkpoint gives both towers.
    device
        ``"cpu"``, ``"auto"`` (CUDA when available) or ``"cuda[:N]"``.
    pretrained
        open_clip pretrained tag, for ``open_clip:<arch>`` only (see :func:`create_encoder`).

    Returns
    -------
    A :class:`~embedstore.encoders.openclip.TextEncoder`: ``encode(texts) -> (N, dim)`` float32
    unit vectors; ``image_fingerprint`` is the fingerprint :func:`create_encoder` gives the image
    tower of the same weights.
    """
    if not has_text_tower(name):
        if isinstance(name, str) and name not in ENCODERS and not name.startswith("timm:"):
            ENCODERS.get(name)  # an unknown name: one line with the close matches
        msg = f"encoder {name} has no text tower; text embeddings need an open_clip CLIP/CoCa encoder such as omiclip"
        raise BadInput(msg)
    from embedstore.encoders import openclip

    if name.startswith("open_clip:"):
        cfg = openclip.generic_cfg(name[10:], weights=weights, pretrained=pretrained)
    elif pretrained is not None:
        msg = f"encoder {name!r}: pretrained= is for open_clip:<arch> names; pass weights= instead"
        raise BadInput(msg)
    else:
        cfg = get_encoder_cfg(name)
    return openclip.create_text(cfg, weights).to(device)


def get_encoder_cfg(name: str) -> EncoderCfg:
    """The :class:`EncoderCfg` a registered encoder was registered with (no weights are touched)."""
    cfg = ENCODERS.get(name).metadata.get("cfg")
    if cfg is None:
        msg = f"encoder {name!r}: registered without a cfg; build it with create_encoder to see its settings"
        raise BadInput(msg)
    return cfg


def list_encoders():  # -> pandas.DataFrame (pandas imported lazily)
    """Registered encoders, one row each.

    Returns
    -------
    DataFrame indexed by name with columns family, dim, license, gated, hf_hub_id, weights
    (default weight source), target_mpp and requires (extra package, if any).
    """
    import pandas as pd

    rows = [{"name": e.name, **{k: e.metadata.get(k) for k in _LISTED}} for e in ENCODERS]
    return pd.DataFrame(rows, columns=["name", *_LISTED]).set_index("name")
