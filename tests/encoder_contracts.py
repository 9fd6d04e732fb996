"""Output contracts every encoder satisfies, and synthetic H&E tiles with known stain content."""

from __future__ import annotations

import json
import pickle

import numpy as np

from embedstore.encoders import Encoder
from embedstore.encoders.builtin import RGB_FROM_HED


def check_encoder_contract(enc: Encoder, tiles: np.ndarray) -> np.ndarray:
    """(B, D) float32, finite, D == cfg.dim, deterministic, picklable transform, JSON-able metadata."""
    out = enc.encode(tiles)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == (len(tiles), enc.cfg.dim)
    assert enc.dim == enc.cfg.dim
    assert np.isfinite(out).all()
    # deterministic, and the transform survives a trip to another process
    tf = pickle.loads(pickle.dumps(enc.transform()))
    again = enc.forward(tf(tiles))
    np.testing.assert_array_equal(out, again)
    meta = json.loads(json.dumps(enc.metadata()))
    assert meta["name"] == enc.name
    assert meta["fingerprint"] == enc.fingerprint
    assert meta["cfg"]["dim"] == enc.cfg.dim
    assert len(enc.fingerprint) == 16
    return out


def he_tile(h: float, e: float, size: int = 224, nuclei: int = 0, radius_px: float = 8.0, seed: int = 0) -> np.ndarray:
    """A Beer–Lambert H&E tile: uniform stain concentrations plus ``nuclei`` dark discs of haematoxylin.

    Parameters
    ----------
    h, e
        Background haematoxylin and eosin concentrations (optical density units).
    nuclei
        Number of discs (haematoxylin +0.8) placed at random without much overlap.
    """
    rng = np.random.default_rng(seed)
    conc = np.zeros((size, size, 3))
    conc[..., 0] = h
    conc[..., 1] = e
    yy, xx = np.mgrid[0:size, 0:size]
    placed: list[tuple[float, float]] = []
    while len(placed) < nuclei:
        cy, cx = rng.uniform(radius_px + 2, size - radius_px - 2, 2)
        if all((cy - py) ** 2 + (cx - px) ** 2 > (3 * radius_px) ** 2 for py, px in placed):
            placed.append((cy, cx))
            conc[..., 0] += 0.8 * (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius_px**2)
    od = conc @ RGB_FROM_HED
    rgb = 256.0 * 10.0 ** (-od) - 1.0
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
