"""Spatial-transcriptomics readers -> AnnData (Visium outs, HEST-1k samples, legacy ST).

Every reader returns one AnnData per section, in the same shape:

- ``X``: raw counts, ``scipy.sparse.csr_matrix`` of float32 (spots × genes);
- ``obs_names``: ``f"{slide_id}:{spot_id}"``, so they stay unique when sections are stacked;
  ``obs["spot_id"]`` keeps the source's own id (``"{x}x{y}"`` for legacy ST, the barcode for
  Visium/HEST) as the join key with the source files; ``obs["slide_id"]``, and ``obs["patient"]``
  where the layout tells it;
- ``obsm["spatial"]``: spot centres in level-0 pixels of the full-resolution image, float64,
  column 0 = x (image column), column 1 = y (image row), as scanpy/squidpy expect;
- ``uns["embedstore"]``: ``mpp`` (µm/px of that image), ``mpp_source``, ``spot_diameter_um``,
  ``image_path`` (str or None), ``technology`` (``"visium"``, ``"legacy_st"`` or ``"hest"``),
  ``slide_id`` and ``patient``.

µm/px is never assumed: it comes from the user, the source's metadata, the TIFF resolution tags or,
for legacy ST, the 200 µm spot pitch fitted against the pixel coordinates.
"""

from __future__ import annotations

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
from embedstore.spots._common import IMAGE_SUFFIXES, LEGACY_ST_PITCH_UM, LEGACY_ST_SPOT_UM, VISIUM_SPOT_UM
from embedstore.spots._hest import read_hest
from embedstore.spots._legacy import estimate_mpp_from_pitch, read_legacy_st
from embedstore.spots._visium import read_visium

if TYPE_CHECKING:
    from anndata import AnnData

LOG = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "LEGACY_ST_PITCH_UM",
    "LEGACY_ST_SPOT_UM",
    "VISIUM_SPOT_UM",
    "detect_layout",
    "estimate_mpp_from_pitch",
    "read_dataset",
    "read_hest",
    "read_legacy_st",
    "read_visium",
    "stack_sections",
]

_JOINS = ("inner", "outer")
LAYOUTS = (
    "her2st (data/ST-cnts, data/ST-spotfiles, data/ST-imgs/<patient>/<section>/)",
    "STUtility (inst/extdata/counts or a folder of <name>.tsv[.gz] + alignment_table_<name>.tsv + <name>.jpg)",
    "Visium Space Ranger outs/ (spatial/ + filtered_feature_bc_matrix.h5)",
    "HEST-1k (st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json, or one .h5ad file)",
)


# ------------------------------------------------------------------------------ dataset layouts


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _pick_image(folder: Path, stem: str | None = None) -> Path | None:
    """The one image in ``folder`` (named ``stem.*`` if given); TIFF wins over JPEG/PNG."""
    if not folder.is_dir():
        return None
    for suffixes in ((".tif", ".tiff"), (".jpg", ".jpeg", ".png")):
        found = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in suffixes and (stem is None or p.stem == stem)
        )
        if len(found) > 1:
            msg = f"{folder}: several images {[p.name for p in found]}; keep one per section"
            raise BadInput(msg)
        if found:
            return found[0]
    return None


def _counts_stem(p: Path) -> str:
    return p.name.removesuffix(".gz").removesuffix(".tsv")


def _read_her2st(root: Path, **kw: Any) -> list[AnnData]:
    cnts, spotdir, imgs = root / "ST-cnts", root / "ST-spotfiles", root / "ST-imgs"
    out = []
    for counts in sorted((*cnts.glob("*.tsv.gz"), *cnts.glob("*.tsv")), key=lambda p: _natural(p.name)):
        section = _counts_stem(counts)
        spots = next(
            (p for p in (spotdir / f"{section}_selection.tsv", spotdir / f"{section}.tsv") if p.is_file()), None
        )
        if spots is None:
            msg = f"{counts}: no spot file {spotdir / (section + '_selection.tsv')}; add it or remove the counts"
            raise BadInput(msg)
        folders = sorted(imgs.glob(f"*/{section}")) if imgs.is_dir() else []
        patient = folders[0].parent.name if folders else (re.match(r"[A-Za-z]*", section).group(0) or None)
        image = _pick_image(folders[0]) if folders else None
        if image is None:
            LOG.warning("%s: no image under %s; reading the section without one", section, imgs)
        out.append(read_legacy_st(counts, spots, image, section, patient=patient, **kw))
    return out


