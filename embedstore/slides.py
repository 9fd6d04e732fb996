"""Open a slide: whole-slide images through OpenSlide, plain JPEG/PNG/TIFF through Pillow.

A :class:`Slide` gives level-0 dimensions, the pyramid levels, µm/px, region reads as RGB uint8
(outside the slide is white) and a thumbnail. µm/px is never assumed: it comes from the slide
metadata, from the caller (``mpp=``, or a cohort CSV read by :func:`read_mpp_csv`), or the open
fails with :class:`~embedstore.errors.BadInput` saying how to give it.

Handles are per process: a :class:`Slide` must not be pickled or shared across processes (the
tiling reader reopens it in each worker). OpenSlide handles are thread-safe, so threads of one
process may share one.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore._optional import import_optional
from embedstore.errors import BadInput

if TYPE_CHECKING:
    from PIL import Image

LOG = logging.getLogger(__name__)

__all__ = [
    "PLAUSIBLE_MPP",
    "Slide",
    "check_mpp",
    "lookup_mpp",
    "open_slide",
    "plausible_mpp",
    "read_mpp_csv",
    "tiff_mpp",
    "tissue_mask",
]

# Plain images are decoded whole. Pillow's default bomb limit (89 Mpx) rejects real section scans
# such as her2st's 9,270 × 9,910 JPEGs; 1 Gpx (3 GB decoded RGB) is the most we accept before
# asking for a pyramidal format.
PLAIN_MAX_PIXELS = 1_000_000_000
PLAUSIBLE_MPP = (0.05, 30.0)  # µm/px; why these bounds: plausible_mpp
_MPP_HINT = "pass mpp=... (--mpp) or a CSV with columns slide,mpp (--mpp-csv)"
_WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".czi", ".dcm"}
_TIFF_SUFFIXES = {".tif", ".tiff"}
# TIFF ResolutionUnit: 1 none, 2 inch (the default when the tag is absent), 3 centimetre
_UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0}
_UNIT_CODES = {"none": 1, "inch": 2, "centimeter": 3, "centimetre": 3, "cm": 3}
_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def plausible_mpp(mpp: float | None) -> bool:
    """Whether ``mpp`` is a µm/px an image of a tissue section can have (:data:`PLAUSIBLE_MPP`).

    One range for metadata and for values the user gives. The low end, 0.05, is below the finest
    light-microscope scans (about 0.1 µm/px at 80-100×; optics resolve about 0.2 µm). The high end,
    30, admits the downscaled section images in use: legacy ST images (her2st 0.69, stutility-mob
    about 4 µm/px) and Space Ranger hires (about 4) and lowres images (0.045 × a 0.3-1 µm/px scan,
    7-22 µm/px). Above it lie the resolutions image editors and scanners write by default (600,
    300, 150, 96, 72 dpi = 42.3 ... 352.8 µm/px), which say nothing about the tissue.
    """
    return mpp is not None and math.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def check_mpp(mpp: Any, where: str | Path) -> float:
    """``mpp`` as a float; :class:`BadInput` naming ``where`` when it is not a plausible µm/px."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not plausible_mpp(value):
        lo, hi = PLAUSIBLE_MPP
        msg = f"{where}: mpp={mpp} is not a plausible µm/px (expected {lo:g}-{hi:g}); pass the level-0 µm/px"
        raise BadInput(msg)
    return value


def _kept(mpp: float, source: str, where: str | Path) -> float | None:
    if plausible_mpp(mpp):
        return mpp
    LOG.info(
        "%s: %s gives %.4g µm/px, outside %g-%g; ignored as no physical pixel size", where, source, mpp, *PLAUSIBLE_MPP
    )
    return None


def _unit_code(unit: Any) -> int | None:
    if unit is None:
        return 2
    if isinstance(unit, str):
        name = unit.strip().lower()
        return int(name) if name.isdigit() else _UNIT_CODES.get(name)
    try:
        return int(unit)
    except (TypeError, ValueError):
        return None


