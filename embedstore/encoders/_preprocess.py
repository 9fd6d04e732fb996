"""The eval transform: uint8 tiles -> the normalised float tensor a model sees, derived from a cfg."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedstore.encoders._config import EncoderCfg
from embedstore.errors import BadInput

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def check_tiles(tiles: Any, who: str) -> np.ndarray:
    """``tiles`` if it is a uint8 RGB batch ``(B, H, W, 3)``; else :class:`BadInput` naming ``who``."""
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        got = f"{type(tiles).__name__} {getattr(tiles, 'dtype', '')} {getattr(tiles, 'shape', '')}"
        msg = f"{who}: expected uint8 RGB tiles of shape (B, H, W, 3), got {got}; pass a batch from iter_tile_batches"
        raise BadInput(msg)
    return tiles


class TorchPreprocess:
    """Picklable per-batch transform: uint8 ``(B, H, W, 3)`` -> normalised float32 tensor ``(B, 3, S, S)``.

    Built by :func:`make_transform` from an :class:`EncoderCfg`; holds only plain values, so it
    can be sent to DataLoader workers or other processes.
    """

    def __init__(
        self,
        name: str,
        input_size: int,
        resize_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str,
        channels_last: bool = False,
    ) -> None:
        self.name = name
        self.input_size = input_size
        self.resize_size = resize_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.interpolation = interpolation
        self.channels_last = channels_last

    def __call__(self, tiles: np.ndarray) -> Any:
        """Resize (when the tile size differs), centre-crop, scale to [0, 1], normalise."""
        import torch
        import torch.nn.functional as F

        tiles = check_tiles(tiles, self.name)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        r = self.resize_size
        resize = tiles.shape[1:3] != (r, r)
        # one pass to float in the layout the next step wants: interpolation is faster on NCHW (same values)
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
        x = x.to(torch.float32, memory_format=torch.contiguous_format if resize else fmt)
        if resize:
            kw = {"antialias": True, "align_corners": False} if self.interpolation != "nearest" else {}
            x = F.interpolate(x, size=(r, r), mode=self.interpolation, **kw)
            # bicubic overshoots; clamp back to the pixel range before scaling
            x = x.clamp_(0.0, 255.0)
        if r != self.input_size:
            # the offset torchvision's CenterCrop takes (Python's round, half to even)
            o = round((r - self.input_size) / 2)
            x = x[:, :, o : o + self.input_size, o : o + self.input_size]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        # x is this call's own tensor (a crop is copied here): normalise it in place, one pass fewer
        return x.contiguous(memory_format=fmt).sub_(mean).div_(std)


def make_transform(cfg: EncoderCfg, channels_last: bool = False) -> TorchPreprocess:
    """The eval transform of ``cfg``: the one place preprocessing is derived from a cfg.

    Parameters
    ----------
    cfg
        Encoder configuration (input size, resize size, mean, std, interpolation).
    channels_last
        Return tensors in channels-last memory format (faster for CNNs).
    """
    if cfg.interpolation not in INTERPOLATIONS:
        msg = (
            f"{cfg.name}: interpolation {cfg.interpolation!r} is not supported; use one of {', '.join(INTERPOLATIONS)}"
        )
        raise BadInput(msg)
    return TorchPreprocess(
        cfg.name,
        cfg.input_size,
        cfg.resize_size or cfg.input_size,
        cfg.mean,
        cfg.std,
        cfg.interpolation,
        channels_last,
    )
