"""Shared pieces of the spot readers: file checks, image headers, choice of µm/px, AnnData build."""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from embedstore._schema import OBSM_SPATIAL, UNS_KEY, Col
from embedstore.errors import BadInput
from embedstore.slides import check_mpp, plausible_mpp

if TYPE_CHECKING:
    from anndata import AnnData

LOG = logging.getLogger(__name__)

# Physical geometry of the arrays (µm), from the technologies' specifications.
VISIUM_SPOT_UM = 55.0
LEGACY_ST_SPOT_UM = 100.0
LEGACY_ST_PITCH_UM = 200.0
IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")


# A gzip file cut short raises EOFError (which click reports as a bare "Aborted!") or zlib.error.
TRUNCATED = (EOFError, zlib.error)

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
    except TRUNCATED as e:
        msg = f"{path}: the file is truncated or corrupted ({type(e).__name__}: {e}); copy or download it again"
        raise BadInput(msg) from e
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{path}: not a text table ({type(e).__name__}: {e}); give a tab-separated (optionally gzipped) file"
        raise BadInput(msg) from e


def read_tsv(path: Path, what: str, **kw: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", **kw)
    except TRUNCATED as e:
        msg = f"{path}: the {what} is truncated or corrupted ({type(e).__name__}: {e}); copy or download the file again"
        raise BadInput(msg) from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
        msg = f"{path}: not a readable {what} ({type(e).__name__}: {e}); give a tab-separated (optionally gzipped) file"
        raise BadInput(msg) from e


# ----------------------------------------------------------------------------------- validation


def check_counts(x: sparse.csr_matrix, where: Path) -> None:
    """Raw counts are finite, non-negative integers; normalised values (fractions) are refused."""
    bad = ~np.isfinite(x.data) | (x.data < 0)
    if bad.any():
        msg = f"{where}: {int(bad.sum())} negative or NaN counts; give raw, non-negative UMI counts"
        raise BadInput(msg)
    fractional = x.data != np.round(x.data)
    if fractional.any():
        example = float(x.data[np.flatnonzero(fractional)[0]])
        msg = (
            f"{where}: {int(fractional.sum())} fractional values (e.g. {example:.4g}) in a raw-count table; "
            "pass raw integer counts; this looks normalised"
        )
        raise BadInput(msg)


def merge_duplicate_genes(
    x: sparse.csr_matrix, genes: Sequence[str], where: Path, var_extra: dict[str, Any] | None = None
) -> tuple[sparse.csr_matrix, list[str], dict[str, Any] | None]:
    """Sum the columns of genes named more than once, with a warning naming the file.

    A symbol mapped from several ids (10x features, her2st/STUtility tables keyed by symbol)
    counts transcripts of one gene, so its counts add up. Annotations such as ``gene_ids`` keep
    every id, joined with ``;``.
    """
    names = pd.Index([str(g) for g in genes])
    if names.is_unique:
        return x, list(names), var_extra
    codes, unique = pd.factorize(names)
    n_merged = int(names.duplicated(keep=False).sum())
    LOG.warning(
        "%s: %d columns share %d gene names (e.g. %s); their counts were summed into one column per gene",
        where,
        n_merged,
        int(names[names.duplicated()].nunique()),
        names[names.duplicated()].unique()[:3].tolist(),
    )
    merge = sparse.csr_matrix((np.ones(len(names), np.float32), (np.arange(len(names)), codes)))
    merged = sparse.csr_matrix(x @ merge, dtype=np.float32)
    extra = None
    if var_extra is not None:
        extra = {
            k: pd.Series(np.asarray(v, dtype=str)).groupby(codes).agg(lambda s: ";".join(dict.fromkeys(s))).tolist()
            for k, v in var_extra.items()
        }
    return merged, [str(g) for g in unique], extra


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
    where: Path,
    obs_extra: dict[str, Any] | None = None,
    var_extra: dict[str, Any] | None = None,
) -> AnnData:
    import anndata as ad

    x, genes, var_extra = merge_duplicate_genes(x, genes, where, var_extra)

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
    return adata


def resolve_mpp(
    mpp: float | None, candidates: Sequence[tuple[str, float | None]], where: Path, how: str
) -> tuple[float, str]:
    """``(µm/px, source)``: the user's ``mpp`` (refused when implausible), else the first plausible candidate."""
    if mpp is not None:
        return check_mpp(mpp, where), "user"
    for source, value in candidates:
        if plausible_mpp(value):
            return float(value), source
    msg = f"{where}: µm/px is missing and cannot be derived ({how}); pass mpp=<µm per pixel of the image>"
    raise BadInput(msg)
