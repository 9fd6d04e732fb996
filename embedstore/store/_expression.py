"""Spots and measured expression of ST sections: long, sparse Parquet in, SciPy CSR out.

Layout (one file each per section; the folders carry cohort and slide_id)::

    STORE/spots/cohort=<c>/slide_id=<s>/spots.parquet            spot_id, x, y, patient, total_counts
    STORE/expression/cohort=<c>/slide_id=<s>/expression.parquet  spot_id, gene, count (nonzero only)

The expression file keeps every measured gene of the section, zeros included, as the
JSON list ``embedstore.genes`` in its key-value metadata, so a round trip restores the
matrix exactly. Long form is what SQL joins on (``JOIN expression USING (cohort, slide_id,
spot_id) WHERE gene = 'ERBB2'``); bench_storage.py measures it against the alternatives.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from embedstore._schema import META_GENES, Col, expression_schema, spots_schema
from embedstore.errors import BadInput, DamagedFile
from embedstore.store._files import write_parquet_atomic
from embedstore.store._integrity import READ_ERRORS, first_line, inspect_table_file, read_all, repair_hint
from embedstore.store._layout import file_schema

LOG = logging.getLogger(__name__)

SPOTS_FILE = "spots.parquet"
EXPRESSION_FILE = "expression.parquet"


def _as_csr(counts: Any, n_spots: int, n_genes: int, where: str) -> sp.csr_matrix:
    m = sp.csr_matrix(counts) if not sp.issparse(counts) else counts.tocsr()
    if m.shape != (n_spots, n_genes):
        msg = f"{where}: counts have shape {m.shape}, expected ({n_spots} spots, {n_genes} genes); pass spots as rows"
        raise BadInput(msg)
    m = m.copy()
    m.sum_duplicates()
    m.eliminate_zeros()
    if m.nnz and (not np.isfinite(m.data).all() or (m.data < 0).any()):
        msg = f"{where}: counts must be finite and >= 0; pass raw counts"
        raise BadInput(msg)
    return m


def spot_tables(
    cohort: str,
    slide_id: str,
    spot_ids: Sequence[str],
    xy: np.ndarray,
    counts: Any,
    genes: Sequence[str],
    patient: str | Sequence[str | None] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Build the spots table and the long expression table of one section as stored (no I/O)."""
    where = f"{cohort}/{slide_id}"
    spot_ids = [str(s) for s in spot_ids]
    genes = [str(g) for g in genes]
    n = len(spot_ids)
    if len(set(spot_ids)) != n:
        msg = f"{where}: spot ids are not unique; give each spot its own id"
        raise BadInput(msg)
    if len(set(genes)) != len(genes):
        msg = f"{where}: gene names are not unique; make them unique (e.g. anndata var_names_make_unique)"
        raise BadInput(msg)
    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape != (n, 2):
        msg = f"{where}: spot coordinates have shape {xy.shape}, expected ({n}, 2) level-0 pixel centres"
        raise BadInput(msg)
    m = _as_csr(counts, n, len(genes), where)
    if patient is None or isinstance(patient, str):
        patients = pa.array([patient] * n, pa.string())
    else:
        patients = pa.array([None if p is None else str(p) for p in patient], pa.string())
    spots = pa.table(
        {
            Col.SPOT_ID: pa.array(spot_ids, pa.string()),
            Col.X: xy[:, 0],
            Col.Y: xy[:, 1],
            Col.PATIENT: patients,
            Col.TOTAL_COUNTS: np.asarray(m.sum(axis=1)).ravel().astype(np.float64),
        },
        schema=file_schema(spots_schema()),
    )
    integral = bool(np.all(np.mod(m.data, 1) == 0)) and (m.nnz == 0 or m.data.max() < 2**31)
    count_type = pa.int32() if integral else pa.float32()
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(m.indptr))
    schema = file_schema(expression_schema(count_type))
    schema = schema.with_metadata({**schema.metadata, META_GENES.encode(): json.dumps(genes).encode()})
    expr = pa.table(
        {
            Col.SPOT_ID: pa.array(spot_ids, pa.string()).take(rows),
            Col.GENE: pa.array(genes, pa.string()).take(m.indices.astype(np.int32)),
            Col.COUNT: pa.array(m.data.astype(count_type.to_pandas_dtype())),
        },
        schema=schema,
    )
    return spots, expr


def write_section(root: Path, staging: Path, spots: pa.Table, expr: pa.Table, cohort: str, slide_id: str) -> None:
    """Write one section's expression, then its spots (the spots file marks it present)."""
    part = Path(f"cohort={cohort}") / f"slide_id={slide_id}"
    opts = {"compression": "zstd", "data_page_version": "2.0", "write_page_checksum": True}
    write_parquet_atomic(expr, root / "expression" / part / EXPRESSION_FILE, tmp_dir=staging, **opts)
    write_parquet_atomic(spots, root / "spots" / part / SPOTS_FILE, tmp_dir=staging, **opts)


