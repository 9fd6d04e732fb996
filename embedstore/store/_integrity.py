"""Is a store file the whole file embedstore wrote there? Cheap checks where files are used, full ones in ``check``.

A file can be truncated or zeroed by a crash of the machine, replaced by another tool, or
written by an older embedstore. Readers call the cheap checks (footer, schema, metadata, row
count against the tile count recorded at commit, geometry in the column statistics) so the
user gets one line naming the file and the repair command instead of a pyarrow traceback;
``embedstore check`` reads every page and verifies its CRC.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._schema import (
    META_ENCODER,
    META_GENES,
    META_GEOMETRY,
    META_N_TILES,
    META_SCHEMA_VERSION,
    META_SOURCE,
    RESAMPLE,
    Col,
    describe_geometry,
    embedding_schema,
    expression_schema,
    geometry,
    spots_schema,
)
from embedstore.errors import BadInput, DamagedFile
from embedstore.store._layout import (
    EMBEDDING_KEYS,
    KEYS,
    LAYOUT_VERSION,
    READABLE_VERSIONS,
    file_schema,
    stored_columns,
    with_keys,
)

LOG = logging.getLogger(__name__)

QUARANTINE = "_quarantine"
# Errors pyarrow raises on unreadable bytes: ArrowInvalid/ArrowException for a bad footer,
# OSError for a bad page (thrift header, CRC, level counts).
READ_ERRORS = (OSError, pa.ArrowException)


def repair_hint(root: Path) -> str:
    """The advice every damaged-file message ends with."""
    return f"run `embedstore check {root} --repair` to rebuild it"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (pyarrow's run over several)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclasses.dataclass(frozen=True)
class SlideFile:
    """What the footer of a valid slide file (or staged part) says."""

    path: Path
    metadata: pq.FileMetaData
    encoder: dict[str, Any]  # name, family, cfg, fingerprint
    geometry: dict[str, Any]  # embedstore._schema.geometry()
    n_tiles: int | None  # tiles of the slide recorded at commit; None in files of older embedstore
    source: dict[str, Any] | None  # provenance recorded at commit (see embedding.embed)
    version: str  # store layout (embedstore.schema_version) the file was written in

    @property
    def fingerprint(self) -> str:
        """Encoder fingerprint of the file."""
        return str(self.encoder.get("fingerprint", ""))

    @property
    def num_rows(self) -> int:
        """Rows in the file."""
        return int(self.metadata.num_rows)

    @property
    def dim(self) -> int:
        """Length of the embedding vectors."""
        return int(self.metadata.schema.to_arrow_schema().field(Col.EMBEDDING).type.list_size)


def read_footer(path: Path, fix: str) -> pq.FileMetaData:
    """The Parquet footer of ``path``; :class:`DamagedFile` when it cannot be read."""
    try:
        return pq.read_metadata(path)
    except FileNotFoundError as e:
        msg = f"{path}: no such file (removed while reading?); rerun the command"
        raise BadInput(msg) from e
    except READ_ERRORS as e:
        raise DamagedFile(path, f"not a readable Parquet file ({first_line(e)})", fix) from e


def _kv(md: pq.FileMetaData) -> dict[str, str]:
    raw = md.metadata or {}
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}


def _json(path: Path, kv: dict[str, str], key: str, fix: str) -> Any:
    try:
        return json.loads(kv[key]) if key in kv else None
    except json.JSONDecodeError as e:
        raise DamagedFile(path, f"metadata {key} is not valid JSON", fix) from e


def _version(path: Path, kv: dict[str, str], what: str, fix: str) -> str:
    version = kv.get(META_SCHEMA_VERSION)
    if version is None:
        raise DamagedFile(path, f"not {what} written by embedstore (no {META_SCHEMA_VERSION} metadata)", fix)
    if version not in READABLE_VERSIONS:
        # Not damage: a newer embedstore wrote it. Moving it aside would lose it.
        msg = (
            f"{path}: embedstore schema version {version}, this embedstore reads {' and '.join(READABLE_VERSIONS)}; "
            "re-embed or upgrade embedstore"
        )
        raise BadInput(msg)
    return version


def file_version(md: pq.FileMetaData) -> str:
    """The store layout version recorded in a file's footer (empty when none)."""
    return _kv(md).get(META_SCHEMA_VERSION, "")


def _column_values(path: Path, md: pq.FileMetaData, name: str) -> set[Any] | None:
    """Distinct values of a small column from the footer statistics (min == max per row group), else None."""
    try:
        leaf = md.schema.names.index(name)
    except ValueError:
        return None
    values: set[Any] = set()
    for rg in range(md.num_row_groups):
        stats = md.row_group(rg).column(leaf).statistics
        if stats is None or not stats.has_min_max:
            return None
        values.update({stats.min, stats.max})
    return values