def _read_stutility(folder: Path, **kw: Any) -> list[AnnData]:
    out = []
    for table in sorted(folder.glob("alignment_table_*.tsv"), key=lambda p: _natural(p.name)):
        name = table.stem.removeprefix("alignment_table_")
        counts = next((p for p in (folder / f"{name}.tsv.gz", folder / f"{name}.tsv") if p.is_file()), None)
        if counts is None:
            msg = f"{table}: no count table {folder / (name + '.tsv.gz')}; add it or remove the alignment table"
            raise BadInput(msg)
        out.append(read_legacy_st(counts, table, _pick_image(folder, name), name, **kw))
    return out


def detect_layout(path: str | Path) -> str | None:
    """Name of the ST layout at ``path`` ("her2st", "stutility", "visium", "hest", "hest-h5ad"), or None."""
    p = Path(path)
    if p.is_file():
        return "hest-h5ad" if p.suffix == ".h5ad" else None
    if (p / "data" / "ST-cnts").is_dir() or (p / "ST-cnts").is_dir():
        return "her2st"
    if (p / "inst" / "extdata" / "counts").is_dir() or any(p.glob("alignment_table_*.tsv")):
        return "stutility"
    if (p / "spatial").is_dir() or (p / "outs" / "spatial").is_dir():
        return "visium"
    if (p / "st").is_dir() and any((p / "st").glob("*.h5ad")):
        return "hest"
    return None


def read_dataset(
    path: str | Path,
    join: str | None = "inner",
    *,
    mpp: float | None = None,
    allow_missing_positions: bool = False,
) -> list[AnnData]:
    """Read every section of a dataset folder, detecting its layout.

    Layouts: her2st (``[data/]ST-cnts``, ``ST-spotfiles``, ``ST-imgs/<patient>/<section>/`` with
    one .tif/.tiff/.jpg/.jpeg/.png; patient = the folder letter), STUtility
    (``inst/extdata/counts`` or a folder of ``<name>.tsv[.gz]`` + ``alignment_table_<name>.tsv``
    + ``<name>.jpg``), a Visium ``outs/`` folder, and HEST-1k (a root with ``st/*.h5ad``, or one
    ``.h5ad``).

    Parameters
    ----------
    path
        Dataset folder (or HEST .h5ad file).
    join
        ``"inner"``: every section keeps the genes common to all; ``"outer"``: every section gets
        the union (absent genes are 0); ``None``: each keeps its own genes.
    mpp
        µm/px of every image, overriding metadata and estimates.
    allow_missing_positions
        Drop counted spots without a position instead of raising (legacy ST, Visium).

    Returns
    -------
    One AnnData per section, in natural name order (C2 before C10).
    """
    if join is not None and join not in _JOINS:
        msg = f"join={join!r}: unknown; use 'inner', 'outer' or None"
        raise BadInput(msg)
    p = Path(path)
    if not p.exists():
        msg = f"{p}: dataset folder not found; check the path"
        raise BadInput(msg)
    legacy = {"mpp": mpp, "allow_missing_positions": allow_missing_positions}
    layout = detect_layout(p)
    if layout == "hest-h5ad":
        sections = [read_hest(p, mpp=mpp)]
    elif layout == "her2st":
        sections = _read_her2st(p / "data" if (p / "data" / "ST-cnts").is_dir() else p, **legacy)
    elif layout == "stutility":
        stutility = p / "inst" / "extdata" / "counts"
        sections = _read_stutility(stutility if stutility.is_dir() else p, **legacy)
    elif layout == "visium":
        sections = [read_visium(p, mpp=mpp, allow_missing_positions=allow_missing_positions)]
    elif layout == "hest":
        ids = sorted((q.stem for q in (p / "st").glob("*.h5ad")), key=_natural)
        sections = [read_hest(p, sample_id=i, mpp=mpp) for i in ids]
    else:
        msg = f"{p}: unknown dataset layout; give one of: " + "; ".join(LAYOUTS)
        raise BadInput(msg)
    if not sections:
        msg = f"{p}: no sections found; give one of: " + "; ".join(LAYOUTS)
        raise BadInput(msg)
    if join is None:
        return sections
    genes = _joined_genes(sections, join)
    return [_with_genes(s, genes) for s in sections]