def _mpp_from_resolution(xres: Any, unit: Any, where: str | Path) -> float | None:
    """µm/px from a TIFF XResolution (pixels per unit: number, numeric string or ``(num, den)``) and
    ResolutionUnit (code, enum or name such as OpenSlide's ``"centimeter"``); None when absent,
    unitless or implausible."""
    try:
        per_unit = float(xres[0]) / float(xres[1]) if isinstance(xres, tuple) else float(xres)
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    um_per_unit = _UM_PER_UNIT.get(_unit_code(unit))
    if um_per_unit is None or not (math.isfinite(per_unit) and per_unit > 0):
        return None
    return _kept(um_per_unit / per_unit, "the resolution tags", where)


def tiff_mpp(path: str | Path) -> float | None:
    """Level-0 µm/px that a TIFF file states about itself, or None.

    Reads the first page: an Aperio ``MPP =`` in the description, else the XResolution and
    ResolutionUnit tags (inch when the unit tag is absent, as TIFF specifies; unit "none" is no
    physical size). A value outside :data:`PLAUSIBLE_MPP` counts as absent. Other formats give
    None: JPEG/PNG dpi is no physical scale.

    Raises
    ------
    BadInput
        The file has a TIFF suffix but is not a readable TIFF.
    """
    path = Path(path)
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            description = page.description or ""
            xres, unit = (getattr(page.tags.get(name), "value", None) for name in ("XResolution", "ResolutionUnit"))
    except (OSError, ValueError, IndexError) as e:  # tifffile.TiffFileError is a ValueError
        msg = f"{path}: not a readable TIFF ({e}); copy or export the file again, or give a JPEG/PNG"
        raise BadInput(msg) from e
    found = _APERIO_MPP.search(description)
    aperio = _kept(float(found.group(1)), "the Aperio description", path) if found else None
    return aperio if aperio is not None else _mpp_from_resolution(xres, unit, path)


def _allow_big_plain_images() -> None:
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PLAIN_MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = PLAIN_MAX_PIXELS