def _geometry(path: Path, md: pq.FileMetaData, kv: dict[str, str], fix: str) -> dict[str, Any]:
    """The file's tile geometry: its metadata, checked against the mpp/size_px columns."""
    mpps = _column_values(path, md, Col.MPP)
    sizes = _column_values(path, md, Col.SIZE_PX)
    if mpps is None or sizes is None:  # no statistics (another writer): read the two small columns
        try:
            cols = pq.read_table(path, columns=[Col.MPP, Col.SIZE_PX], partitioning=None)
        except READ_ERRORS as e:
            raise DamagedFile(path, f"unreadable data ({first_line(e)})", fix) from e
        mpps = set(pc.unique(cols.column(Col.MPP)).to_pylist())
        sizes = set(pc.unique(cols.column(Col.SIZE_PX)).to_pylist())
    found = {describe_geometry(geometry(m, s)) for m in mpps for s in sizes}
    stored = _json(path, kv, META_GEOMETRY, fix)
    if stored is None:
        # Written before the geometry was recorded (older embedstore) or by another tool: the
        # mpp and size_px columns hold it, and tiling has always resampled bilinearly.
        if len(found) != 1:
            problem = f"holds tiles of several geometries ({', '.join(sorted(found))}), which are not comparable"
            raise DamagedFile(path, problem, fix)
        return geometry(next(iter(mpps)), next(iter(sizes)), RESAMPLE)
    try:
        geom = geometry(**stored)
    except (TypeError, ValueError) as e:
        raise DamagedFile(path, f"metadata {META_GEOMETRY} is not a tile geometry ({stored!r})", fix) from e
    stated = {describe_geometry(geometry(geom["mpp"], geom["size_px"]))}
    if mpps and found != stated:
        problem = f"records {describe_geometry(geom)} but holds tiles of {', '.join(sorted(found))}"
        raise DamagedFile(path, problem, fix)
    return geom


# Footers that passed inspect_slide_file, by file version: SQL sessions and searches list every
# slide file of a store each time, and re-reading unchanged footers was most of that cost. A
# rewritten file has another size, mtime or inode and is inspected again.
_INSPECTED: dict[tuple[str, int, int, int, bool], SlideFile] = {}
_INSPECTED_MAX = 16_384
_SETTLED_NS = 2_000_000_000


def inspect_slide_file(path: Path, fix: str, part: bool = False) -> SlideFile:
    """:func:`inspect_footer` of ``path``, remembered per process for the file's (size, mtime, inode)."""
    try:
        st = Path(path).stat()
    except OSError:
        return inspect_footer(path, fix, part)  # missing: inspect_footer names it
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, part)
    hit = _INSPECTED.get(key)
    if hit is None:
        hit = inspect_footer(path, fix, part)
        # As git does with its index: a file written in the last seconds could be rewritten
        # within the same (coarse) mtime tick, so only older files are remembered.
        if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
            if len(_INSPECTED) >= _INSPECTED_MAX:
                _INSPECTED.pop(next(iter(_INSPECTED)))
            _INSPECTED[key] = hit
    return hit


def inspect_footer(path: Path, fix: str, part: bool = False) -> SlideFile:
    """Cheap validation of an embedding file from its footer alone (plus two small columns without statistics).

    Parameters
    ----------
    path
        A published ``tiles.parquet`` or a staged part.
    fix
        Advice ending a :class:`DamagedFile` message (e.g. :func:`repair_hint`).
    part
        A staged part holds some of the slide's tiles; a published file must hold all of them.

    Raises
    ------
    DamagedFile
        The footer does not read, the schema or metadata is not embedstore's, the file has no
        rows, or fewer/more rows than the tiles recorded at commit.
    BadInput
        The file is embedstore's but of another schema version.
    """
    md = read_footer(path, fix)
    kv = _kv(md)
    version = _version(path, kv, "an embedding file", fix)
    try:
        schema = md.schema.to_arrow_schema()
    except READ_ERRORS as e:
        raise DamagedFile(path, f"schema cannot be read ({first_line(e)})", fix) from e
    missing = [n for n in file_schema(embedding_schema(1)).names if n not in schema.names]
    if missing:
        raise DamagedFile(path, f"not an embedding file (lacks columns {', '.join(missing)})", fix)
    etype = schema.field(Col.EMBEDDING).type
    if not pa.types.is_fixed_size_list(etype) or etype.value_type != pa.float32():
        raise DamagedFile(path, f"embedding column is {etype}, not a fixed-size list of float32", fix)
    encoder = _json(path, kv, META_ENCODER, fix)
    if not isinstance(encoder, dict) or not encoder.get("name") or not encoder.get("fingerprint"):
        raise DamagedFile(path, f"no encoder name and fingerprint in metadata {META_ENCODER}", fix)
    try:
        n_tiles = int(kv[META_N_TILES]) if META_N_TILES in kv else None
    except ValueError as e:
        raise DamagedFile(path, f"metadata {META_N_TILES} is not a number", fix) from e
    if md.num_rows == 0:
        raise DamagedFile(path, "holds no rows (an empty or interrupted write)", fix)
    if n_tiles is not None and (md.num_rows > n_tiles or (not part and md.num_rows != n_tiles)):
        raise DamagedFile(path, f"holds {md.num_rows} rows, but the slide has {n_tiles} tiles", fix)
    source = _json(path, kv, META_SOURCE, fix)
    geom = _geometry(path, md, kv, fix)
    return SlideFile(Path(path), md, encoder, geom, n_tiles, source if isinstance(source, dict) else None, version)


