"""OmiCLIP/Loki gene sentences of ST spots: computed from the store's expression, written back to it.

OmiCLIP (the Loki paper) describes a spot to its text tower by a *gene sentence*: the spot's
most expressed gene symbols, most expressed first, joined by single spaces. The rule here,
deterministic whatever the order of the gene columns:

1. Drop gene symbols containing ``'.'`` or ``'-'``, and the housekeeping genes of
   ``embedstore/data/housekeeping_genes.txt`` (exact, case-sensitive symbol match; the list
   Loki's gene-sentence code reads, see :data:`HOUSEKEEPING_SOURCE`).
2. Keep only genes with a raw count > 0: a zero-count gene is not expressed. (Loki's own
   code takes ``nlargest(50)`` per spot, which pads a spot with fewer expressed genes with
   zero-count genes in column order; here such a spot gets a shorter sentence.)
3. Rank the remaining genes by raw count, descending; ties by gene symbol, ascending.
4. Keep at most ``top_n`` (default 50) symbols. A spot with no gene left gets the empty
   sentence ``""`` and ``n_genes`` 0.

:func:`gene_sentences` computes this on arrays; :func:`write_sentences` runs it over the ST
sections of a store and writes one file per section::

    STORE/sentences/cohort=<c>/slide_id=<s>/sentences.parquet   spot_id, sentence, n_genes

Each file records :func:`sentence_settings` (JSON, key ``embedstore.sentences``) and a digest
of the spots and expression files it was computed from, so a rerun skips unchanged sections
and the readers refuse sentences of expression that has since been rewritten. SQL sees them
as the view ``sentences`` (cohort, slide_id, spot_id, sentence, n_genes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from embedstore._progress import stage, step
from embedstore._schema import META_KIND, META_SCHEMA_VERSION, Col
from embedstore.errors import BadInput, DamagedFile
from embedstore.store import Store, open_store
from embedstore.store._catalog import SENTENCES, SENTENCES_FILE, SENTENCES_FIX, sentences_schema
from embedstore.store._expression import EXPRESSION_FILE, SPOTS_FILE
from embedstore.store._files import write_parquet_atomic
from embedstore.store._integrity import READ_ERRORS, READABLE_VERSIONS, first_line, read_footer, repair_hint
from embedstore.store._layout import file_schema

__all__ = [
    "HOUSEKEEPING_SOURCE",
    "KIND",
    "META_SENTENCES",
    "gene_sentences",
    "housekeeping_genes",
    "read_sentence_settings",
    "read_sentences",
    "sentence_settings",
    "write_sentences",
]

KIND = "sentences"  # embedstore.kind of a sentences file
META_SENTENCES = "embedstore.sentences"  # JSON: sentence_settings() the file was computed with
META_SOURCE = "embedstore.sentences_source"  # digest of the spots and expression footers it was computed from
TOP_N = 50
HOUSEKEEPING_FILE = "housekeeping_genes.txt"
HOUSEKEEPING_SOURCE = "Loki housekeeping_genes.csv (genesymbol), github.com/GuangyuWangLab2021/Loki, BSD-3-Clause"
RULE = (
    "drop symbols containing '.' or '-' and housekeeping genes (exact match); keep counts > 0; "
    "rank by raw count descending, ties by symbol ascending; first top_n symbols joined by single spaces"
)
# Nonzeros sorted at once by gene_sentences: bounds its memory (about 40 bytes each) on large sections.
CHUNK_NNZ = 1 << 22


# --- the rule -------------------------------------------------------------------------


def _housekeeping_bytes() -> bytes:
    return resources.files("embedstore.data").joinpath(HOUSEKEEPING_FILE).read_bytes()


@functools.cache
def housekeeping_genes() -> frozenset[str]:
    """The housekeeping gene symbols left out of gene sentences (Loki's list, see :data:`HOUSEKEEPING_SOURCE`)."""
    lines = _housekeeping_bytes().decode().splitlines()
    return frozenset(s.strip() for s in lines if s.strip() and not s.startswith("#"))


def _check_top_n(top_n: Any) -> int:
    if isinstance(top_n, bool) or not isinstance(top_n, int | np.integer) or top_n < 1:
        msg = f"top_n={top_n!r}: a gene sentence needs at least one gene; pass an integer >= 1 (OmiCLIP uses 50)"
        raise BadInput(msg)
    return int(top_n)


def sentence_settings(top_n: int = TOP_N) -> dict[str, Any]:
    """The JSON-able settings that determine the gene sentences (stable: hash it into fingerprints).

    ``{"top_n", "rule", "housekeeping": {"source", "n", "sha256"}}``; ``sha256`` is that of the
    housekeeping file's bytes.
    """
    return {
        "top_n": _check_top_n(top_n),
        "rule": RULE,
        "housekeeping": {
            "source": HOUSEKEEPING_SOURCE,
            "n": len(housekeeping_genes()),
            "sha256": hashlib.sha256(_housekeeping_bytes()).hexdigest(),
        },
    }


def _as_csr(counts: Any, n_genes: int) -> sp.csr_matrix:
    if sp.issparse(counts):
        m = counts.tocsr()
    else:
        try:
            dense = np.asarray(counts)
        except (TypeError, ValueError) as e:
            msg = f"counts: not a matrix ({first_line(e)}); pass a (spots x genes) NumPy array or SciPy sparse matrix"
            raise BadInput(msg) from e
        if dense.ndim != 2 or not (np.issubdtype(dense.dtype, np.number) or dense.dtype == bool):
            msg = f"counts: a {dense.ndim}-d array of {dense.dtype}; pass a (spots x genes) matrix of raw counts"
            raise BadInput(msg)
        m = sp.csr_matrix(dense)
    if m.shape[1] != n_genes:
        msg = f"counts: {m.shape[1]} columns for {n_genes} genes; pass one gene symbol per column (spots as rows)"
        raise BadInput(msg)
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    if m.nnz and (not np.isfinite(m.data).all() or (m.data < 0).any()):
        msg = "counts: values must be finite and >= 0; pass raw counts"
        raise BadInput(msg)
    return m


def _symbol_ranks(genes: Sequence[str], exclude: frozenset[str] | set[str]) -> tuple[np.ndarray, list[str]]:
    """Per column: its symbol's place in the sorted kept symbols (-1 if dropped); and those symbols."""
    kept = [j for j, g in enumerate(genes) if "." not in g and "-" not in g and g not in exclude]
    kept.sort(key=lambda j: (genes[j], j))  # a symbol given twice: column order decides
    rank = np.full(len(genes), -1, dtype=np.int64)
    rank[kept] = np.arange(len(kept))
    return rank, [genes[j] for j in kept]


def _rank_bits(n_kept: int) -> int:
    return max(1, (n_kept - 1).bit_length())


def _top_of_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rank: np.ndarray, n_kept: int, top_n: int
) -> tuple[np.ndarray, np.ndarray]:
    """For a block of CSR rows: (ranks of the chosen genes, row by row in sentence order; genes per row)."""
    n_rows = len(indptr) - 1
    lens = np.diff(indptr)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lens)
    r = rank[indices]
    keep = (r >= 0) & (data > 0)
    rows, r, d = rows[keep], r[keep], data[keep]
    rbits = _rank_bits(n_kept)
    d32 = d.astype(np.float32)
    if rbits + 32 + max(1, (n_rows - 1).bit_length()) <= 64 and (d.dtype == np.float32 or np.array_equal(d32, d)):
        # One uint64 key per nonzero: row, then the count's float32 bits inverted (bits of a
        # positive float grow with its value, so inverted they sort descending), then the
        # symbol rank. A plain sort of integers, several times faster than a 3-key lexsort.
        key = (
            (rows.astype(np.uint64) << np.uint64(32 + rbits))
            | ((np.uint64(0xFFFFFFFF) - d32.view(np.uint32).astype(np.uint64)) << np.uint64(rbits))
            | r.astype(np.uint64)
        )
        key.sort()
        rows = (key >> np.uint64(32 + rbits)).astype(np.int64)
        r = (key & np.uint64((1 << rbits) - 1)).astype(np.int64)
    else:  # values float32 cannot hold exactly (or an enormous block): the same order, by lexsort
        order = np.lexsort((r, -d.astype(np.float64), rows))
        rows, r = rows[order], r[order]
    per_row = np.bincount(rows, minlength=n_rows)
    first = np.cumsum(per_row) - per_row
    take = (np.arange(len(rows)) - first[rows]) < top_n
    return r[take], np.minimum(per_row, top_n)


