"""Synthetic slides and cohorts for tests, benchmarks and the offline demo.

Everything here is deterministic given ``seed`` and needs no data download:

- :func:`write_synthetic_slide` writes a pyramidal TIFF (a *page* pyramid that OpenSlide reads as
  ``generic-tiff``) with a tissue blob of H&E-like texture, tile by tile, so memory stays bounded
  even for a 20,000 × 20,000 px slide.
- :func:`write_synthetic_image` writes the same texture as a plain PNG / JPEG / TIFF.
- :func:`make_synthetic_cohort` writes several slides plus spot tables in the legacy-ST (her2st)
  layout, with expression driven by the image content around each spot.

Stain and scanner shift (``stain_matrix``, ``blur_sigma_px``; per patient ``stain_shift``): the same
tissue is then rendered by Beer–Lambert from hematoxylin and eosin concentrations with the given
optical-density vectors, and blurred by a Gaussian point-spread function before the sensor noise.
Expression never depends on them: spot features are always taken from the default rendering.
By default nothing changes (the same bytes as without these options).

The texture is a pure function of level-0 pixel coordinates (hash-based nuclei on a jittered cell
grid, separable low-frequency fields for tissue shape and region type), so any region can be
re-rendered exactly; that is how spot features are computed without reading the file back.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedstore.errors import BadInput
from embedstore.stain import REFERENCE

LOG = logging.getLogger(__name__)

__all__ = [
    "STAIN_PRESETS",
    "SyntheticCohort",
    "SyntheticSection",
    "make_synthetic_cohort",
    "seeded_embeddings",
    "write_synthetic_image",
    "write_synthetic_slide",
]

_BACKGROUND = np.array([243.0, 242.0, 246.0], dtype=np.float32)
_STROMA = np.array([236.0, 160.0, 198.0], dtype=np.float32)
_TUMOUR_BG = np.array([214.0, 150.0, 204.0], dtype=np.float32)
_IMMUNE_BG = np.array([226.0, 170.0, 212.0], dtype=np.float32)
_NUCLEUS = np.array([78.0, 38.0, 128.0], dtype=np.float32)
# Synthetic features that drive expression in make_synthetic_cohort, in this order.
FEATURES = ("nuclear_density", "hematoxylin", "eosin", "tumour", "immune")

# Named stain matrices (3 x 2 optical-density vectors, rows R, G, B; columns hematoxylin, eosin).
STAIN_PRESETS: dict[str, np.ndarray] = {
    "reference": np.array(REFERENCE.matrix),  # Macenko's reference stain, the target of stain_norm="macenko"
    # made-up lab variations of it: bluer hematoxylin and paler eosin; purple hematoxylin and redder eosin
    "blue": np.array([[0.70, 0.22], [0.62, 0.72], [0.36, 0.52]]),
    "pink": np.array([[0.45, 0.22], [0.80, 1.05], [0.40, 0.45]]),
}
# Stain concentrations (hematoxylin, eosin) of the Beer–Lambert rendering: background of stroma,
# tumour and immune regions (scaled by the slow stain field), and a nucleus (scaled as its colour is).
_CONC_BG = np.array([[0.05, 0.87], [0.25, 0.80], [0.15, 0.65]], dtype=np.float32)
_CONC_NUCLEUS = np.array([1.30, 0.44], dtype=np.float32)


def _splitmix(v: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a good integer hash, vectorised (uint64 wrap-around is intended)."""
    v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return v ^ (v >> np.uint64(31))


def _hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int, k: int) -> np.ndarray:
    """Uniform [0, 1) float32 per integer cell (ix, iy), independent streams for each k."""
    with np.errstate(over="ignore"):
        v = ix.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        v ^= iy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        v ^= np.uint64((seed * 1_000_003 + k * 7919) & 0xFFFFFFFFFFFFFFFF)
        v = _splitmix(v)
    return ((v >> np.uint64(40)).astype(np.float32)) / np.float32(1 << 24)