def inspect_table_file(path: Path, kind: str, fix: str) -> pq.FileMetaData:
    """Cheap validation of a ``spots.parquet`` (``kind="spots"``) or ``expression.parquet`` footer."""
    md = read_footer(path, fix)
    kv = _kv(md)
    _version(path, kv, f"a {kind} file", fix)
    expected = file_schema(spots_schema() if kind == "spots" else expression_schema())
    missing = [n for n in expected.names if n not in md.schema.names]
    if missing:
        raise DamagedFile(path, f"not a {kind} file (lacks columns {', '.join(missing)})", fix)
    if kind == "expression" and not isinstance(_json(path, kv, META_GENES, fix), list):
        raise DamagedFile(path, f"no gene list in metadata {META_GENES}", fix)
    return md


def read_all(path: Path, fix: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a store file, verifying every page's CRC where the writer stored one.

    ``columns`` may name partition keys, which come from the path (:mod:`._layout`). By
    default every column stored in the file but partition keys (a layout-1 file's included).
    """
    try:
        table = pq.read_table(
            path,
            columns=None if columns is None else stored_columns(columns),
            partitioning=None,
            page_checksum_verification=True,
        )
    except READ_ERRORS as e:
        raise DamagedFile(path, f"unreadable data ({first_line(e)})", fix) from e
    if columns is None:
        return table.drop_columns([c for c in table.column_names if c in KEYS])
    return with_keys(table, path, columns)


def verify_slide_file(path: Path, fix: str, encoder: str, cohort: str, slide_id: str) -> SlideFile:
    """Full validation of a slide file: :func:`inspect_slide_file`, then every page and every row.

    Rows must carry the file's fingerprint and geometry, have unique tile ids and finite
    vectors. A layout-1 file's own encoder, cohort and slide_id columns must match its folders;
    a file of the current layout must not hold them (folder readers reject the clash).
    """
    info = inspect_slide_file(path, fix)
    inside = [k for k in EMBEDDING_KEYS if k in info.metadata.schema.to_arrow_schema().names]
    if inside and info.version == LAYOUT_VERSION:
        problem = (
            f"holds partition key columns ({', '.join(inside)}) its folders already name; pandas rejects the folder"
        )
        raise DamagedFile(path, problem, fix)
    folders = {Col.ENCODER: encoder, Col.COHORT: cohort, Col.SLIDE_ID: slide_id}
    expected = [(k, folders[k]) for k in inside] + [(Col.FINGERPRINT, info.fingerprint)]
    handle = pq.ParquetFile(path, page_checksum_verification=True)
    seen: set[str] = set()
    for rg in range(info.metadata.num_row_groups):
        try:
            t = handle.read_row_group(rg)
        except READ_ERRORS as e:
            raise DamagedFile(path, f"unreadable data in row group {rg} ({first_line(e)})", fix) from e
        for col, want in expected:
            values = set(pc.unique(t.column(col)).to_pylist())
            if values != {want}:
                shown = ", ".join(sorted(map(str, values - {want})))[:80]
                raise DamagedFile(path, f"{col} column holds {shown}, expected {want} only", fix)
        ids = t.column(Col.TILE_ID).to_pylist()
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            raise DamagedFile(path, "the same tile id appears twice", fix)
        seen.update(ids)
        emb = t.column(Col.EMBEDDING).combine_chunks()
        values = emb.flatten().to_numpy(zero_copy_only=False)
        if emb.null_count or not np.isfinite(values).all():
            raise DamagedFile(path, "embeddings contain nulls, NaN or inf", fix)
    return info


def verify_table_file(path: Path, kind: str, fix: str) -> pq.FileMetaData:
    """Full validation of a spots or expression file: footer, schema, every page. Returns the footer."""
    md = inspect_table_file(path, kind, fix)
    read_all(path, fix)
    return md


def quarantine(root: Path, path: Path) -> Path:
    """Move a damaged or foreign file out of the store's tree to ``ROOT/_quarantine/<time>/<same relative path>``.

    Never deletes it: it may be a user's file put in the wrong place.
    """
    rel = Path(path).resolve().relative_to(Path(root).resolve())
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dest = Path(root) / QUARANTINE / stamp / rel
    n = 1
    while dest.exists():  # the same file moved aside twice within a second: keep both
        n += 1
        dest = Path(root) / QUARANTINE / f"{stamp}-{n}" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    Path(path).replace(dest)
    return dest