def _sentences(
    counts: Any, genes: Sequence[str], top_n: int, exclude: frozenset[str] | set[str] | None
) -> tuple[pa.Array, np.ndarray]:
    top_n = _check_top_n(top_n)
    genes = [] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "genes: an empty gene list; pass one gene symbol per column of counts"
        raise BadInput(msg)
    m = _as_csr(counts, len(genes))
    rank, symbols = _symbol_ranks(genes, housekeeping_genes() if exclude is None else exclude)
    chosen: list[np.ndarray] = []
    n_genes: list[np.ndarray] = []
    start = 0
    n_rows = m.shape[0]
    max_rows = 1 << max(1, 32 - _rank_bits(len(symbols)))  # rows a sort key has room for
    while start < n_rows:
        # Rows whose nonzeros fit CHUNK_NNZ (at least one row).
        stop = int(np.searchsorted(m.indptr, m.indptr[start] + CHUNK_NNZ, side="right")) - 1
        stop = min(n_rows, start + max_rows, max(stop, start + 1))
        a, b = m.indptr[start], m.indptr[stop]
        r, n = _top_of_rows(m.indptr[start : stop + 1] - a, m.indices[a:b], m.data[a:b], rank, len(symbols), top_n)
        chosen.append(r)
        n_genes.append(n)
        start = stop
    n_all = np.concatenate(n_genes).astype(np.int32) if n_genes else np.zeros(0, np.int32)
    words = pa.array(symbols, pa.string()).take(pa.array(np.concatenate(chosen) if chosen else np.zeros(0, np.int64)))
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(n_all, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), words)
    return pc.binary_join(lists, " "), n_all


