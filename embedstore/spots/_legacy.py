"""Legacy Spatial Transcriptomics (Ståhl 2016 arrays: her2st, STUtility): counts + spot table + image."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from embedstore.errors import BadInput
from embedstore.slides import tiff_mpp
from embedstore.spots._common import (
    LEGACY_ST_PITCH_UM,
    LEGACY_ST_SPOT_UM,
    build_adata,
    check_counts,
    check_inside,
    check_unique,
    first_line,
    need_file,
    read_tsv,
    resolve_mpp,
)

if TYPE_CHECKING:
    from anndata import AnnData

LOG = logging.getLogger(__name__)

_SPOT_ID = re.compile(r"^\d+(\.\d+)?x\d+(\.\d+)?$")


# ----------------------------------------------------------------------------------- legacy ST


def _pitch_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, pitch_um: float) -> tuple[float, float] | None:
    """Per-axis µm/px from an affine fit of pixel against array coordinates, or None if underdetermined."""
    a, p = np.asarray(array_xy, float), np.asarray(pixel_xy, float)
    ok = np.isfinite(a).all(1) & np.isfinite(p).all(1)
    a, p = a[ok], p[ok]
    design = np.column_stack([np.ones(len(a)), a])
    if len(a) < 3 or np.linalg.matrix_rank(design) < 3:
        return None
    keep = np.ones(len(a), bool)
    for _ in range(3):
        # Least squares, then drop misplaced spots (residual far beyond the typical one) and refit.
        coef = np.linalg.lstsq(design[keep], p[keep], rcond=None)[0]
        resid = np.hypot(*(p - design @ coef).T)
        cut = max(5.0 * 1.4826 * float(np.median(resid[keep])), 1.0)
        new = resid <= cut
        if new.sum() < 3 or np.linalg.matrix_rank(design[new]) < 3 or (new == keep).all():
            break
        keep = new
    # Columns 1 and 2 of coef are the pixel displacement per array unit along x and along y
    # (their norms survive rotation of the image against the array).
    px_per_unit = np.hypot(coef[1], coef[2])
    steps = []
    for axis in (0, 1):
        # Grid step in array units: the usual gap between neighbours sharing the other coordinate
        # (1 on her2st's square grid, 2 on the staggered 2k arrays of STUtility's MOB).
        df = pd.DataFrame({"u": a[:, axis], "v": a[:, 1 - axis]}).drop_duplicates().sort_values(["v", "u"])
        gaps = df.groupby("v")["u"].diff().dropna().round(6)
        gaps = gaps[gaps > 0]
        steps.append(float(gaps.mode().min()) if len(gaps) else np.nan)
    if np.isnan(steps).all():
        return None
    pitch_px = px_per_unit * np.where(np.isnan(steps), np.nanmax(steps), steps)
    return pitch_um / float(pitch_px[0]), pitch_um / float(pitch_px[1])


def estimate_mpp_from_pitch(array_xy: np.ndarray, pixel_xy: np.ndarray, pitch_um: float = LEGACY_ST_PITCH_UM) -> float:
    """µm/px of an image from spot positions on a regular array of known pitch.

    Fits pixel = affine(array) robustly (least squares, refit without outlying spots), takes the
    pixel distance of one grid step along each array axis and returns ``pitch_um`` divided by
    their mean.

    Parameters
    ----------
    array_xy
        (n, 2) array coordinates of the spots (legacy ST ``x``, ``y``).
    pixel_xy
        (n, 2) spot centres in image pixels (x = column, y = row).
    pitch_um
        Centre-to-centre distance of neighbouring spots along an axis (200 µm for legacy ST).

    Returns
    -------
    µm per pixel.
    """
    found = _pitch_mpp(array_xy, pixel_xy, pitch_um)
    if found is None:
        msg = "spot positions: too few spots off one line to fit the spot pitch; pass mpp=<µm per pixel>"
        raise BadInput(msg)
    mx, my = found
    return 2.0 * pitch_um / (pitch_um / mx + pitch_um / my)


def _read_counts_table(path: Path) -> tuple[sparse.csr_matrix, list[str], list[str]]:
    """Counts TSV in either orientation -> (spots × genes CSR, spot ids, genes)."""
    need_file(path, "count table")
    header = first_line(path).split("\t")
    df = read_tsv(path, "count table", index_col=0, low_memory=False)
    if df.shape[1] == 0 or len(header) not in (df.shape[1], df.shape[1] + 1):
        msg = f"{path}: not a tab-separated count table (found {df.shape[1] + 1} columns); give spots × genes or genes × spots TSV"
        raise BadInput(msg)
    # Raw labels, since pandas renames repeated ones ("A.1") and would hide duplicates;
    # R's write.table leaves the row-name column out of the header, hence the [-n:].
    cols = header[-df.shape[1] :]
    row_ids = df.index.astype(str)
    rows_spots = np.mean([bool(_SPOT_ID.match(s)) for s in row_ids])
    cols_spots = np.mean([bool(_SPOT_ID.match(s)) for s in cols])
    if max(rows_spots, cols_spots) < 0.9:
        msg = f"{path}: neither rows nor columns are labelled with spot ids like '10x14'; give a legacy ST count table"
        raise BadInput(msg)
    try:
        values = df.to_numpy(dtype=np.float32)
    except (ValueError, TypeError) as e:
        msg = f"{path}: count table holds non-numeric values ({e}); give raw integer counts"
        raise BadInput(msg) from e
    if rows_spots >= cols_spots:
        spots, genes = list(row_ids), cols
    else:
        spots, genes, values = cols, list(row_ids), values.T
    check_unique(spots, path)
    x = sparse.csr_matrix(np.where(np.isfinite(values), values, -1.0))  # NaN/inf -> -1: check_counts reports it
    check_counts(x, path)
    return x, spots, genes


def _spot_label(v: np.ndarray) -> np.ndarray:
    return np.array([f"{int(a)}" if float(a).is_integer() else f"{a:g}" for a in v])


def _read_spot_table(path: Path) -> pd.DataFrame:
    need_file(path, "spot table")
    df = read_tsv(path, "spot table")
    df.columns = [str(c).strip() for c in df.columns]
    need = ["x", "y", "pixel_x", "pixel_y"]
    if missing := [c for c in need if c not in df.columns]:
        msg = f"{path}: spot table lacks columns {missing}; give a TSV with columns x y pixel_x pixel_y [selected]"
        raise BadInput(msg)
    try:
        pos = df[[*need, *(["selected"] if "selected" in df.columns else [])]].astype(float)
    except ValueError as e:
        msg = f"{path}: spot table holds non-numeric coordinates ({e}); give numbers in x y pixel_x pixel_y"
        raise BadInput(msg) from e
    if "selected" not in pos.columns:
        pos["selected"] = 1.0
    pos.index = pd.Index(
        [f"{a}x{b}" for a, b in zip(_spot_label(pos["x"].to_numpy()), _spot_label(pos["y"].to_numpy()), strict=True)]
    )
    check_unique(pos.index, path, "spot positions (x, y)")
    return pos


def read_legacy_st(
    counts_path: str | Path,
    spots_path: str | Path,
    image_path: str | Path | None = None,
    slide_id: str | None = None,
    mpp: float | None = None,
    *,
    patient: str | None = None,
    allow_missing_positions: bool = False,
) -> AnnData:
    """Read one legacy ST section (her2st, STUtility): counts + spot table + image.

    Spots are joined on ``"{x}x{y}"``; only spots with ``selected == 1`` and counts are kept
    (spot-table rows without counts are normal and dropped). Counts whose spot the table does not
    list are an error (the files do not belong together), except when the table lists the whole
    array including unselected positions, as STUtility's alignment tables do: there an unlisted
    spot is one the alignment left out, and it is dropped with a warning.

    Parameters
    ----------
    counts_path
        TSV or TSV.gz of raw counts, spots × genes or genes × spots (detected from the
        ``"{x}x{y}"`` labels).
    spots_path
        Spot selection / alignment table: ``x y [new_x new_y] pixel_x pixel_y [selected]``.
    image_path
        H&E image the pixel coordinates refer to (JPEG, PNG, TIFF); spots must lie inside it.
    slide_id
        Section name; default: the counts file name without suffixes.
    mpp
        µm/px of the image; default: TIFF resolution tags, else the 200 µm spot pitch.
    patient
        Patient the section comes from, when known.
    allow_missing_positions
        Drop counted spots without a position instead of raising.

    Returns
    -------
    AnnData as described in the module docstring (``technology="legacy_st"``).
    """
    counts_path, spots_path = Path(counts_path), Path(spots_path)
    image = need_file(image_path, "image") if image_path is not None else None
    slide_id = slide_id or counts_path.name.split(".")[0]
    x, spot_ids, genes = _read_counts_table(counts_path)
    pos = _read_spot_table(spots_path)

    listed = pd.Index(spot_ids).isin(pos.index)
    if not listed.all():
        n_miss = int((~listed).sum())
        whole_array = bool((pos["selected"] == 0).any())
        if not (allow_missing_positions or whole_array):
            msg = (
                f"{counts_path}: {n_miss} of {len(spot_ids)} spots in the counts have no position in "
                f"{spots_path.name}; give the spot table of the same section, or pass "
                "allow_missing_positions=True to drop them"
            )
            raise BadInput(msg)
        LOG.warning("%s: dropped %d counted spots without a position in %s", counts_path, n_miss, spots_path.name)
    sel = pos.reindex(np.asarray(spot_ids)[listed])
    keep = np.flatnonzero(listed)[sel["selected"].to_numpy() == 1]
    if len(keep) == 0:
        msg = (
            f"{counts_path}: no counted spot is selected in {spots_path.name}; give the spot table of the same section"
        )
        raise BadInput(msg)
    LOG.info("%s: %d spots kept of %d counted and %d listed", slide_id, len(keep), len(spot_ids), len(pos))
    kept_ids = [spot_ids[i] for i in keep]
    rows = pos.loc[kept_ids]
    xy = rows[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    if image is not None:
        check_inside(xy, image, spots_path)

    pitch = _pitch_mpp(pos[["x", "y"]].to_numpy(), pos[["pixel_x", "pixel_y"]].to_numpy(), LEGACY_ST_PITCH_UM)
    pitch_mpp = None if pitch is None else 2.0 / (1.0 / pitch[0] + 1.0 / pitch[1])
    tag_mpp = tiff_mpp(image) if image is not None else None
    value, source = resolve_mpp(
        mpp,
        [("tiff_tags", tag_mpp), ("spot_pitch", pitch_mpp)],
        spots_path,
        "no TIFF resolution tags and too few spots to fit the 200 µm pitch",
    )
    if pitch_mpp is not None and source != "spot_pitch" and abs(value / pitch_mpp - 1) > 0.2:
        LOG.warning("%s: mpp %.4g (%s) differs from the spot-pitch estimate %.4g", slide_id, value, source, pitch_mpp)
    info = {
        "mpp": value,
        "mpp_source": source,
        "spot_diameter_um": LEGACY_ST_SPOT_UM,
        "image_path": None if image is None else str(image),
        "technology": "legacy_st",
        "slide_id": slide_id,
        "patient": patient,
        "counts_path": str(counts_path),
        "spots_path": str(spots_path),
    }
    extra = {"array_col": rows["x"].to_numpy(), "array_row": rows["y"].to_numpy()}
    return build_adata(x[keep], kept_ids, genes, xy, info, counts_path, obs_extra=extra)