def section_files(root: Path) -> list[tuple[str, str, Path, Path]]:
    """``(cohort, slide_id, spots path, expression path)`` of every section folder holding either file."""
    found: dict[tuple[str, str], None] = {}
    for sub, name in (("spots", SPOTS_FILE), ("expression", EXPRESSION_FILE)):
        for p in sorted((root / sub).glob(f"cohort=*/slide_id=*/{name}")):
            found[(p.parent.parent.name.split("=", 1)[1], p.parent.name.split("=", 1)[1])] = None
    out = []
    for cohort, slide_id in found:
        part = Path(f"cohort={cohort}") / f"slide_id={slide_id}"
        out.append((cohort, slide_id, root / "spots" / part / SPOTS_FILE, root / "expression" / part / EXPRESSION_FILE))
    return out


def inspect_sections(root: Path, fix: str) -> None:
    """Cheap check of every spots and expression file (footer, schema, metadata); raises :class:`DamagedFile`."""
    for _, _, spots_path, expr_path in section_files(root):
        for path, kind in ((spots_path, "spots"), (expr_path, "expression")):
            if path.is_file():
                inspect_table_file(path, kind, fix)


def read_sections(
    root: Path, sections: Sequence[tuple[str, str]], genes: Sequence[str] | None
) -> tuple[pa.Table, list[str], sp.csr_matrix]:
    """Read spots and expression of ``(cohort, slide_id)`` sections into (obs, genes, CSR float32)."""
    obs_parts: list[pa.Table] = []
    exprs: list[tuple[pa.Table, list[str]]] = []
    for cohort, slide_id in sections:
        d = Path(f"cohort={cohort}") / f"slide_id={slide_id}"
        spots_path = root / "spots" / d / SPOTS_FILE
        expr_path = root / "expression" / d / EXPRESSION_FILE
        if not spots_path.is_file() or not expr_path.is_file():
            msg = f"{spots_path}: no spots/expression stored for slide {slide_id} of cohort {cohort}; write_spots first"
            raise BadInput(msg)
        fix = repair_hint(root)
        inspect_table_file(spots_path, "spots", fix)
        meta = inspect_table_file(expr_path, "expression", fix).metadata or {}
        section_genes = json.loads(meta[META_GENES.encode()])
        obs_parts.append(read_all(spots_path, fix, spots_schema().names))
        try:
            table = pq.read_table(
                expr_path,
                columns=[Col.SPOT_ID, Col.GENE, Col.COUNT],
                read_dictionary=[Col.SPOT_ID, Col.GENE],
                partitioning=None,
                page_checksum_verification=True,
            )
        except READ_ERRORS as e:
            raise DamagedFile(expr_path, f"unreadable data ({first_line(e)})", fix) from e
        exprs.append((table, section_genes))

    if genes is None:
        seen: dict[str, None] = {}
        for _, g in exprs:
            seen.update(dict.fromkeys(g))
        gene_list = list(seen)
    else:
        gene_list = [str(g) for g in genes]
        measured = set().union(*(g for _, g in exprs)) if exprs else set()
        missing = [g for g in gene_list if g not in measured]
        if missing:
            msg = (
                f"genes {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: not measured in the selected "
                "slides; check the names (read_expression(genes=None) returns every measured gene)"
            )
            raise BadInput(msg)
    gene_pos = {g: i for i, g in enumerate(gene_list)}

    rows_all, cols_all, vals_all = [], [], []
    offset = 0
    for obs, (table, _) in zip(obs_parts, exprs, strict=True):
        spot_pos = {s: i for i, s in enumerate(obs.column(Col.SPOT_ID).to_pylist())}
        # Map each dictionary entry once, then gather with the integer codes: no per-row Python.
        sp_col = table.column(Col.SPOT_ID).combine_chunks()
        g_col = table.column(Col.GENE).combine_chunks()
        sp_map = np.array([spot_pos.get(s, -1) for s in sp_col.dictionary.to_pylist()], dtype=np.int64)
        g_map = np.array([gene_pos.get(g, -1) for g in g_col.dictionary.to_pylist()], dtype=np.int64)
        r = sp_map[sp_col.indices.to_numpy(zero_copy_only=False)] if len(sp_map) else np.empty(0, np.int64)
        c = g_map[g_col.indices.to_numpy(zero_copy_only=False)] if len(g_map) else np.empty(0, np.int64)
        keep = (r >= 0) & (c >= 0)
        rows_all.append(r[keep] + offset)
        cols_all.append(c[keep])
        vals_all.append(table.column(Col.COUNT).to_numpy().astype(np.float32)[keep])
        offset += obs.num_rows
    obs_table = pa.concat_tables(obs_parts) if obs_parts else spots_schema().empty_table()
    if rows_all:
        coo = sp.coo_matrix(
            (np.concatenate(vals_all), (np.concatenate(rows_all), np.concatenate(cols_all))),
            shape=(offset, len(gene_list)),
            dtype=np.float32,
        )
        csr = coo.tocsr()
    else:
        csr = sp.csr_matrix((0, len(gene_list)), dtype=np.float32)
    csr.sort_indices()
    return obs_table, gene_list, csr