@dataclass(frozen=True)
class _Texture:
    """Random parameters of one synthetic slide (all lengths in level-0 pixels)."""

    width: int
    height: int
    px_um: float  # pixels per µm: texture sizes are physical, so they scale with mpp
    seed: int
    blank: bool
    centre: tuple[float, float]
    axes: tuple[float, float]
    shape_terms: tuple[tuple[float, float, float, float, float], ...]
    region_terms: tuple[tuple[float, float, float, float, float], ...]
    stain_terms: tuple[tuple[float, float, float, float, float], ...]

    @classmethod
    def make(cls, width: int, height: int, mpp: float, seed: int, blank: bool) -> _Texture:
        rng = np.random.default_rng(seed)
        px_um = 1.0 / mpp

        def terms(n: int, wavelength_px: float, amp: float) -> tuple[tuple[float, ...], ...]:
            # separable products sin(ax+p)*sin(by+q): evaluating one costs an outer product per tile
            out = []
            for _ in range(n):
                a = 2 * math.pi / (wavelength_px * rng.uniform(0.6, 1.6))
                b = 2 * math.pi / (wavelength_px * rng.uniform(0.6, 1.6))
                out.append(
                    (amp * rng.uniform(0.5, 1.0), a, rng.uniform(0, 2 * math.pi), b, rng.uniform(0, 2 * math.pi))
                )
            return tuple(out)

        return cls(
            width=width,
            height=height,
            px_um=px_um,
            seed=seed,
            blank=blank,
            centre=(width * rng.uniform(0.46, 0.54), height * rng.uniform(0.46, 0.54)),
            axes=(width * rng.uniform(0.4, 0.46), height * rng.uniform(0.4, 0.46)),
            shape_terms=terms(3, max(width, height) / 1.5, 0.25),
            region_terms=terms(4, 500.0 * px_um, 0.6),  # tumour / stroma / immune regions ~0.5 mm
            stain_terms=terms(2, 900.0 * px_um, 0.5),  # slow stain variation
        )

    @staticmethod
    def _field(terms: Sequence[tuple[float, ...]], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        out = np.zeros((ys.size, xs.size), dtype=np.float32)
        for amp, a, p, b, q in terms:
            out += np.outer(amp * np.sin(b * ys + q), np.sin(a * xs + p)).astype(np.float32)
        return out

    def tissue(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Boolean tissue blob on the grid xs × ys (float pixel coordinates)."""
        u = ((xs - self.centre[0]) / self.axes[0]).astype(np.float32) ** 2
        v = ((ys - self.centre[1]) / self.axes[1]).astype(np.float32) ** 2
        return (v[:, None] + u[None, :] + self._field(self.shape_terms, xs, ys)) < 1.0

    def region(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Region field: > 0.35 tumour, < -0.45 immune, otherwise stroma."""
        return self._field(self.region_terms, xs, ys)

    def stain(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Slow staining intensity in about [0.75, 1.25]."""
        return 1.0 + 0.5 * self._field(self.stain_terms, xs, ys)


@dataclass(frozen=True, eq=False)
class _Look:
    """How a slide's tissue is stained and scanned: Beer–Lambert stain vectors, and optical blur."""

    stain: np.ndarray | None  # (3, 2) OD vectors (H, E); their lengths scale the staining intensity
    blur: float  # Gaussian sigma in level-0 pixels


def _stain_matrix(value: str | np.ndarray | Sequence[Sequence[float]] | None) -> np.ndarray | None:
    """A stain matrix from a preset name or a (3, 2) array of non-negative OD vectors (columns H, E)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in STAIN_PRESETS:
            msg = f"stain_matrix={value!r}: not a preset; use one of {', '.join(STAIN_PRESETS)} or a 3 x 2 array"
            raise BadInput(msg)
        return np.array(STAIN_PRESETS[value], dtype=np.float64)
    m = np.array(value, dtype=np.float64)
    if m.shape != (3, 2) or not np.isfinite(m).all() or (m < 0).any() or (np.linalg.norm(m, axis=0) == 0).any():
        msg = f"stain_matrix of shape {m.shape}: give 3 x 2 non-negative OD vectors (rows R, G, B; columns H, E)"
        raise BadInput(msg)
    return m


def _look(stain_matrix: str | np.ndarray | None, blur_sigma_px: float) -> _Look | None:
    """The look of a slide, or None for the default rendering (the same bytes as without the options)."""
    blur = float(blur_sigma_px)
    if not (math.isfinite(blur) and blur >= 0):
        msg = f"blur_sigma_px={blur_sigma_px}: give a Gaussian sigma >= 0 in pixels"
        raise BadInput(msg)
    stain = _stain_matrix(stain_matrix)
    return None if stain is None and blur == 0 else _Look(stain, blur)


def _render_region(
    tex: _Texture, x0: int, y0: int, w: int, h: int, look: _Look | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render the level-0 region ``[x0, x0+w) × [y0, y0+h)`` of a synthetic slide.

    Parameters
    ----------
    tex
        Texture parameters (``_Texture.make``).
    x0, y0, w, h
        Region in level-0 pixels.
    look
        Stain vectors and blur (:func:`_look`); None: the default colours, sharp.

    Returns
    -------
    rgb
        ``(h, w, 3)`` uint8.
    aux
        ``tissue``, ``nuclei`` (bool), ``region`` (int8: 0 stroma, 1 tumour, 2 immune),
        ``stain`` (float32) maps of the region (of the tissue: the same whatever the look).
    """
    rng = np.random.default_rng((tex.seed, x0, y0))
    noise = rng.integers(-4, 5, size=(h, w, 1), dtype=np.int16).astype(np.float32)
    if look is not None and look.blur > 0:
        # the scanner's point-spread function acts on the light, before the sensor's noise; the
        # margin is rendered too (the texture is a pure function of coordinates), so tiles agree at borders
        from scipy import ndimage

        m = math.ceil(4 * look.blur)
        light, aux = _light(tex, x0 - m, y0 - m, w + 2 * m, h + 2 * m, look.stain)
        light = ndimage.gaussian_filter(light, sigma=(look.blur, look.blur, 0), mode="nearest")[m : m + h, m : m + w]
        aux = {k: v[m : m + h, m : m + w] for k, v in aux.items()}
    else:
        light, aux = _light(tex, x0, y0, w, h, None if look is None else look.stain)
    return np.clip(light + noise, 0, 255).astype(np.uint8), aux


def _light(
    tex: _Texture, x0: int, y0: int, w: int, h: int, stain_matrix: np.ndarray | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The noise-free float32 RGB of a region (broadcastable to ``(h, w, 3)``) and its aux maps."""
    xs = np.arange(x0, x0 + w, dtype=np.float64) + 0.5
    ys = np.arange(y0, y0 + h, dtype=np.float64) + 0.5
    if tex.blank:
        zero = np.zeros((h, w), dtype=bool)
        light = np.broadcast_to(_BACKGROUND, (h, w, 3))
        return light, {"tissue": zero, "nuclei": zero, "region": zero.astype(np.int8), "stain": zero.astype(np.float32)}

    tissue = tex.tissue(xs, ys)
    if not tissue.any():  # most tiles of a big slide are glass: skip the texture
        zero = np.zeros((h, w), dtype=bool)
        light = np.broadcast_to(_BACKGROUND, (h, w, 3))
        return light, {
            "tissue": zero,
            "nuclei": zero,
            "region": np.full((h, w), -1, np.int8),
            "stain": tex.stain(xs, ys),
        }
    rfield = tex.region(xs, ys)
    region = np.where(rfield > 0.35, 1, np.where(rfield < -0.45, 2, 0)).astype(np.int8)
    stain = tex.stain(xs, ys)

    # Nuclei: one candidate per cell of a ~9 µm grid; presence, offset and size hashed from the cell
    # index, so neighbouring tiles agree exactly at their borders.
    cell = max(4, round(9.0 * tex.px_um))
    ix = (np.arange(x0, x0 + w) // cell).astype(np.int64)
    iy = (np.arange(y0, y0 + h) // cell).astype(np.int64)
    cx = np.arange(ix[0], ix[-1] + 1)
    cy = np.arange(iy[0], iy[-1] + 1)
    gx, gy = np.meshgrid(cx, cy)
    creg = tex.region((cx + 0.5) * cell, (cy + 0.5) * cell)
    ctype = np.where(creg > 0.35, 1, np.where(creg < -0.45, 2, 0))
    prob = np.choose(ctype, [0.2, 0.8, 0.9]).astype(np.float32)
    rad_um = np.choose(ctype, [2.0, 3.6, 2.2]).astype(np.float32) * (0.8 + 0.4 * _hash_uniform(gx, gy, tex.seed, 1))
    rad = np.maximum(rad_um * tex.px_um, 1.0)
    room = np.maximum(cell / 2 - rad, 0.0)
    offx = cell / 2 + (2 * _hash_uniform(gx, gy, tex.seed, 2) - 1) * room
    offy = cell / 2 + (2 * _hash_uniform(gx, gy, tex.seed, 3) - 1) * room
    # stroma nuclei are elongated (fibroblasts)
    aniso = np.where(ctype == 0, 0.25 + 0.5 * _hash_uniform(gx, gy, tex.seed, 4), 1.0).astype(np.float32)
    present = _hash_uniform(gx, gy, tex.seed, 5) < prob
    r2 = np.where(present, rad * rad, 0.0).astype(np.float32)
    li = iy - cy[0]
    lj = ix - cx[0]
    lx = (np.arange(x0, x0 + w) % cell).astype(np.float32) + 0.5
    ly = (np.arange(y0, y0 + h) % cell).astype(np.float32) + 0.5
    dx = lx[None, :] - offx.astype(np.float32)[li][:, lj]
    dy = ly[:, None] - offy.astype(np.float32)[li][:, lj]
    d2 = dx * dx * aniso[li][:, lj] + dy * dy
    rr = r2[li][:, lj]
    nuclei = (d2 < rr) & tissue

    # nucleus darker at its centre (chromatin), hematoxylin darker in tumour
    t = np.where(nuclei, d2 / np.maximum(rr, 1e-6), 1.0)
    hdark = np.where(region == 1, 1.1, 1.0).astype(np.float32) * stain
    if stain_matrix is None:
        base = np.stack([_STROMA, _TUMOUR_BG, _IMMUNE_BG])[region]
        # eosin varies with the stain field: lighter/darker pink
        base = 255.0 - (255.0 - base) * stain[..., None]
        nuc = 255.0 - (255.0 - _NUCLEUS) * (hdark * (1.15 - 0.3 * t))[..., None]
        light = np.where(nuclei[..., None], nuc, base)
    else:  # Beer–Lambert: the same tissue as stain concentrations, absorbed along the given OD vectors
        conc = np.where(
            nuclei[..., None],
            _CONC_NUCLEUS * (hdark * (1.15 - 0.3 * t))[..., None],
            _CONC_BG[region] * stain[..., None],
        )
        light = _BACKGROUND * np.exp(-(conc @ stain_matrix.T.astype(np.float32)))
    light = np.where(tissue[..., None], light, _BACKGROUND)
    return light, {
        "tissue": tissue,
        "nuclei": nuclei,
        "region": np.where(tissue, region, -1).astype(np.int8),
        "stain": stain,
    }


def _texture(width: int, height: int, mpp: float | None, seed: int, blank: bool) -> _Texture:
    # a slide "without µm/px" still needs a physical scale for its texture: render it as 0.5 µm/px
    return _Texture.make(width, height, 0.5 if mpp is None else mpp, seed, blank)


def _reduce2(a: np.ndarray) -> np.ndarray:
    """2 × 2 box average of an (h, w, 3) uint8 array (odd edges replicated)."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = a[0::2, 0::2].astype(np.uint16) + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def _level_shapes(width: int, height: int, min_level_size: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) > min_level_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def write_synthetic_slide(
    path: str | Path,
    width: int = 4096,
    height: int = 4096,
    mpp: float | None = 0.5,
    seed: int = 0,
    *,
    blank: bool = False,
    tile_size: int = 256,
    min_level_size: int = 512,
    compression_level: int = 1,
    stain_matrix: str | np.ndarray | None = None,
    blur_sigma_px: float = 0.0,
) -> Path:
    """Write a synthetic H&E-like pyramidal TIFF (page pyramid, tiled, zlib).

    Level 0 is rendered tile by tile from a generator; each reduced level (``subfiletype=1``) is a
    2 × 2 box average of the level above, kept in memory for small slides and in a temporary
    memory-mapped file for large ones, so memory stays bounded.

    Parameters
    ----------
    path
        Output ``.tif`` path.
    width, height
        Level-0 size in pixels.
    mpp
        µm/px written as TIFF resolution tags in CENTIMETER units; ``None`` writes no physical
        resolution (a slide "without µm/px", for bad-input tests).
    seed
        Seed of the texture.
    blank
        Write an all-background (glass) slide with no tissue.
    tile_size
        TIFF tile side.
    min_level_size
        Add reduced levels until the largest side is at most this.
    compression_level
        zlib level (1 is fast and still compresses the background well).
    stain_matrix
        Render the tissue by Beer–Lambert with these stain vectors: a preset name
        (:data:`STAIN_PRESETS`: ``"reference"``, ``"blue"``, ``"pink"``) or a ``(3, 2)`` array of
        non-negative optical-density vectors (rows R, G, B; columns hematoxylin, eosin; a longer
        vector stains more intensely). ``None``: the default colours.
    blur_sigma_px
        Scanner blur: sigma in level-0 pixels of a Gaussian point-spread function (0: sharp).

    Returns
    -------
    The path written.
    """
    import tifffile

    path = Path(path)
    tex = _texture(width, height, mpp, seed, blank)
    look = _look(stain_matrix, blur_sigma_px)
    shapes = _level_shapes(width, height, min_level_size)
    big = width * height * 3 // 4 > 64 * 2**20
    with tempfile.TemporaryDirectory(prefix="embedstore-synth-") as tmp:
        buffers: list[np.ndarray | None] = [None]
        for i, (h, w) in enumerate(shapes[1:], start=1):
            if big:
                buffers.append(np.lib.format.open_memmap(Path(tmp) / f"l{i}.npy", "w+", np.uint8, (h, w, 3)))
            else:
                buffers.append(np.empty((h, w, 3), dtype=np.uint8))

        def level0() -> Iterator[np.ndarray]:
            for ty in range(0, height, tile_size):
                for tx in range(0, width, tile_size):
                    rgb, _ = _render_region(tex, tx, ty, min(tile_size, width - tx), min(tile_size, height - ty), look)
                    if len(shapes) > 1:
                        red = _reduce2(rgb)
                        buffers[1][ty // 2 : ty // 2 + red.shape[0], tx // 2 : tx // 2 + red.shape[1]] = red
                    yield rgb

        def reduced(level: int) -> Iterator[np.ndarray]:
            src = buffers[level]
            h, w = shapes[level]
            if level + 1 < len(shapes):
                # fill the next level in row strips (bounded memory on memmaps)
                for y in range(0, h, 2 * tile_size):
                    red = _reduce2(np.asarray(src[y : y + 2 * tile_size]))
                    buffers[level + 1][y // 2 : y // 2 + red.shape[0]] = red
            for ty in range(0, h, tile_size):
                for tx in range(0, w, tile_size):
                    yield np.ascontiguousarray(src[ty : ty + tile_size, tx : tx + tile_size])

        res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
            for level, (h, w) in enumerate(shapes):
                tif.write(
                    level0() if level == 0 else reduced(level),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(tile_size, tile_size),
                    photometric="rgb",
                    compression="zlib",
                    compressionargs={"level": compression_level},
                    subfiletype=1 if level else 0,
                    metadata=None,
                    **res,
                )
        buffers.clear()  # release the memmaps before the temporary directory goes
    LOG.debug("wrote synthetic slide %s (%d x %d, %d levels)", path, width, height, len(shapes))
    return path


def write_synthetic_image(
    path: str | Path,
    width: int = 1024,
    height: int = 1024,
    seed: int = 0,
    *,
    blank: bool = False,
    mpp: float = 0.5,
    stain_matrix: str | np.ndarray | None = None,
    blur_sigma_px: float = 0.0,
) -> Path:
    """Write the synthetic texture as a plain (one-level) PNG, JPEG or TIFF, chosen by suffix.

    No µm/px is stored (PNG/JPEG dpi are not a physical scale); ``mpp`` only sets the texture scale.
    ``stain_matrix`` and ``blur_sigma_px`` as in :func:`write_synthetic_slide`.

    Returns
    -------
    The path written.
    """
    from PIL import Image

    path = Path(path)
    look = _look(stain_matrix, blur_sigma_px)
    rgb, _ = _render_region(_texture(width, height, mpp, seed, blank), 0, 0, width, height, look)
    Image.fromarray(rgb).save(path, **({"quality": 92} if path.suffix.lower() in {".jpg", ".jpeg"} else {}))
    return path


@dataclass
class SyntheticSection:
    """One synthetic section written by :func:`make_synthetic_cohort`."""

    section: str
    patient: str
    image_path: Path
    counts_path: Path
    spots_path: Path
    mpp: float
    width: int
    height: int
    spot_ids: list[str]
    centers_xy: np.ndarray  # (n, 2) float level-0 pixel centres (x = column, y = row)
    features: np.ndarray  # (n, len(FEATURES)) the image features that drove the expression
    counts: np.ndarray  # (n, n_genes) int
    stain_matrix: np.ndarray | None = None  # (3, 2) stain vectors the slide was rendered with; None: default colours
    blur_sigma_px: float = 0.0  # scanner blur of the slide


@dataclass
class SyntheticCohort:
    """A synthetic legacy-ST cohort (her2st layout) written by :func:`make_synthetic_cohort`."""

    root: Path
    genes: list[str]
    sections: list[SyntheticSection] = field(default_factory=list)


def _spot_features(tex: _Texture, cx: float, cy: float, radius_px: float) -> np.ndarray:
    r = math.ceil(radius_px)
    x0, y0 = round(cx) - r, round(cy) - r
    rgb, aux = _render_region(tex, x0, y0, 2 * r + 1, 2 * r + 1)
    yy, xx = np.mgrid[y0 : y0 + 2 * r + 1, x0 : x0 + 2 * r + 1] + 0.5
    disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius_px**2
    nuclei = aux["nuclei"][disk]
    grey = rgb[disk].astype(np.float32).mean(axis=1)
    hema = float(255.0 - grey[nuclei].mean()) / 255.0 if nuclei.any() else 0.0
    eosin = float(255.0 - rgb[disk][~nuclei, 1].astype(np.float32).mean()) / 255.0 if (~nuclei).any() else 0.0
    region = aux["region"][disk]
    return np.array([nuclei.mean(), hema, eosin, (region == 1).mean(), (region == 2).mean()], dtype=np.float64)


def make_synthetic_cohort(
    out_dir: str | Path,
    n_slides: int = 3,
    n_spots: int = 60,
    n_genes: int = 50,
    seed: int = 0,
    *,
    width: int = 4000,
    height: int = 4000,
    mpp: float | Sequence[float] = 0.5,
    n_patients: int | None = None,
    stain_matrix: str | np.ndarray | Sequence[str | np.ndarray] | None = None,
    stain_shift: float = 0.0,
    blur_sigma_px: float | Sequence[float] = 0.0,
) -> SyntheticCohort:
    """Write a synthetic legacy-ST cohort in the her2st layout.

    Layout (as ``almaan/her2st``)::

        out_dir/data/ST-imgs/<patient>/<section>/synthetic_HE_<section>.tif   pyramidal TIFF with µm/px
        out_dir/data/ST-cnts/<section>.tsv.gz        spots × genes raw counts, row ids "{x}x{y}"
        out_dir/data/ST-spotfiles/<section>_selection.tsv   x y new_x new_y pixel_x pixel_y selected

    Spots lie on a 200 µm square grid (100 µm diameter) at each slide's µm/px; up to ``n_spots``
    spots under tissue are kept. Expression is Poisson with a log-rate linear in the image features
    of the spot (:data:`FEATURES`: nuclear density, hematoxylin and eosin intensity, tumour and
    immune region fractions) plus gene and spot noise, so image embeddings can predict it.

    Patients can differ in stain and scanner (``stain_matrix``, ``stain_shift``, ``blur_sigma_px``):
    the tissue, its features and the expression stay those of the default rendering, so only the
    look of the slides changes and a stain-robust method can win.

    Parameters
    ----------
    out_dir
        Root folder (created).
    n_slides
        Number of sections.
    n_spots
        Maximum spots per section.
    n_genes
        Number of genes (``GENE000`` ...).
    seed
        Seed for slides, spots and counts.
    width, height
        Level-0 slide size in pixels.
    mpp
        µm/px of every slide, or one per slide.
    n_patients
        Patients the sections are spread over (default: one patient per section).
    stain_matrix
        Stain vectors of every patient, or one per patient (see :func:`write_synthetic_slide`);
        with ``stain_shift`` the base that each patient's stain is drawn around (default ``"reference"``).
    stain_shift
        Per-patient stain variation: each R, G, B component of each patient's H and E vectors is
        scaled by a log-normal factor of this sigma (the hue shifts), and so is each stain's
        intensity; drawn from ``seed`` and the patient, apart from the cohort's other draws.
        0: no variation; 0.2-0.3 is a marked shift between labs.
    blur_sigma_px
        Scanner blur of every patient, or one per patient (level-0 pixels).

    Returns
    -------
    :class:`SyntheticCohort` with paths, spot centres, features and counts per section.
    """
    import pandas as pd

    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    mpps = [float(mpp)] * n_slides if isinstance(mpp, int | float) else [float(m) for m in mpp]
    n_patients = n_slides if n_patients is None else n_patients
    looks = _patient_looks(n_patients, seed, stain_matrix, stain_shift, blur_sigma_px)
    genes = [f"GENE{g:03d}" for g in range(n_genes)]
    # gene programme: each gene follows one main feature (or none: housekeeping-like noise)
    driver = np.arange(n_genes) % (len(FEATURES) + 1)
    weights = rng.normal(0.0, 0.15, size=(n_genes, len(FEATURES)))
    for g, d in enumerate(driver):
        if d < len(FEATURES):
            weights[g, d] = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.5)
    base = rng.uniform(np.log(3.0), np.log(40.0), size=n_genes)
    # standardise features with fixed, plausible scales so slides share one gene model
    f_mean = np.array([0.25, 0.55, 0.3, 0.3, 0.2])
    f_std = np.array([0.12, 0.08, 0.06, 0.35, 0.3])

    cohort = SyntheticCohort(root=root, genes=genes)
    for i in range(n_slides):
        patient = chr(ord("A") + i % n_patients)
        look = looks[i % n_patients]
        section = f"{patient}{i // n_patients + 1}"
        m = mpps[i]
        img = root / "data" / "ST-imgs" / patient / section / f"synthetic_HE_{section}.tif"
        img.parent.mkdir(parents=True, exist_ok=True)
        slide_seed = seed * 1000 + i
        write_synthetic_slide(
            img,
            width,
            height,
            mpp=m,
            seed=slide_seed,
            stain_matrix=None if look is None else look.stain,
            blur_sigma_px=0.0 if look is None else look.blur,
        )
        tex = _texture(width, height, m, slide_seed, False)  # features: of the tissue, whatever its look

        pitch = 200.0 / m
        radius = 50.0 / m
        nx = int((width - 2 * radius) // pitch)
        ny = int((height - 2 * radius) // pitch)
        ox = (width - (nx - 1) * pitch) / 2
        oy = (height - (ny - 1) * pitch) / 2
        ax, ay = np.meshgrid(np.arange(1, nx + 1), np.arange(1, ny + 1))
        ax, ay = ax.ravel(), ay.ravel()
        new_x = ax + rng.normal(0, 0.02, ax.size)
        new_y = ay + rng.normal(0, 0.02, ay.size)
        px = ox + (new_x - 1) * pitch
        py = oy + (new_y - 1) * pitch
        inside = np.array([bool(tex.tissue(np.array([x]), np.array([y]))[0, 0]) for x, y in zip(px, py, strict=True)])
        order = np.argsort((px - tex.centre[0]) ** 2 + (py - tex.centre[1]) ** 2, kind="stable")
        keep = np.sort(order[inside[order]][:n_spots])
        ax, ay, new_x, new_y, px, py = (a[keep] for a in (ax, ay, new_x, new_y, px, py))
        spot_ids = [f"{a}x{b}" for a, b in zip(ax, ay, strict=True)]

        feats = np.stack([_spot_features(tex, x, y, radius) for x, y in zip(px, py, strict=True)])
        z = (feats - f_mean) / f_std
        lib = rng.lognormal(0.0, 0.2, size=(len(keep), 1))
        log_rate = base[None, :] + 0.5 * z @ weights.T + rng.normal(0.0, 0.15, size=(len(keep), n_genes))
        counts = rng.poisson(lib * np.exp(np.clip(log_rate, -10, 8))).astype(np.int64)

        counts_path = root / "data" / "ST-cnts" / f"{section}.tsv.gz"
        spots_path = root / "data" / "ST-spotfiles" / f"{section}_selection.tsv"
        counts_path.parent.mkdir(parents=True, exist_ok=True)
        spots_path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(counts, index=spot_ids, columns=genes).to_csv(counts_path, sep="\t", compression="gzip")
        pd.DataFrame(
            {
                "x": ax,
                "y": ay,
                "new_x": np.round(new_x, 3),
                "new_y": np.round(new_y, 3),
                "pixel_x": np.round(px, 2),
                "pixel_y": np.round(py, 2),
                "selected": 1,
            }
        ).to_csv(spots_path, sep="\t", index=False)
        cohort.sections.append(
            SyntheticSection(
                section=section,
                patient=patient,
                image_path=img,
                counts_path=counts_path,
                spots_path=spots_path,
                mpp=m,
                width=width,
                height=height,
                spot_ids=spot_ids,
                centers_xy=np.stack([np.round(px, 2), np.round(py, 2)], axis=1),
                features=feats,
                counts=counts,
                stain_matrix=None if look is None or look.stain is None else look.stain.copy(),
                blur_sigma_px=0.0 if look is None else look.blur,
            )
        )
    LOG.info("wrote synthetic cohort of %d sections to %s", n_slides, root)
    return cohort


def _per_patient(value: Any, n_patients: int, name: str) -> list[Any]:
    """One value per patient: ``value`` for all, or a sequence of ``n_patients``."""
    try:
        single = value is None or isinstance(value, str | int | float) or np.shape(value) == (3, 2)
    except ValueError:  # a ragged list: one value per patient
        single = False
    values = [value] * n_patients if single else list(value)
    if len(values) != n_patients:
        msg = f"{name}: {len(values)} values for {n_patients} patients; give one, or one per patient"
        raise BadInput(msg)
    return values


def _patient_looks(
    n_patients: int, seed: int, stain_matrix: Any, stain_shift: float, blur_sigma_px: Any
) -> list[_Look | None]:
    """The stain and blur of each patient (None: the default rendering)."""
    if not (math.isfinite(stain_shift) and stain_shift >= 0):
        msg = f"stain_shift={stain_shift}: give a standard deviation >= 0"
        raise BadInput(msg)
    stains = _per_patient(stain_matrix, n_patients, "stain_matrix")
    blurs = _per_patient(blur_sigma_px, n_patients, "blur_sigma_px")
    looks = []
    for p in range(n_patients):
        base = _stain_matrix(stains[p])
        if stain_shift > 0:
            base = _stain_matrix("reference") if base is None else base
            rng = np.random.default_rng((seed, 0x57A1, p))  # its own stream: the cohort's other draws are unchanged
            # each OD component scaled by its own log-normal factor: hues shift, no component turns negative
            direction = base / np.linalg.norm(base, axis=0) * np.exp(rng.normal(0, stain_shift, (3, 2)))
            intensity = np.linalg.norm(base, axis=0) * np.exp(rng.normal(0, stain_shift, 2))
            base = direction / np.linalg.norm(direction, axis=0) * intensity
        looks.append(_look(base, blurs[p]))
    return looks


def seeded_embeddings(
    n: int = 480, d_img: int = 48, n_genes: int = 20, n_slides: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded image embeddings, expression and slide ids with a known shared signal.

    A few informative directions of the embeddings are buried under loud nuisance
    dimensions (so raw kNN is poor and an aligner helps); expression is a nonlinear
    function of the same latent factors.

    Returns
    -------
    ``(n, d_img)`` float32 embeddings, ``(n, n_genes)`` float32 expression, ``(n,)`` slide ids.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    img = np.concatenate([z @ rng.standard_normal((4, 8)), 6 * rng.standard_normal((n, d_img - 8))], axis=1)
    expr = np.log1p(np.exp(z @ rng.standard_normal((4, n_genes)))) + 0.05 * rng.standard_normal((n, n_genes))
    slides = np.repeat([f"s{i}" for i in range(n_slides)], n // n_slides)
    return img.astype(np.float32), expr.astype(np.float32), slides
