"""Stain normalisation of H&E images (Macenko et al. 2009), NumPy only: arrays in, arrays out.

Stain and scanner differences between hospitals move an image's colours more than many
biological differences do. Macenko's method finds the two stain vectors of an image in
optical-density (OD) space and maps its stain concentrations onto a reference stain:

1. OD = -log((I + 1) / Io) per channel; pixels with OD >= ``beta`` in every channel are stained
   tissue (glass and pale pixels are left out of the fit).
2. The tissue ODs are projected onto the plane of their two main principal axes; the angles of
   the projections at the ``alpha`` and ``100 - alpha`` percentiles give the two stain vectors
   (robust extremes of the mixing cone). Hematoxylin is the one with the larger red OD.
3. Concentrations: least squares of every pixel's OD on the two vectors; ``max_conc`` is their
   99th percentile.
4. :func:`normalize`: source concentrations, scaled by ``target.max_conc / source.max_conc``,
   re-coloured with the target's vectors.

:data:`REFERENCE` is the reference stain of the reference implementations (Macenko's MATLAB code,
https://github.com/mitkovetta/staining-normalization; its Python port
https://github.com/schaugf/HEnorm_python; and ``torchstain``, https://github.com/EIDOSLAB/torchstain).
:func:`estimate_stains` and :func:`normalize` give the same vectors and, to within one grey level,
the same image as ``torchstain``'s NumPy ``MacenkoNormalizer`` (``tests/test_stain.py``): the only
difference is that :func:`normalize` inverts the OD transform exactly (``Io * exp(-OD) - 1``, rounded)
where the reference code leaves out the ``- 1`` and truncates, so an image in the reference stain
comes back unchanged.

In :func:`embedstore.embed` (``stain_norm="macenko"``) the stain of each slide is fitted once
(:func:`slide_stain_params`) and every tile of the slide is normalised to :data:`REFERENCE` with it
(:class:`StainTransform`), before the encoder's own preprocessing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from embedstore import _schema
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "REFERENCE",
    "StainParams",
    "StainTransform",
    "estimate_stains",
    "normalize",
    "slide_stain_params",
    "stain_metadata",
]

METHODS = ("macenko",)
IO = 240  # transmitted light intensity of the reference implementations
ALPHA = 1.0  # angle percentile (%)
BETA = 0.15  # OD threshold of a stained pixel
MIN_PIXELS = 100  # fewer stained pixels than this: no stain can be estimated
MIN_ANGLE_DEG = 5.0  # two stain vectors closer than this cannot be told apart
# Where a slide's stain is fitted: patches centred on its tissue, read at the tiles' µm/px.
FIT_PATCHES = 64
FIT_PATCH_PX = 128


@dataclasses.dataclass(frozen=True, eq=False)
class StainParams:
    """The stain of an image: ``matrix`` (3, 2) unit OD vectors (columns: hematoxylin, eosin; rows: R, G, B)
    and ``max_conc`` (2,), the 99th percentile of each stain's concentration."""

    matrix: np.ndarray
    max_conc: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)
        max_conc = np.array(self.max_conc, dtype=np.float64).reshape(-1)
        if matrix.shape != (3, 2) or max_conc.shape != (2,):
            msg = f"stain params: matrix of shape {matrix.shape} and max_conc of {max_conc.shape}; give (3, 2) and (2,)"
            raise BadInput(msg)
        if not (np.isfinite(matrix).all() and np.isfinite(max_conc).all() and (max_conc > 0).all()):
            msg = (
                f"stain params: matrix {matrix.tolist()} and max_conc {max_conc.tolist()} must be finite, max_conc > 0"
            )
            raise BadInput(msg)
        matrix.setflags(write=False)
        max_conc.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "max_conc", max_conc)

    def to_array(self) -> np.ndarray:
        """The 8 numbers (matrix row by row, then max_conc), e.g. to ship to another process."""
        return np.concatenate([self.matrix.ravel(), self.max_conc])

    @classmethod
    def from_array(cls, values: np.ndarray) -> StainParams:
        """Inverse of :meth:`to_array`."""
        values = np.asarray(values, dtype=np.float64).ravel()
        return cls(values[:6].reshape(3, 2), values[6:8])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"matrix": self.matrix.tolist(), "max_conc": self.max_conc.tolist()}


# Macenko's reference stain, as in the reference implementations (module docstring): HERef, maxCRef.
REFERENCE = StainParams(
    matrix=np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    max_conc=np.array([1.9705, 1.0308]),
)


def _pixels(rgb: Any, where: str) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim < 2 or arr.shape[-1] != 3:
        msg = f"{where}: got an array of {arr.dtype} and shape {arr.shape}; give uint8 RGB of shape (..., 3)"
        raise BadInput(msg)
    return arr.reshape(-1, 3)