def gene_sentences(
    counts: Any, genes: Sequence[str], top_n: int = TOP_N, exclude: frozenset[str] | set[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """The OmiCLIP/Loki gene sentence of every spot (rule in the module docstring).

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` raw counts: a SciPy sparse matrix (CSR is used as it is; nothing
        is made dense) or a dense array.
    genes
        Gene symbols, one per column.
    top_n
        Most symbols in a sentence.
    exclude
        Symbols left out; default :func:`housekeeping_genes`.

    Returns
    -------
    sentences
        One string per spot; ``""`` where no expressed gene is left.
    n_genes
        int32 symbols in each sentence.

    Raises
    ------
    BadInput
        ``top_n`` < 1, an empty gene list, counts whose columns do not match ``genes``, or
        negative or non-finite counts.
    """
    text, n = _sentences(counts, genes, top_n, exclude)
    return text.to_pylist(), n


# --- files ----------------------------------------------------------------------------


def _schema(settings: dict[str, Any], source: str) -> pa.Schema:
    fields = [
        pa.field(Col.SPOT_ID, pa.string(), nullable=False),
        pa.field(Col.SENTENCE, pa.string(), nullable=False),
        pa.field(Col.N_GENES, pa.int32(), nullable=False),
    ]
    meta = {META_KIND: KIND, META_SENTENCES: json.dumps(settings, sort_keys=True), META_SOURCE: source}
    return file_schema(pa.schema(fields, metadata=meta))


def _section_dir(cohort: str, slide_id: str) -> Path:
    return Path(f"cohort={cohort}") / f"slide_id={slide_id}"


def _footer_digest(path: Path, fix: str) -> str:
    """SHA-256 of a Parquet file's footer bytes: changes whenever the file is rewritten with other data."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8))
            tail = f.read(8)
            n = int.from_bytes(tail[:4], "little") if len(tail) == 8 else -1
            if tail[4:] != b"PAR1" or n <= 0 or n > size - 12:
                raise DamagedFile(path, "not a readable Parquet file (no footer)", fix)
            f.seek(size - 8 - n)
            return hashlib.sha256(f.read(n)).hexdigest()
    except FileNotFoundError as e:
        msg = f"{path}: no such file (removed while reading?); rerun the command"
        raise BadInput(msg) from e


def _source_digest(root: Path, cohort: str, slide_id: str) -> str | None:
    """Digest of the section's spots and expression files; ``None`` when either is missing."""
    part = _section_dir(cohort, slide_id)
    paths = [root / "spots" / part / SPOTS_FILE, root / "expression" / part / EXPRESSION_FILE]
    if not all(p.is_file() for p in paths):
        return None
    fix = repair_hint(root)
    return hashlib.sha256("".join(_footer_digest(p, fix) for p in paths).encode()).hexdigest()[:32]


def _inspect(path: Path) -> tuple[dict[str, Any], str]:
    """Cheap check of a sentences file's footer: (its settings, its source digest); :class:`DamagedFile` if bad."""
    md = read_footer(path, SENTENCES_FIX)
    kv = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (md.metadata or {}).items()}
    version = kv.get(META_SCHEMA_VERSION)
    if kv.get(META_KIND) != KIND or version is None:
        raise DamagedFile(
            path, f"not a sentences file written by embedstore (no {META_KIND}={KIND} metadata)", SENTENCES_FIX
        )
    if version not in READABLE_VERSIONS:
        msg = (
            f"{path}: embedstore schema version {version}, this embedstore reads {' and '.join(READABLE_VERSIONS)}; "
            "upgrade embedstore or write the sentences again"
        )
        raise BadInput(msg)
    missing = [c for c in (Col.SPOT_ID, Col.SENTENCE, Col.N_GENES) if c not in md.schema.names]
    if missing:
        raise DamagedFile(path, f"not a sentences file (lacks columns {', '.join(missing)})", SENTENCES_FIX)
    try:
        settings = json.loads(kv[META_SENTENCES])
    except (KeyError, json.JSONDecodeError) as e:
        raise DamagedFile(path, f"no valid JSON settings in metadata {META_SENTENCES}", SENTENCES_FIX) from e
    return settings, kv.get(META_SOURCE, "")


def _unchanged(path: Path, settings: dict[str, Any], source: str | None) -> bool:
    """Whether ``path`` already holds the sentences of these settings and this expression."""
    if not path.is_file():
        return False
    try:
        found, found_source = _inspect(path)
    except BadInput:  # damaged, foreign or of another version: write it anew
        return False
    return found == settings and found_source == source


def _open(store: Store | str | Path, read_only: bool) -> Store:
    if isinstance(store, Store):
        return store
    if isinstance(store, str | Path):
        return open_store(store, read_only=read_only)
    msg = f"store: {type(store).__name__} is not a store; pass a Store or a store folder"
    raise BadInput(msg)


def _cohorts(cohort: str | Sequence[str] | None) -> list[str] | None:
    return [cohort] if isinstance(cohort, str) else None if cohort is None else list(cohort)


def _sections(
    root: Path, sub: str, name: str, cohort: str | Sequence[str] | None, slide_ids: Sequence[str] | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """``(cohort, slide_id)`` of the files ``root/sub/cohort=*/slide_id=*/name`` selected; and the slide ids not found.

    In the order of ``slide_ids`` when given (every section of that id), else sorted.
    """
    cohorts = _cohorts(cohort)
    found = [
        (p.parent.parent.name.split("=", 1)[1], p.parent.name.split("=", 1)[1])
        for p in sorted((root / sub).glob(f"cohort=*/slide_id=*/{name}"))
    ]
    found = [s for s in found if cohorts is None or s[0] in cohorts]
    if slide_ids is None:
        return found, []
    if isinstance(slide_ids, str):
        slide_ids = [slide_ids]
    wanted = list(dict.fromkeys(map(str, slide_ids)))
    out = [s for sid in wanted for s in found if s[1] == sid]
    return out, [sid for sid in wanted if sid not in {s[1] for s in out}]


def _selection(cohort: str | Sequence[str] | None) -> str:
    return "" if cohort is None else f" of cohort {', '.join(_cohorts(cohort) or [])}"


def write_sentences(
    store: Store | str | Path,
    cohort: str | Sequence[str] | None = None,
    slide_ids: Sequence[str] | None = None,
    top_n: int = TOP_N,
) -> list[Path]:
    """Compute the gene sentences of the store's ST sections and write one file per section.

    Writes ``STORE/sentences/cohort=<c>/slide_id=<s>/sentences.parquet`` (spot_id, sentence,
    n_genes; spots in the order of the spots file) atomically: a reader, or a process killed at
    any line, sees the old file or the new one. A section whose file already holds the
    sentences of these settings, computed from the current spots and expression files, is
    kept as it is.

    Parameters
    ----------
    store
        A writable :class:`~embedstore.store.Store`, or a store folder.
    cohort, slide_ids
        Sections to do (default: every section with spots).
    top_n
        Most symbols in a sentence.

    Returns
    -------
    The sentences file of every selected section, written or kept.

    Raises
    ------
    BadInput
        ``top_n`` < 1, a read-only store, no spots in the selection or slide ids not in the
        store; nothing is written then.
    """
    settings = sentence_settings(top_n)
    st = _open(store, read_only=False)
    st.check_writable()
    root = st.root
    sections, missing = _sections(root, "spots", SPOTS_FILE, cohort, slide_ids)
    if missing:
        msg = (
            f"{root}: no spots/expression for slides {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            f"{_selection(cohort)}; embed an ST data set into it first, or check the slide ids"
        )
        raise BadInput(msg)
    if not sections:
        msg = f"{root}: no spots/expression{_selection(cohort)}; embed an ST data set into it first"
        raise BadInput(msg)
    out: list[Path] = []
    with stage("gene sentences of %d ST sections (top %d genes)", len(sections), settings["top_n"]):
        for c, s in sections:
            dest = root / SENTENCES / _section_dir(c, s) / SENTENCES_FILE
            source = _source_digest(root, c, s)
            if _unchanged(dest, settings, source):
                step("sentences %s/%s: unchanged, kept", c, s)
                out.append(dest)
                continue
            obs, genes, counts = st.read_expression(cohort=c, slide_ids=[s])
            text, n = _sentences(counts, genes, settings["top_n"], None)
            table = pa.Table.from_arrays(
                [obs.column(Col.SPOT_ID).combine_chunks().cast(pa.string()), text, pa.array(n, pa.int32())],
                schema=_schema(settings, source or ""),
            )
            opts = {"compression": "zstd", "data_page_version": "2.0", "write_page_checksum": True}
            write_parquet_atomic(table, dest, tmp_dir=root / "_staging", **opts)
            empty = int((n == 0).sum())
            step(
                "sentences %s/%s: %d spots, median %d genes%s",
                c, s, len(n), int(np.median(n)) if len(n) else 0, f", {empty} without an expressed gene" if empty else "",
            )  # fmt: skip
            out.append(dest)
    st.refresh()  # the SQL views list files when made
    return out


def _read_selection(
    store: Store | str | Path, cohort: str | Sequence[str] | None, slide_ids: Sequence[str] | None
) -> tuple[Store, list[tuple[str, str, Path, dict[str, Any]]]]:
    """The selected sentences files, checked: present, undamaged, current, and of one settings."""
    st = _open(store, read_only=True)
    root = st.root
    sections, missing = _sections(root, SENTENCES, SENTENCES_FILE, cohort, slide_ids)
    fix = "run embedstore embed-text (or sentences.write_sentences) first"
    if missing:
        msg = f"{root}: no gene sentences for slides {', '.join(missing[:5])}{_selection(cohort)}; {fix}"
        raise BadInput(msg)
    if not sections:
        msg = f"{root}: no gene sentences{_selection(cohort)}; {fix}"
        raise BadInput(msg)
    out = []
    first: tuple[Path, dict[str, Any]] | None = None
    for c, s in sections:
        path = root / SENTENCES / _section_dir(c, s) / SENTENCES_FILE
        settings, source = _inspect(path)
        if source != _source_digest(root, c, s):
            msg = (
                f"{path}: gene sentences of spots/expression since rewritten or removed; "
                "run embedstore embed-text (or sentences.write_sentences) again"
            )
            raise BadInput(msg)
        if first is None:
            first = (path, settings)
        elif settings != first[1]:
            msg = (
                f"{path}: gene sentences of settings {json.dumps(settings, sort_keys=True)}, but {first[0]} has "
                f"{json.dumps(first[1], sort_keys=True)}; write the sentences of all selected slides with one top_n"
            )
            raise BadInput(msg)
        out.append((c, s, path, settings))
    return st, out


def read_sentence_settings(
    store: Store | str | Path, cohort: str | Sequence[str] | None = None, slide_ids: Sequence[str] | None = None
) -> dict[str, Any]:
    """The :func:`sentence_settings` recorded in the selected sentences files (one footer read each).

    Raises
    ------
    BadInput
        No sentences for a selected slide, sentences of expression since rewritten, or two
        files of different settings.
    DamagedFile
        A sentences file is not a readable Parquet file of embedstore's.
    """
    return _read_selection(store, cohort, slide_ids)[1][0][3]


def read_sentences(
    store: Store | str | Path, cohort: str | Sequence[str] | None = None, slide_ids: Sequence[str] | None = None
) -> pa.Table:
    """The gene sentences of the selected sections: cohort, slide_id, spot_id, sentence, n_genes.

    Sections in the order of ``slide_ids`` when given, else sorted by cohort and slide id;
    spots in the order of each section's spots file. Raises as :func:`read_sentence_settings`,
    and :class:`~embedstore.errors.DamagedFile` naming a file whose pages cannot be read.
    """
    _, files = _read_selection(store, cohort, slide_ids)
    parts = []
    for c, s, path, _ in files:
        try:
            t = pq.read_table(
                path,
                columns=[Col.SPOT_ID, Col.SENTENCE, Col.N_GENES],
                partitioning=None,
                page_checksum_verification=True,
            )
        except READ_ERRORS as e:
            raise DamagedFile(path, f"unreadable data ({first_line(e)})", SENTENCES_FIX) from e
        keys = [pa.repeat(pa.scalar(v, pa.string()), t.num_rows) for v in (c, s)]
        parts.append(
            pa.Table.from_arrays(
                [*keys, *(t.column(i).combine_chunks() for i in range(3))],
                names=[Col.COHORT, Col.SLIDE_ID, Col.SPOT_ID, Col.SENTENCE, Col.N_GENES],
            )
        )
    return pa.concat_tables(parts).cast(sentences_schema())