@functools.lru_cache(maxsize=2)
def _decode_plain(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Decode a plain image once per process (JPEG has no random access); keyed on mtime and size."""
    from PIL import Image

    _allow_big_plain_images()
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        msg = f"{path}: plain image larger than {PLAIN_MAX_PIXELS:,} px; convert it to a pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
        raise BadInput(msg) from e
    except OSError as e:
        msg = f"{path}: truncated or corrupt image ({e}); copy or export the file again"
        raise BadInput(msg) from e


class Slide:
    """An open slide. Use :func:`open_slide` to make one; close it (or use ``with``) when done.

    Attributes
    ----------
    path
        File path.
    slide_id
        Id used in tables (default: the file stem).
    mpp
        Level-0 µm/px.
    dimensions
        Level-0 ``(width, height)``.
    level_count, level_dimensions, level_downsamples
        The pyramid (one level for plain images).
    backend
        ``"openslide"`` or ``"pillow"``.
    """

    def __init__(self, path: Path, slide_id: str, mpp: float, backend: str, handle: Any) -> None:
        self.path = path
        self.slide_id = slide_id
        self.mpp = float(mpp)
        self.backend = backend
        self._osr = handle if backend == "openslide" else None
        self._img: np.ndarray | None = handle if backend == "pillow" else None
        if self._osr is not None:
            self.level_dimensions = [tuple(d) for d in self._osr.level_dimensions]
            self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        else:
            h, w = self._img.shape[:2]
            self.level_dimensions = [(w, h)]
            self.level_downsamples = [1.0]
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.level_count = len(self.level_dimensions)

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.slide_id!r}, {w}x{h}, mpp={self.mpp:.4g}, levels={self.level_count}, {self.backend})"

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> None:
        msg = f"{self.path}: a Slide holds an open file and cannot be pickled; pass the path (TileReader reopens it per process)"
        raise TypeError(msg)

    def close(self) -> None:
        """Release the OpenSlide handle (plain images stay in the per-process decode cache)."""
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        self._img = None

    def level_mpp(self, level: int) -> float:
        """µm/px of a pyramid level."""
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """Coarsest level whose µm/px is at most ``target_mpp`` (the level just finer than the target).

        Falls back to level 0 when even level 0 is coarser than the target (the tile is upsampled).
        """
        best = 0
        for level in range(self.level_count):
            # 1e-3 relative slack: 0.5 µm/px * downsample 2.0004 still counts as 1.0
            if self.level_mpp(level) <= target_mpp * (1 + 1e-3):
                best = level
        return best

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read a region as RGB.

        Parameters
        ----------
        x, y
            Level-0 coordinates of the top-left corner (may be negative or beyond the slide).
        level
            Pyramid level to read from.
        width, height
            Size in pixels of ``level``.

        Returns
        -------
        ``(height, width, 3)`` uint8 (a new, writable array); pixels outside the slide are white (255).
        """
        if self._img is not None:
            return _crop_padded(self._img, int(x), int(y), int(width), int(height))
        return np.array(self.read_region_image(x, y, level, width, height))

    def read_region_image(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """:meth:`read_region` as a PIL RGB image (no numpy round trip: the fast path for resizing)."""
        from PIL import Image

        x, y, width, height = int(x), int(y), int(width), int(height)
        if self._img is not None:
            return Image.fromarray(_crop_padded(self._img, x, y, width, height))
        if self._osr is None:
            msg = f"{self.path}: slide is closed; open it again with open_slide()"
            raise BadInput(msg)
        import openslide

        try:
            rgba = self._osr.read_region((x, y), level, (width, height))
        except openslide.OpenSlideError as e:
            msg = f"{self.path}: cannot read region at ({x}, {y}) level {level} ({e}); the file may be truncated or corrupt"
            raise BadInput(msg) from e
        if rgba.getchannel("A").getextrema()[0] == 255:  # 3x cheaper than all-band extrema
            return rgba.convert("RGB")
        # OpenSlide returns transparent pixels outside the slide and in sparse regions (alpha is
        # already un-premultiplied by openslide-python): composite them on white
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out

    def thumbnail(self, max_size: int = 1024) -> Image.Image:
        """RGB thumbnail whose longer side is at most ``max_size`` (aspect ratio kept)."""
        from PIL import Image

        if self._osr is not None:
            return self._osr.get_thumbnail((max_size, max_size)).convert("RGB")
        if self._img is None:
            msg = f"{self.path}: slide is closed; open it again with open_slide()"
            raise BadInput(msg)
        if self.path.suffix.lower() in {".jpg", ".jpeg"}:
            # JPEG can decode at 1/2, 1/4, 1/8 scale (DCT draft): far faster than reducing the full image
            with Image.open(self.path) as im:
                im.draft("RGB", (max_size, max_size))
                im = im.convert("RGB")
        else:
            im = Image.fromarray(self._img)
        w, h = im.size
        factor = max(1, int(max(w, h) // max_size))
        if factor > 1:
            im = im.reduce(factor)  # box filter: fast and alias-free for integer factors
        im.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
        return im


def _crop_padded(img: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    H, W = img.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0:y1, x0:x1]
    return out


def _openslide_mpp(osr: Any, path: Path) -> float | None:
    props = osr.properties
    try:
        mx = float(props.get("openslide.mpp-x", "nan"))
        my = float(props.get("openslide.mpp-y", "nan"))
    except ValueError:
        mx = my = float("nan")
    if plausible_mpp(mx):
        if plausible_mpp(my) and abs(mx - my) > 0.01 * mx:
            LOG.warning("%s: non-square pixels (mpp-x %.4g, mpp-y %.4g): using mpp-x", path, mx, my)
        return mx
    return _mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"), path)


def open_slide(path: str | Path, mpp: float | None = None, slide_id: str | None = None) -> Slide:
    """Open a whole-slide image or a plain image.

    OpenSlide reads WSI formats (SVS, NDPI, MRXS, SCN, generic pyramidal TIFF, ...); Pillow reads
    plain JPEG/PNG/TIFF (decoded once per process and cached).

    Parameters
    ----------
    path
        Slide file.
    mpp
        Level-0 µm/px; overrides the metadata. Needed when the file has none (JPEG, PNG).
    slide_id
        Id for tables; defaults to the file stem.

    Returns
    -------
    An open :class:`Slide`.

    Raises
    ------
    BadInput
        Missing file, not an image, truncated image, or no µm/px anywhere.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file; check the path"
        raise BadInput(msg)
    if path.is_dir():
        msg = f"{path}: is a folder, not a slide; give the slide file"
        raise BadInput(msg)
    if mpp is not None:
        mpp = check_mpp(mpp, path)
    sid = slide_id or path.stem
    openslide = import_optional("openslide", "slides.open_slide")

    vendor = None
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as e:
        LOG.debug("%s: openslide detect_format failed: %s", path, e)
    if vendor is not None:
        try:
            osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as e:
            msg = f"{path}: OpenSlide cannot open this {vendor} slide ({e}); the file may be truncated or corrupt"
            raise BadInput(msg) from e
        found = _openslide_mpp(osr, path)
        if mpp is None and found is None:
            osr.close()
            msg = f"{path}: no µm/px in the metadata; {_MPP_HINT}"
            raise BadInput(msg)
        if mpp is not None and found is not None and abs(found - mpp) > 0.05 * found:
            LOG.warning("%s: mpp=%g given, metadata says %g; using %g", path, mpp, found, mpp)
        slide = Slide(path, sid, mpp if mpp is not None else found, "openslide", osr)
        _check_readable(slide)
        return slide

    if path.suffix.lower() in _WSI_SUFFIXES:
        msg = f"{path}: OpenSlide does not recognise this {path.suffix} file; it may be truncated, or re-export it"
        raise BadInput(msg)
    from PIL import Image, UnidentifiedImageError

    _allow_big_plain_images()
    try:
        with Image.open(path) as im:
            im.verify()  # header and (PNG) checksums, without decoding the pixels
    except UnidentifiedImageError as e:
        msg = f"{path}: not a slide or image that OpenSlide or Pillow can read; give an SVS/NDPI/MRXS/pyramidal TIFF or a JPEG/PNG/TIFF"
        raise BadInput(msg) from e
    except Image.DecompressionBombError:
        pass  # size is checked, with its own message, in _decode_plain
    except (OSError, SyntaxError) as e:
        msg = f"{path}: truncated or corrupt image ({e}); copy or export the file again"
        raise BadInput(msg) from e
    found = tiff_mpp(path) if mpp is None else None
    if mpp is None and found is None:
        msg = f"{path}: no µm/px in the metadata; {_MPP_HINT}"
        raise BadInput(msg)
    st = path.stat()
    img = _decode_plain(str(path.resolve()), st.st_mtime_ns, st.st_size)
    return Slide(path, sid, mpp if mpp is not None else found, "pillow", img)


def _check_readable(slide: Slide) -> None:
    """Read the last tile of the coarsest level: a truncated file fails here, not mid-tiling."""
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    slide.read_region(int((w - 1) * ds), int((h - 1) * ds), level, 1, 1)


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read a cohort CSV of µm/px per slide.

    Parameters
    ----------
    path
        CSV with columns ``slide`` (file name, stem or slide id) and ``mpp``.

    Returns
    -------
    ``{slide: mpp}``.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such file; give a CSV with columns slide,mpp"
        raise BadInput(msg)
    out: dict[str, float] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = {c.strip().lower(): c for c in reader.fieldnames or []}
            if "slide" not in cols or "mpp" not in cols:
                msg = f"{path}: columns are {reader.fieldnames}; the CSV needs columns slide,mpp"
                raise BadInput(msg)
            for line, row in enumerate(reader, start=2):
                name = (row[cols["slide"]] or "").strip()
                try:
                    value = float(row[cols["mpp"]])
                except (TypeError, ValueError):
                    value = float("nan")
                if not name or not plausible_mpp(value):
                    msg = f"{path}: line {line} has slide={name!r} mpp={row[cols['mpp']]!r}; give a slide name and a µm/px between {PLAUSIBLE_MPP[0]:g} and {PLAUSIBLE_MPP[1]:g}"
                    raise BadInput(msg)
                if name in out and out[name] != value:
                    msg = f"{path}: line {line} gives slide {name!r} mpp={value}, an earlier line {out[name]}; keep one line per slide"
                    raise BadInput(msg)
                out[name] = value
    except (UnicodeDecodeError, csv.Error) as e:
        msg = f"{path}: not a readable CSV ({type(e).__name__}: {e}); give a UTF-8 CSV with columns slide,mpp"
        raise BadInput(msg) from e
    return out


def lookup_mpp(table: dict[str, float], path: str | Path, slide_id: str | None = None) -> float | None:
    """µm/px of a slide in a :func:`read_mpp_csv` table, matched by slide id, file name or stem."""
    path = Path(path)
    for key in (slide_id, path.name, path.stem, str(path)):
        if key is not None and key in table:
            return table[key]
    return None


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of uint8 values (maximum between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between)
    return float(np.argmax(between))


def _low_res(slide: Slide, target_size: int) -> tuple[np.ndarray, float]:
    """An RGB image of the whole slide with its longer side near ``target_size``, and its downsample.

    Reads the coarsest pyramid level whose longer side is at least ``target_size / 2`` (never the
    full-resolution level of a pyramidal slide), reducing it by an integer factor when too large.
    """
    from PIL import Image

    if slide.backend == "pillow":
        thumb = slide.thumbnail(target_size)
        return np.asarray(thumb), slide.dimensions[0] / thumb.width
    level = 0
    for lv in range(slide.level_count):
        if max(slide.level_dimensions[lv]) >= target_size / 2:
            level = lv
    w, h = slide.level_dimensions[level]
    img = slide.read_region(0, 0, level, w, h)
    factor = max(1, int(max(w, h) // target_size))
    if factor > 1:
        img = np.asarray(Image.fromarray(img).reduce(factor))
    return img, slide.dimensions[0] / img.shape[1]


def tissue_mask(slide: Slide, target_size: int = 2048, min_saturation: int = 20) -> tuple[np.ndarray, float]:
    """Tissue mask on a low-resolution image of the slide.

    Saturation (H&E is coloured, glass is grey-white) thresholded with Otsu, but never below
    ``min_saturation``, then closed, hole-filled, opened and cleaned of specks (scipy.ndimage). Runs
    on a coarse pyramid level (longer side between ``target_size / 2`` and ``2 * target_size``), so
    a 100,000 px slide costs about the same as a small one.

    Parameters
    ----------
    slide
        Open slide.
    target_size
        About the longer side of the image the mask is computed on.
    min_saturation
        Lowest saturation (0-255) that counts as tissue; keeps blank slides empty.

    Returns
    -------
    mask
        ``(h, w)`` bool.
    downsample
        Level-0 pixels per mask pixel.

    Raises
    ------
    BadInput
        The mask is empty (blank slide): tiling it would embed glass.
    """
    from scipy import ndimage

    thumb, downsample = _low_res(slide, target_size)
    # per-pixel max and min over the three planes: 5x faster than a reduction over the short last axis
    red, green, blue = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    mx = np.maximum(np.maximum(red, green), blue).astype(np.int32)
    mn = np.minimum(np.minimum(red, green), blue).astype(np.int32)
    sat = ((mx - mn) * 255 // np.maximum(mx, 1)).astype(np.uint8)
    thr = _otsu(sat)
    # When everything is tissue Otsu splits tissue in two; if its lower class is clearly coloured,
    # fall back to the floor so the whole slide counts.
    low = sat[sat <= thr]
    if low.size and low.mean() > 2 * min_saturation:
        thr = min_saturation
    mask = (sat > max(thr, min_saturation)) & (mn < 235)  # near-white pixels are glass whatever their hue
    # closing, fill holes, opening; square structures as separable 1-D max/min filters (fast)
    k = 2 * max(1, round(min(mask.shape) / 512)) + 1
    m8 = mask.view(np.uint8)
    m8 = ndimage.minimum_filter(ndimage.maximum_filter(m8, size=k, mode="nearest"), size=k, mode="nearest")
    m8 = ndimage.binary_fill_holes(m8).view(np.uint8)
    mask = ndimage.maximum_filter(ndimage.minimum_filter(m8, size=k, mode="nearest"), size=k, mode="nearest").astype(
        bool
    )
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= max(16, 1e-4 * mask.size)) + 1
        mask = np.isin(labels, keep)
    if not mask.any():
        msg = f"{slide.path}: no tissue found (the slide looks blank); check the file, or give spot or tile coordinates instead of tissue detection"
        raise BadInput(msg)
    return mask, downsample