# ------------------------------------------------------------------------------------ stacking


def _joined_genes(sections: Sequence[AnnData], join: str) -> pd.Index:
    if join not in _JOINS:
        msg = f"join={join!r}: unknown; use 'inner' or 'outer'"
        raise BadInput(msg)
    if join == "outer":
        return pd.Index(list(dict.fromkeys(g for s in sections for g in s.var_names)))
    common = set(sections[0].var_names).intersection(*(s.var_names for s in sections[1:]))
    genes = pd.Index([g for g in sections[0].var_names if g in common])
    if len(genes) == 0:
        msg = "sections: no gene is shared by all sections; use join='outer', or name genes alike (symbols vs Ensembl ids)"
        raise BadInput(msg)
    return genes


def _remap(x: sparse.spmatrix, src: pd.Index, genes: pd.Index) -> sparse.csr_matrix:
    """Columns of ``x`` (named ``src``) moved to positions in ``genes``; absent genes are 0."""
    where = genes.get_indexer(src)
    coo = sparse.coo_matrix(x)
    ok = where[coo.col] >= 0
    return sparse.csr_matrix(
        (coo.data[ok].astype(np.float32), (coo.row[ok], where[coo.col[ok]])), shape=(x.shape[0], len(genes))
    )


def _with_genes(adata: AnnData, genes: pd.Index) -> AnnData:
    import anndata as ad

    if adata.var_names.equals(genes):
        return adata
    var = adata.var.reindex(genes)
    out = ad.AnnData(X=_remap(adata.X, adata.var_names, genes), obs=adata.obs.copy(), var=var)
    out.obsm[OBSM_SPATIAL] = adata.obsm[OBSM_SPATIAL]
    out.uns[UNS_KEY] = dict(adata.uns.get(UNS_KEY, {}))
    return out


def stack_sections(sections: Sequence[AnnData], join: str = "inner") -> AnnData:
    """Stack sections into one AnnData, aligning their genes.

    Parameters
    ----------
    sections
        AnnData from the readers of this module (distinct ``uns["embedstore"]["slide_id"]``).
    join
        ``"inner"``: genes shared by all sections, in the first section's order; ``"outer"``:
        the union in order of appearance, absent genes filled with 0.

    Returns
    -------
    AnnData with ``obs`` (``slide_id``, ``patient``, ...) and ``obsm["spatial"]`` stacked, and
    ``uns["embedstore"] = {"slides": {slide_id: per-section uns}, "join": join,
    "technology": common technology or "mixed"}``.
    """
    import anndata as ad

    if not sections:
        msg = "sections: nothing to stack; pass at least one AnnData"
        raise BadInput(msg)
    infos = [dict(s.uns.get(UNS_KEY, {})) for s in sections]
    ids = [str(i.get("slide_id", s.obs[Col.SLIDE_ID].iloc[0])) for i, s in zip(infos, sections, strict=True)]
    if len(set(ids)) < len(ids):
        dups = sorted({i for i in ids if ids.count(i) > 1})
        msg = f"sections: slide_id {dups} appears more than once; give each section its own slide_id"
        raise BadInput(msg)
    genes = _joined_genes(sections, join)
    x = sparse.vstack([_remap(s.X, s.var_names, genes) for s in sections], format="csr")
    obs = pd.concat([s.obs for s in sections], join="outer")
    if not obs.index.is_unique:
        msg = "sections: spot names repeat across sections; prefix obs_names with the slide id (as the readers do)"
        raise BadInput(msg)
    var = pd.DataFrame(index=genes)
    for col in dict.fromkeys(c for s in sections for c in s.var.columns):
        # First section that knows a gene's annotation (e.g. its Ensembl id) supplies it.
        var[col] = pd.concat([s.var[col] for s in sections if col in s.var]).groupby(level=0).first().reindex(genes)
    out = ad.AnnData(X=x, obs=obs, var=var)
    out.obsm[OBSM_SPATIAL] = np.vstack([np.asarray(s.obsm[OBSM_SPATIAL], np.float64) for s in sections])
    techs = {i.get("technology") for i in infos}
    out.uns[UNS_KEY] = {
        "slides": dict(zip(ids, infos, strict=True)),
        "join": join,
        "technology": techs.pop() if len(techs) == 1 else "mixed",
    }
    return out