def _od_table(Io: float) -> np.ndarray:
    """OD of each uint8 value: -log((I + 1) / Io)."""
    return -np.log((np.arange(256, dtype=np.float64) + 1.0) / Io)


def estimate_stains(
    rgb_uint8: np.ndarray, Io: float = IO, alpha: float = ALPHA, beta: float = BETA, *, where: str = "image"
) -> StainParams:
    """Macenko's stain vectors and maximal concentrations of an H&E image.

    Parameters
    ----------
    rgb_uint8
        uint8 RGB of shape ``(..., 3)``: an image ``(H, W, 3)``, a batch, or a pixel list ``(N, 3)``.
    Io
        Transmitted light intensity (the brightness of glass).
    alpha
        Percentile (%) of the projected angles taken as the extreme stain directions.
    beta
        Optical density below which a pixel (in any channel) is left out of the fit.
    where
        What the pixels are, for error lines.

    Returns
    -------
    :class:`StainParams`: unit vectors (hematoxylin first: the larger red OD, as the reference
    implementations order them; oriented along the tissue's main OD axis, so not negated) and the
    99th percentile of each concentration over all pixels. Deterministic.

    Raises
    ------
    BadInput
        Fewer than :data:`MIN_PIXELS` stained pixels, or two stain directions that cannot be told apart.
    """
    px = _pixels(rgb_uint8, "estimate_stains")
    od = _od_table(Io)[px]
    tissue = od[~np.any(od < beta, axis=1)]
    if len(tissue) < MIN_PIXELS:
        msg = (
            f"{where}: {len(tissue)} stained pixels (optical density >= {beta} in every channel) of {len(od)}; "
            f"a stain needs at least {MIN_PIXELS}: the image looks blank or unstained"
        )
        raise BadInput(msg)
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    e1, e2 = vecs[:, 2].copy(), vecs[:, 1].copy()  # the two largest principal axes
    # Signs fixed: the main axis points into positive OD (so the angles cluster around 0, far from
    # the ±π cut); the second's sign only swaps the two extremes but is fixed for determinism.
    if e1.sum() < 0:
        e1 = -e1
    if e2[np.argmax(np.abs(e2))] < 0:
        e2 = -e2
    phi = np.arctan2(tissue @ e2, tissue @ e1)
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v_lo = e1 * math.cos(lo) + e2 * math.sin(lo)
    v_hi = e1 * math.cos(hi) + e2 * math.sin(hi)
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)
    angle = math.degrees(math.acos(min(1.0, abs(float(h @ e)) / float(np.linalg.norm(h) * np.linalg.norm(e)))))
    if angle < MIN_ANGLE_DEG:
        msg = f"{where}: the two stain directions are {angle:.2f}° apart; hematoxylin and eosin cannot be told apart"
        raise BadInput(msg)
    matrix = np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)], axis=1)
    conc = np.linalg.lstsq(matrix, od.T, rcond=None)[0]
    max_conc = np.percentile(conc, 99, axis=1)
    if not (np.isfinite(max_conc).all() and (max_conc > 0).all()):
        msg = f"{where}: stain concentrations of {max_conc.tolist()} at their 99th percentile; no stain to normalise"
        raise BadInput(msg)
    return StainParams(matrix, max_conc)


def _od_map(source: StainParams, target: StainParams) -> np.ndarray:
    """The (3, 3) map of a pixel's OD: unmix with ``source``, rescale, re-colour with ``target``."""
    unmix = np.linalg.pinv(source.matrix)  # least squares, as lstsq
    return target.matrix @ ((target.max_conc / source.max_conc)[:, None] * unmix)


def normalize(
    rgb_uint8: np.ndarray, source: StainParams, target: StainParams = REFERENCE, Io: float = IO
) -> np.ndarray:
    """Re-stain an H&E image from ``source`` to ``target`` (Macenko).

    Parameters
    ----------
    rgb_uint8
        uint8 RGB of shape ``(..., 3)`` (an image, or a batch of tiles).
    source
        The stain of the image (:func:`estimate_stains`, or a slide's :func:`slide_stain_params`).
    target
        The stain to map to (:data:`REFERENCE` by default).
    Io
        Transmitted light intensity (as in :func:`estimate_stains`).

    Returns
    -------
    uint8 array of the input's shape. Every pixel is computed on its own (elementwise), so a tile
    gives the same bytes alone or in a batch.
    """
    arr = np.asarray(rgb_uint8)
    _pixels(arr, "normalize")
    a = _od_map(source, target)
    od = _od_table(Io)[arr]
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    out = np.empty(arr.shape, dtype=np.uint8)
    for c in range(3):
        # elementwise (not a matrix product) so BLAS blocking never changes a bit with the batch size
        value = Io * np.exp(-(a[c, 0] * r + a[c, 1] * g + a[c, 2] * b)) - 1.0
        out[..., c] = np.clip(np.rint(value), 0, 255)
    return out


