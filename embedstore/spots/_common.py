"""Shared pieces of the spot readers: file checks, image headers, µm/px resolution, AnnData build."""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from embedstore._schema import OBSM_SPATIAL, UNS_KEY, Col
from embedstore.errors import BadInput

if TYPE_CHECKING:
    from anndata import AnnData

LOG = logging.getLogger(__name__)

# Physical geometry of the arrays (µm), from the technologies' specifications.
VISIUM_SPOT_UM = 55.0
LEGACY_ST_SPOT_UM = 100.0
LEGACY_ST_PITCH_UM = 200.0
IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------- files


def need_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        msg = f"{p}: {what} not found; check the path"
        raise BadInput(msg)
    return p


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of level 0, read from the header only."""
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagewidth), int(page.imagelength)
        from PIL import Image

        # Only the header is read, so the decompression-bomb guard (meant for decoding) is lifted.
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as im:
                return im.size
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    except (OSError, ValueError, IndexError) as e:
        msg = f"{path}: not a readable image ({e}); give a JPEG, PNG or TIFF"
        raise BadInput(msg) from e


def tiff_mpp(path: Path | None) -> float | None:
    """µm/px from TIFF resolution tags (or an Aperio ``MPP =`` description), None when absent."""
    if path is None or path.suffix.lower() not in {".tif", ".tiff"}:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            found = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
            if found:
                return float(found.group(1))
            xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
            if xres is None:
                return None
            num, den = xres.value
            unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit is not None else 2)
    except (OSError, ValueError, IndexError) as e:
        msg = f"{path}: not a readable TIFF ({e}); give a JPEG, PNG or TIFF"
        raise BadInput(msg) from e
    if not num or not den or unit_um is None:
        return None
    mpp = unit_um * den / num
    # 72/96/300 dpi defaults give hundreds of µm/px: no physical pixel size, so ignore them.
    return mpp if 0.05 <= mpp <= 20.0 else None


def check_inside(xy: np.ndarray, image: Path, spot_file: Path) -> None:
    w, h = image_size(image)
    out = ~((xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h))
    if out.any():
        msg = (
            f"{spot_file}: {int(out.sum())} of {len(xy)} spot centres lie outside the image {image.name} "
            f"({w} x {h} px); give the full-resolution image these coordinates were aligned to"
        )
        raise BadInput(msg)


def first_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rt") if gz else path.open() as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{path}: not a text table ({e}); give a tab-separated (optionally gzipped) file"
        raise BadInput(msg) from e


def read_tsv(path: Path, what: str, **kw: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
        msg = f"{path}: not a readable {what} ({type(e).__name__}: {e}); give a tab-separated (optionally gzipped) file"
        raise BadInput(msg) from e


# ----------------------------------------------------------------------------------- validation


def check_counts(x: sparse.csr_matrix, where: Path) -> None:
    bad = ~np.isfinite(x.data) | (x.data < 0)
    if bad.any():
        msg = f"{where}: {int(bad.sum())} negative or NaN counts; give raw, non-negative UMI counts"
        raise BadInput(msg)


def check_unique(ids: Sequence[str], where: Path, what: str = "spot ids") -> None:
    s = pd.Index(ids)
    if not s.is_unique:
        dups = s[s.duplicated()].unique()[:5].tolist()
        msg = f"{where}: duplicate {what} {dups}; each spot must appear once"
        raise BadInput(msg)


def build_adata(
    x: sparse.csr_matrix,
    spot_ids: Sequence[str],
    genes: Sequence[str],
    xy: np.ndarray,
    info: dict[str, Any],
    obs_extra: dict[str, Any] | None = None,
    var_extra: dict[str, Any] | None = None,
) -> AnnData:
    import anndata as ad

    slide_id = str(info["slide_id"])
    spot_ids = [str(s) for s in spot_ids]
    obs = pd.DataFrame({Col.SPOT_ID: spot_ids, Col.SLIDE_ID: slide_id}, index=[f"{slide_id}:{s}" for s in spot_ids])
    if info.get("patient") is not None:
        obs[Col.PATIENT] = str(info["patient"])
    for key, val in (obs_extra or {}).items():
        obs[key] = np.asarray(val)
    var = pd.DataFrame(var_extra or {}, index=pd.Index([str(g) for g in genes]))
    adata = ad.AnnData(X=sparse.csr_matrix(x, dtype=np.float32), obs=obs, var=var)
    adata.obsm[OBSM_SPATIAL] = np.asarray(xy, dtype=np.float64)
    adata.uns[UNS_KEY] = info
    if not adata.var_names.is_unique:
        # 10x/HGNC symbol tables repeat a few names; suffix them as scanpy does ("-1", "-2").
        adata.var_names_make_unique()
    return adata


def resolve_mpp(
    mpp: float | None, candidates: Sequence[tuple[str, float | None]], where: Path, how: str
) -> tuple[float, str]:
    if mpp is not None:
        try:
            mpp = float(mpp)
        except (TypeError, ValueError):
            mpp = float("nan")
        if not (np.isfinite(mpp) and mpp > 0):
            msg = f"{where}: mpp={mpp} is not a positive number of µm per pixel; pass e.g. mpp=0.5"
            raise BadInput(msg)
        return float(mpp), "user"
    for source, value in candidates:
        if value is not None and np.isfinite(value) and value > 0:
            return float(value), source
    msg = f"{where}: µm/px is missing and cannot be derived ({how}); pass mpp=<µm per pixel of the image>"
    raise BadInput(msg)
