"""The encoder registry: :func:`register_encoder` and the ``ENCODERS`` table it fills."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from embedstore._registry import Registry
from embedstore.encoders._config import EncoderCfg
from embedstore.errors import BadInput

ENCODERS = Registry("encoder")


def register_encoder(
    name: str,
    *,
    cfg: EncoderCfg | None = None,
    family: str | None = None,
    dim: int | None = None,
    license: str | None = None,
    gated: bool | None = None,
    **meta: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering an encoder factory ``factory(weights=None, **kw) -> Encoder`` under ``name``.

    Parameters
    ----------
    name
        Registry name; registering it twice is an error.
    cfg
        The encoder's :class:`EncoderCfg`; family, dim, licence, gated and hub id are read from it.
    family, dim, license, gated
        Metadata for encoders without a cfg, or checks against the cfg.
    **meta
        Further metadata shown by :func:`list_encoders`.
    """
    given = {"family": family, "dim": dim, "license": license, "gated": gated}
    if cfg is not None:
        for key, value in given.items():
            if value is not None and value != getattr(cfg, key):
                msg = (
                    f"encoder {name!r}: {key}={value!r} disagrees with its cfg ({getattr(cfg, key)!r}); fix one of them"
                )
                raise BadInput(msg)
        if cfg.name != name:
            msg = f"encoder {name!r}: its cfg is named {cfg.name!r}; register it under the cfg's name"
            raise BadInput(msg)
        given = {"family": cfg.family, "dim": cfg.dim, "license": cfg.license, "gated": cfg.gated}
        meta = {
            "hf_hub_id": cfg.hf_hub_id,
            "weights": cfg.source,
            "target_mpp": cfg.target_mpp,
            "requires": cfg.requires,
            **meta,
        }
    missing = [k for k, v in given.items() if v is None]
    if missing:
        msg = f"encoder {name!r}: missing registry metadata {', '.join(missing)}; pass cfg= or these keywords"
        raise BadInput(msg)
    return ENCODERS.register(name, **given, **meta, cfg=cfg)