@dataclasses.dataclass(frozen=True)
class StainTransform:
    """Picklable batch transform: normalise uint8 tiles from a slide's stain to the target, then ``then``.

    Put in front of an encoder's transform (``StainTransform(params, REFERENCE, enc.transform())``),
    it runs wherever that transform runs (reader threads or DataLoader workers).
    """

    source: StainParams
    target: StainParams = REFERENCE
    then: Callable[[np.ndarray], Any] | None = None

    def __call__(self, tiles: np.ndarray) -> Any:
        """``then(normalize(tiles, source, target))``."""
        out = normalize(tiles, self.source, self.target)
        return out if self.then is None else self.then(out)


def slide_stain_params(
    slide: Any,
    fit_mpp: float | None = None,
    *,
    n_patches: int = FIT_PATCHES,
    patch_px: int = FIT_PATCH_PX,
    Io: float = IO,
    alpha: float = ALPHA,
    beta: float = BETA,
) -> StainParams:
    """The stain of a whole slide, fitted once (:func:`estimate_stains`) on pixels of its tissue.

    The tissue is found on the slide's low-resolution tissue mask
    (:func:`embedstore.slides.tissue_mask`); ``n_patches`` patches of ``patch_px`` pixels centred
    on tissue, spread evenly over it, are read at the pyramid level just finer than ``fit_mpp``
    (the tiles' µm/px, so the fit sees nuclei as the tiles do: on a thumbnail they blur into the
    stroma and the extreme stain angles shrink), and the stain is fitted on them together.
    Deterministic: the same slide gives the same params.

    Parameters
    ----------
    slide
        An open :class:`embedstore.slides.Slide`.
    fit_mpp
        µm/px to read the patches at; default 0.5 (20x).
    n_patches, patch_px
        How many patches, and their side in pixels of the level read.
    Io, alpha, beta
        As for :func:`estimate_stains`.

    Raises
    ------
    BadInput
        No tissue on the slide, or no stain in it (one line naming the slide).
    """
    from embedstore.slides import tissue_mask

    mask, downsample = tissue_mask(slide)
    ys, xs = np.nonzero(mask)
    picks = np.unique(np.linspace(0, len(ys) - 1, num=min(n_patches, len(ys))).round().astype(np.int64))
    level = slide.best_level_for_mpp(0.5 if fit_mpp is None else fit_mpp)
    half0 = patch_px * slide.level_downsamples[level] / 2
    patches = [
        slide.read_region(
            round((xs[i] + 0.5) * downsample - half0),
            round((ys[i] + 0.5) * downsample - half0),
            level,
            patch_px,
            patch_px,
        )
        for i in picks
    ]
    params = estimate_stains(np.stack(patches), Io, alpha, beta, where=f"{slide.path}: stain of the tissue")
    LOG.info(
        "%s: stain H %s, E %s, max concentrations %s (from %d patches)",
        slide.slide_id,
        np.round(params.matrix[:, 0], 3).tolist(),
        np.round(params.matrix[:, 1], 3).tolist(),
        np.round(params.max_conc, 3).tolist(),
        len(patches),
    )
    return params


def stain_setting(stain_norm: str | None) -> dict[str, Any] | None:
    """What ``stain_norm`` does to the pixels, as recorded with (and hashed into) the embeddings; None when off."""
    if stain_norm is None:
        return None
    if stain_norm not in METHODS:
        msg = f"stain_norm={stain_norm!r}: not a stain normalisation; use {', '.join(METHODS)} or leave it unset"
        raise BadInput(msg)
    return {
        "method": stain_norm,
        "fit": {"scope": "slide", "patches": FIT_PATCHES, "patch_px": FIT_PATCH_PX},
        "Io": IO,
        "alpha": ALPHA,
        "beta": BETA,
        "target": REFERENCE.to_dict(),
    }


def stain_metadata(meta: dict[str, Any], stain_norm: str | None) -> dict[str, Any]:
    """Encoder metadata of embeddings made with ``stain_norm``: ``meta`` itself when None.

    Otherwise ``fingerprint`` becomes the hash of the encoder's fingerprint and the stain setting
    (so stores, aligners and indexes refuse to mix normalised and raw embeddings), and the
    encoder's own is kept as ``encoder_fingerprint`` beside the ``stain_norm`` setting.
    """
    setting = stain_setting(stain_norm)
    if setting is None:
        return meta
    return {
        **meta,
        "fingerprint": _schema.fingerprint(meta["fingerprint"], {"stain_norm": setting}),
        "encoder_fingerprint": meta["fingerprint"],
        "stain_norm": setting,
    }
