"""HEST-1k samples: ``st/<id>.h5ad`` + ``wsis/<id>.tif`` + ``metadata/<id>.json``."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from embedstore._schema import OBSM_SPATIAL
from embedstore.errors import BadInput
from embedstore.slides import tiff_mpp
from embedstore.spots._common import (
    IMAGE_SUFFIXES,
    LEGACY_ST_SPOT_UM,
    VISIUM_SPOT_UM,
    build_adata,
    check_counts,
    check_inside,
    check_unique,
    need_file,
    resolve_mpp,
)

if TYPE_CHECKING:
    from anndata import AnnData


# ---------------------------------------------------------------------------------------- HEST


def _hest_paths(path: Path, sample_id: str | None) -> tuple[Path, Path | None, Path | None]:
    """(h5ad, image or None, metadata JSON or None) of one HEST-1k sample."""
    if path.is_dir():
        st = path / "st" if (path / "st").is_dir() else path
        ids = sorted(p.stem for p in st.glob("*.h5ad"))
        if sample_id is None and len(ids) == 1:
            sample_id = ids[0]
        if sample_id is None or sample_id not in ids:
            msg = f"{path}: {'no' if not ids else 'which'} HEST sample {sample_id or ''} (found {ids[:10]}); pass sample_id=<one of them>"
            raise BadInput(msg)
        h5ad, root = st / f"{sample_id}.h5ad", path
    else:
        h5ad = need_file(path, "HEST .h5ad")
        sample_id = h5ad.stem
        root = h5ad.parent.parent if h5ad.parent.name == "st" else h5ad.parent
    image = next(
        (
            root / d / f"{sample_id}{s}"
            for d in ("wsis", ".")
            for s in IMAGE_SUFFIXES
            if (root / d / f"{sample_id}{s}").is_file()
        ),
        None,
    )
    meta = next(
        (root / d / f"{sample_id}.json" for d in ("metadata", ".") if (root / d / f"{sample_id}.json").is_file()), None
    )
    return h5ad, image, meta


def read_hest(
    path: str | Path,
    sample_id: str | None = None,
    mpp: float | None = None,
    *,
    slide_id: str | None = None,
    patient: str | None = None,
) -> AnnData:
    """Read one HEST-1k sample: ``st/<id>.h5ad`` + ``wsis/<id>.tif`` + ``metadata/<id>.json``.

    Spot centres come from ``obsm["spatial"]`` (level-0 px of the WSI), or the
    ``pxl_col_in_fullres``/``pxl_row_in_fullres`` obs columns; spots with ``in_tissue == 0`` are
    dropped. µm/px: ``mpp``, else the metadata's ``pixel_size_um_estimated``, then
    ``pixel_size_um_embedded``, then the TIFF resolution tags.

    Parameters
    ----------
    path
        The HEST root (holding ``st/``, ``wsis/``, ``metadata/``) or the sample's ``.h5ad``.
    sample_id
        Sample to read from a root holding several.
    mpp
        µm/px of the WSI, overriding the metadata.
    slide_id
        Section name; default: the sample id.
    patient
        Patient id; default: the metadata's ``patient`` when present.

    Returns
    -------
    AnnData as described in the module docstring (``technology="hest"``).
    """
    import anndata as ad

    h5ad, image, meta_path = _hest_paths(Path(path), sample_id)
    meta: dict[str, Any] = {}
    if meta_path is not None:
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = f"{meta_path}: not valid JSON ({e}); give HEST's metadata/<id>.json"
            raise BadInput(msg) from e
    try:
        src = ad.read_h5ad(h5ad)
    except (OSError, KeyError, ValueError, EOFError, zlib.error) as e:
        msg = f"{h5ad}: not a readable AnnData .h5ad ({e}); give HEST's st/<id>.h5ad"
        raise BadInput(msg) from e
    if "in_tissue" in src.obs.columns:
        src = src[src.obs["in_tissue"].astype(float).to_numpy() == 1]
    if OBSM_SPATIAL in src.obsm:
        xy = np.asarray(src.obsm[OBSM_SPATIAL], dtype=np.float64)[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(src.obs.columns):
        xy = src.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    else:
        msg = (
            f"{h5ad}: no spot centres (obsm['spatial'] or obs pxl_col_in_fullres/pxl_row_in_fullres); give a HEST .h5ad"
        )
        raise BadInput(msg)
    check_unique(src.obs_names, h5ad)
    x = sparse.csr_matrix(src.X, dtype=np.float32)
    check_counts(x, h5ad)
    if image is not None:
        check_inside(xy, image, h5ad)

    def num(key: str) -> float | None:
        try:
            return float(meta[key])
        except (KeyError, TypeError, ValueError):
            return None

    value, source = resolve_mpp(
        mpp,
        [
            ("pixel_size_um_estimated", num("pixel_size_um_estimated")),
            ("pixel_size_um_embedded", num("pixel_size_um_embedded")),
            ("tiff_tags", tiff_mpp(image) if image is not None else None),
        ],
        meta_path or h5ad,
        "no pixel_size_um_* in the metadata JSON and no TIFF resolution tags",
    )
    tech = str(meta.get("st_technology") or "")
    diameter = num("spot_diameter") or {"visium": VISIUM_SPOT_UM, "spatial transcriptomics": LEGACY_ST_SPOT_UM}.get(
        tech.lower(), float("nan")
    )
    sid = slide_id or h5ad.stem
    patient = patient if patient is not None else meta.get("patient")
    info = {
        "mpp": value,
        "mpp_source": source,
        "spot_diameter_um": float(diameter),
        "image_path": None if image is None else str(image),
        "technology": "hest",
        "st_technology": tech or None,
        "slide_id": sid,
        "patient": None if patient is None or pd.isna(patient) else str(patient),
    }
    extra = {k: src.obs[k].to_numpy() for k in ("array_row", "array_col") if k in src.obs.columns}
    return build_adata(x, list(src.obs_names), list(src.var_names), xy, info, h5ad, obs_extra=extra)
