"""10x Visium Space Ranger ``outs/`` (1.x ``tissue_positions_list.csv``, 2.x+ ``tissue_positions.csv``)."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from embedstore.errors import BadInput
from embedstore.slides import tiff_mpp
from embedstore.spots._common import (
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

LOG = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- Visium


def _read_10x_h5(path: Path) -> tuple[sparse.csr_matrix, list[str], list[str], list[str]]:
    """10x feature-barcode HDF5 -> (barcodes × genes CSR, barcodes, gene names, gene ids)."""
    import h5py

    need_file(path, "10x count matrix")
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            n_genes, n_bc = (int(v) for v in m["shape"][()])
            # Stored CSC genes × barcodes, which is CSR barcodes × genes with the same arrays.
            x = sparse.csr_matrix(
                (m["data"][()].astype(np.float32), m["indices"][()], m["indptr"][()]), shape=(n_bc, n_genes)
            )
            dec = np.char.decode
            barcodes = dec(m["barcodes"][()].astype(bytes)).tolist()
            names = dec(m["features/name"][()].astype(bytes)).tolist()
            ids = dec(m["features/id"][()].astype(bytes)).tolist()
            ftype = dec(m["features/feature_type"][()].astype(bytes)) if "feature_type" in m["features"] else None
    except (OSError, KeyError, ValueError, EOFError, zlib.error) as e:
        msg = f"{path}: not a 10x feature-barcode HDF5 (Space Ranger >= 1.0) ({e}); give filtered_feature_bc_matrix.h5"
        raise BadInput(msg) from e
    if ftype is not None and (ftype != "Gene Expression").any():
        # Antibody or CRISPR features are no transcripts; keep genes only.
        genes_only = np.flatnonzero(ftype == "Gene Expression")
        x = x[:, genes_only]
        names, ids = [names[i] for i in genes_only], [ids[i] for i in genes_only]
    return x, barcodes, names, ids


def _read_visium_positions(spatial: Path) -> pd.DataFrame:
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        path = spatial / name
        if path.is_file():
            break
    else:
        msg = f"{spatial}: no tissue_positions.csv or tissue_positions_list.csv; give a Space Ranger outs/ folder"
        raise BadInput(msg)
    try:
        df = pd.read_csv(path, header=None, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        msg = f"{path}: not a readable CSV ({e}); give Space Ranger's tissue positions file"
        raise BadInput(msg) from e
    if df.shape[1] != 6:
        msg = f"{path}: expected 6 columns ({', '.join(cols)}), found {df.shape[1]}; give Space Ranger's tissue positions file"
        raise BadInput(msg)
    if str(df.iloc[0, 0]).strip() == "barcode":  # Space Ranger >= 2.0 writes a header row
        df = df.iloc[1:]
    df.columns = cols
    try:
        out = df.set_index("barcode").astype(float)
    except ValueError as e:
        msg = f"{path}: non-numeric positions ({e}); give Space Ranger's tissue positions file"
        raise BadInput(msg) from e
    check_unique(out.index, path, "barcodes")
    return out


def read_visium(
    outs_dir: str | Path,
    image_path: str | Path | None = None,
    slide_id: str | None = None,
    mpp: float | None = None,
    *,
    patient: str | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    allow_missing_positions: bool = False,
) -> AnnData:
    """Read a 10x Visium Space Ranger ``outs/`` folder (1.x and 2.x+ position files).

    Keeps spots under tissue. µm/px is ``55 / spot_diameter_fullres`` from
    ``spatial/scalefactors_json.json``, i.e. of the full-resolution image Space Ranger was run on.

    Parameters
    ----------
    outs_dir
        The ``outs/`` folder (or the folder holding it).
    image_path
        The full-resolution image (not part of outs/); spots must lie inside it.
    slide_id
        Section name; default: the sample folder name.
    mpp
        µm/px of the full-resolution image, overriding the scale factors.
    patient
        Patient the section comes from, when known.
    counts_file
        Count matrix inside outs/.
    allow_missing_positions
        Drop barcodes without a position instead of raising.

    Returns
    -------
    AnnData as described in the module docstring (``technology="visium"``), with
    ``var["gene_ids"]`` and ``obs["array_row"]``, ``obs["array_col"]``.
    """
    outs = Path(outs_dir)
    if (outs / "outs" / "spatial").is_dir():
        outs = outs / "outs"
    if not (outs / "spatial").is_dir():
        msg = f"{outs}: no spatial/ folder; give a Space Ranger outs/ folder"
        raise BadInput(msg)
    slide_id = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    image = need_file(image_path, "image") if image_path is not None else None
    x, barcodes, genes, gene_ids = _read_10x_h5(outs / counts_file)
    check_unique(barcodes, outs / counts_file, "barcodes")
    pos = _read_visium_positions(outs / "spatial")

    listed = pd.Index(barcodes).isin(pos.index)
    if not listed.all() and allow_missing_positions:
        LOG.warning("%s: dropped %d barcodes without a tissue position", outs, int((~listed).sum()))
    elif not listed.all():
        msg = (
            f"{outs / counts_file}: {int((~listed).sum())} of {len(barcodes)} barcodes have no tissue position; "
            "give the outs/ folder of the same run, or pass allow_missing_positions=True to drop them"
        )
        raise BadInput(msg)
    in_tissue = np.zeros(len(barcodes), bool)
    in_tissue[listed] = pos.reindex(np.asarray(barcodes)[listed])["in_tissue"].to_numpy() == 1
    keep = np.flatnonzero(in_tissue)
    if len(keep) == 0:
        msg = f"{outs}: no barcode of the count matrix is under tissue; give the outs/ folder of the same run"
        raise BadInput(msg)
    kept = [barcodes[i] for i in keep]
    rows = pos.loc[kept]
    xy = rows[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    if image is not None:
        check_inside(xy, image, outs / "spatial")

    sf_path = outs / "spatial" / "scalefactors_json.json"
    scalefactors: dict[str, Any] = {}
    if sf_path.is_file():
        try:
            scalefactors = json.loads(sf_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = f"{sf_path}: not valid JSON ({e}); give Space Ranger's scalefactors_json.json"
            raise BadInput(msg) from e
    diameter = scalefactors.get("spot_diameter_fullres")
    sf_mpp = VISIUM_SPOT_UM / float(diameter) if diameter else None
    value, source = resolve_mpp(
        mpp,
        [("scalefactors", sf_mpp), ("tiff_tags", tiff_mpp(image) if image is not None else None)],
        sf_path,
        "no spot_diameter_fullres in spatial/scalefactors_json.json",
    )
    info = {
        "mpp": value,
        "mpp_source": source,
        "spot_diameter_um": VISIUM_SPOT_UM,
        "image_path": None if image is None else str(image),
        "technology": "visium",
        "slide_id": slide_id,
        "patient": patient,
        "scalefactors": scalefactors,
    }
    check_counts(x, outs / counts_file)
    extra = {"array_row": rows["array_row"].to_numpy(int), "array_col": rows["array_col"].to_numpy(int)}
    return build_adata(
        x[keep], kept, genes, xy, info, outs / counts_file, obs_extra=extra, var_extra={"gene_ids": gene_ids}
    )
