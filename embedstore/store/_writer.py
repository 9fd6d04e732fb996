"""Staging and publishing one slide's embeddings: resumable batches, one atomic file, recorded geometry."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedstore._atomic import atomic_file
from embedstore._schema import (
    META_ENCODER,
    META_GEOMETRY,
    META_N_TILES,
    META_SOURCE,
    Col,
    check_fingerprint,
    check_geometry,
    describe_geometry,
    embedding_schema,
    tile_schema,
)
from embedstore._schema import geometry as make_geometry
from embedstore.errors import BadInput, DamagedFile, FingerprintMismatch, GeometryMismatch
from embedstore.store._files import (
    Journal,
    check_name,
    read_journal,
    row_group_rows,
    write_options,
    write_parquet_atomic,
)
from embedstore.store._integrity import READ_ERRORS, first_line, inspect_slide_file, quarantine, read_all, repair_hint
from embedstore.store._layout import KEYS, file_schema

LOG = logging.getLogger(__name__)

SLIDE_FILE = "tiles.parquet"
SOURCES = "_sources"  # STORE/_sources/encoder=/cohort=/slide_id=<s>.json: provenance of each slide
_TILE_SCHEMA = tile_schema()


def slide_dir(encoder: str, cohort: str, slide_id: str) -> Path:
    """Hive path of a slide below ``embeddings/``, ``_staging/`` and ``_locks/``."""
    return Path(f"encoder={encoder}") / f"cohort={cohort}" / f"slide_id={slide_id}"


def source_file(root: Path, rel: Path) -> Path:
    """Sidecar recording where a slide came from; outside the data tree, so it survives a damaged footer."""
    return root / SOURCES / rel.parent / f"{rel.name}.json"


def staged_files(staging: Path) -> list[Path]:
    """A slide's staged parts in the order they were written.

    Journals (``part-N.arrows``, :class:`~embedstore.store._files.Journal`) and the
    Parquet parts (``part-N.parquet``) that embedstore staged before them, one per batch.
    """
    if not staging.is_dir():
        return []
    return sorted(p for p in staging.iterdir() if p.name.startswith("part-") and p.suffix in (".arrows", ".parquet"))


def read_staged(path: Path, fix: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of a staged part; :class:`DamagedFile` when they cannot be read."""
    if path.suffix != ".arrows":
        return read_all(path, fix, columns)
    try:
        table = read_journal(path)
    except READ_ERRORS as e:
        raise DamagedFile(path, f"unreadable staged batches ({first_line(e)})", fix) from e
    return table if columns is None else table.select(list(columns))


def _journal_info(path: Path, fix: str) -> tuple[str, dict[str, Any], int]:
    """Fingerprint, geometry and dim a journal was staged with (read from its schema)."""
    try:
        schema = read_journal(path).schema
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        fingerprint = str(json.loads(meta[META_ENCODER])["fingerprint"])
        geom = make_geometry(**json.loads(meta[META_GEOMETRY]))
        dim = int(schema.field(Col.EMBEDDING).type.list_size)
    except (*READ_ERRORS, KeyError, TypeError, ValueError) as e:
        raise DamagedFile(path, f"not a staging journal embedstore wrote ({first_line(e)})", fix) from e
    return fingerprint, geom, dim


class SlideWriter:
    """Stage the embeddings of one slide batch by batch, then publish them as one file.

    Use it while holding :meth:`Store.lock_slide`. Each :meth:`append` adds one batch to
    this run's journal under ``STORE/_staging`` (outside the tree readers glob), handed to
    the kernel before it returns; :meth:`commit` merges the staged batches (and an earlier
    published file, if any) into ``embeddings/.../tiles.parquet`` with one atomic rename,
    then removes the staging folder.

    What a crash loses: a killed process (SIGKILL at any line) at most the batch being
    appended; a crash of the machine at most the batches of the last
    :data:`~embedstore.store._files.JOURNAL_SYNC_SECONDS` seconds (the journal is fsynced
    that often). The next writer of the slide reads what survived, :meth:`done_tile_ids`
    lists it, and only the rest is embedded again.

    Every staged part and the published file record the encoder metadata and the tile
    geometry; parts of another fingerprint or geometry (an interrupted run with other
    settings) are never merged.
    """

    def __init__(
        self,
        store: Any,
        encoder_meta: dict[str, Any],
        cohort: str,
        slide_id: str,
        geometry: dict[str, Any] | None = None,
        n_tiles: int | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        for key in ("name", "fingerprint"):
            if not encoder_meta.get(key):
                msg = f"encoder metadata: missing {key!r}; pass Encoder.metadata() (name, family, cfg, fingerprint)"
                raise BadInput(msg)
        self.store = store
        self.meta = {k: v for k, v in encoder_meta.items() if k != "geometry"}
        geometry = geometry if geometry is not None else encoder_meta.get("geometry")
        self.geometry = make_geometry(**geometry) if geometry else None
        self.n_tiles = n_tiles
        self.source = source
        self.encoder = check_name(str(encoder_meta["name"]), "encoder name")
        self.cohort = check_name(cohort, "cohort")
        self.slide_id = check_name(slide_id, "slide id")
        rel = slide_dir(self.encoder, cohort, slide_id)
        self.final = store.root / "embeddings" / rel / SLIDE_FILE
        self.staging = store.root / "_staging" / rel
        self._fix = repair_hint(store.root)
        self._dim: int | None = None
        self._journal: Journal | None = None
        self._journal_schema: pa.Schema | None = None
        store.clear_stale_staging(self.encoder, cohort, slide_id)
        if self.final.is_file():
            info = inspect_slide_file(self.final, self._fix)
            self._check_same(info.path, info.fingerprint, info.geometry, info.dim, staged=False)
        self._staged: list[Path] = []  # listed once; this writer's own journal is added when it starts
        for path in staged_files(self.staging):
            try:
                if path.suffix == ".arrows":
                    found = _journal_info(path, self._fix)
                else:
                    info = inspect_slide_file(path, self._fix, part=True)
                    found = (info.fingerprint, info.geometry, info.dim)
            except DamagedFile as e:  # its tiles are simply embedded again
                LOG.warning("%s: %s; moved it to %s", path, e.problem, quarantine(store.root, path))
                continue
            self._check_same(path, *found, staged=True)
            self._staged.append(path)
        if source is not None:
            with atomic_file(source_file(store.root, rel)) as tmp:
                tmp.write_text(json.dumps(source, sort_keys=True, indent=1))

    def _check_same(self, path: Path, fingerprint: str, geom: dict[str, Any], dim: int, staged: bool) -> None:
        """Refuse to merge a file of another fingerprint, geometry or dim into this slide."""
        fp = self.meta["fingerprint"]
        if staged and fingerprint != fp:
            msg = (
                f"{self.staging}: batches staged by an interrupted run have encoder fingerprint {fingerprint}, "
                f"this run has {fp}; resume with the original encoder and weights, or delete {self.staging} "
                "to embed the slide anew (or embed into another store)"
            )
            raise FingerprintMismatch(msg)
        check_fingerprint(fp, fingerprint, str(path))
        if self.geometry is None:
            self.geometry = geom
        elif staged and geom != self.geometry:
            msg = (
                f"{self.staging}: batches staged by an interrupted run were tiled at {describe_geometry(geom)}, "
                f"this run tiles at {describe_geometry(self.geometry)}; resume with the original --target-mpp and --size, "
                f"or delete {self.staging} to embed the slide anew (or embed into another store)"
            )
            raise GeometryMismatch(msg)
        check_geometry(self.geometry, geom, str(path))
        if self._dim is not None and dim != self._dim:
            raise DamagedFile(path, f"embeddings of dim {dim}, other files of the slide have {self._dim}", self._fix)
        self._dim = dim

    def _sources(self) -> list[Path]:
        return ([self.final] if self.final.is_file() else []) + self._staged

    def _schema(self, dim: int, n_tiles: int | None) -> pa.Schema:
        """The embedding schema as stored (no partition keys) with every metadata key this writer records."""
        schema = file_schema(embedding_schema(dim, self.meta))
        extra = {META_GEOMETRY: json.dumps(self.geometry, sort_keys=True)}
        if n_tiles is not None:
            extra[META_N_TILES] = str(int(n_tiles))
        if self.source is not None:
            extra[META_SOURCE] = json.dumps(self.source, sort_keys=True)
        return schema.with_metadata({**schema.metadata, **{k.encode(): v.encode() for k, v in extra.items()}})

    def done_tile_ids(self) -> set[str]:
        """Tile ids already published or staged by an earlier (possibly crashed) run."""
        done: set[str] = set()
        for path in self._sources():
            done.update(self._read(path, [Col.TILE_ID]).column(0).to_pylist())
        return done

    def _read(self, path: Path, columns: Sequence[str] | None = None) -> pa.Table:
        return read_all(path, self._fix, columns) if path == self.final else read_staged(path, self._fix, columns)

    def append(self, tiles: pa.Table, embeddings: np.ndarray) -> None:
        """Stage one batch: in the kernel (whole across a SIGKILL) when this returns, on disk within seconds.

        Parameters
        ----------
        tiles
            Rows of a tile table (:func:`embedstore._schema.tile_schema`) of this slide, all of
            the writer's geometry (the first batch sets it when the writer was given none).
        embeddings
            ``(len(tiles), dim)`` finite floats, one row per tile.
        """
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        where = f"{self.encoder}/{self.cohort}/{self.slide_id}"
        if emb.ndim != 2 or emb.shape[0] != tiles.num_rows:
            msg = f"{where}: embeddings have shape {emb.shape}, expected ({tiles.num_rows}, dim); one row per tile"
            raise BadInput(msg)
        if tiles.num_rows == 0:  # nothing to stage; an empty part would count as progress
            return
        if self._dim is not None and emb.shape[1] != self._dim:
            msg = f"{where}: embeddings have dim {emb.shape[1]}, the slide already holds dim {self._dim}; use one encoder per writer"
            raise BadInput(msg)
        if not np.isfinite(emb).all():
            msg = f"{where}: embeddings contain NaN or inf; check the encoder's precision settings"
            raise BadInput(msg)
        names = set(tiles.column_names)
        missing = [n for n in _TILE_SCHEMA.names if n not in names and n != Col.PADDED]
        if missing:
            msg = f"{where}: tile table lacks columns {missing}; pass a table of tile_schema()"
            raise BadInput(msg)
        slides = set(tiles.column(Col.SLIDE_ID).unique().to_pylist())
        if slides - {self.slide_id}:
            msg = f"{where}: tile table holds slides {sorted(slides)}; append only tiles of slide {self.slide_id}"
            raise BadInput(msg)
        shapes = {
            (m, s)
            for m, s in zip(tiles.column(Col.MPP).to_pylist(), tiles.column(Col.SIZE_PX).to_pylist(), strict=True)
        }
        found = {describe_geometry(make_geometry(m, s)) for m, s in shapes}
        if len(found) > 1:
            msg = f"{where}: tile table mixes geometries ({', '.join(sorted(found))}); embed one geometry per slide"
            raise GeometryMismatch(msg)
        m, s = next(iter(shapes))
        if self.geometry is None:
            self.geometry = make_geometry(m, s)
        elif make_geometry(m, s, self.geometry["resample"]) != self.geometry:
            msg = (
                f"{where}: tiles of {describe_geometry(make_geometry(m, s))} appended to a slide tiled at "
                f"{describe_geometry(self.geometry)}; tile the slide with the same --target-mpp and --size"
            )
            raise GeometryMismatch(msg)
        self._dim = emb.shape[1]
        n = tiles.num_rows
        cols: dict[str, Any] = {}
        for f in _TILE_SCHEMA:
            if f.name in KEYS:
                continue
            if f.name in names:
                col = tiles.column(f.name)
                cols[f.name] = col if col.type == f.type else col.cast(f.type)
            else:
                cols[f.name] = pa.array([False] * n, pa.bool_())
        cols[Col.FINGERPRINT] = pa.array([self.meta["fingerprint"]] * n, pa.string())
        cols[Col.EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        if self._journal_schema is None:  # fixed once the first batch set the geometry and the dim
            self._journal_schema = self._schema(emb.shape[1], self.n_tiles)
        schema = self._journal_schema
        table = pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)
        if self._journal is None:
            index = int(self._staged[-1].stem.split("-")[1]) + 1 if self._staged else 0
            self.staging.mkdir(parents=True, exist_ok=True)
            self._journal = Journal(self.staging / f"part-{index:06d}.arrows", schema)
            self._staged.append(self._journal.path)
        try:
            self._journal.append(table)
        except BaseException:  # a torn last message: later batches go to a new journal
            with contextlib.suppress(OSError):
                self._journal.close()
            self._journal = None
            raise

    def commit(self, tile_ids: Collection[str] | None = None) -> Path:
        """Publish the slide's file atomically (rows sorted by y, x, tile id) and clean the staging.

        Parameters
        ----------
        tile_ids
            The slide's tiles (its tile table): staged rows of other tiles are left out, and
            the slide is published only when every one of them is embedded. Without it, the
            writer's ``n_tiles`` (when given) must match.

        Raises
        ------
        BadInput
            Nothing is staged, or fewer tiles than the slide has: an empty or incomplete
            slide is never published.
        """
        where = f"{self.encoder}/{self.cohort}/{self.slide_id}"
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        sources = self._sources()
        if not sources:
            msg = f"{where}: nothing to commit; append embeddings first"
            raise BadInput(msg)
        if not self._staged:  # already published by an earlier run
            shutil.rmtree(self.staging, ignore_errors=True)
            return self.final
        table = pa.concat_tables([self._read(p).replace_schema_metadata(None) for p in sources])
        ids = np.asarray(table.column(Col.TILE_ID).to_pylist(), dtype=object)
        # A tile staged twice (a batch retried after an ambiguous crash) keeps its first row.
        _, first = np.unique(ids, return_index=True)
        if tile_ids is not None:
            wanted = set(tile_ids)
            first = first[np.fromiter((i in wanted for i in ids[first]), dtype=bool, count=len(first))]
        expected = len(set(tile_ids)) if tile_ids is not None else self.n_tiles
        if len(first) == 0 or (expected is not None and len(first) != expected):
            msg = (
                f"{where}: {len(first)} of the slide's {expected if expected is not None else '?'} tiles are embedded; "
                "the slide is not published (rerun embed to finish it)"
            )
            raise BadInput(msg)
        x = table.column(Col.X).to_numpy()[first]
        y = table.column(Col.Y).to_numpy()[first]
        order = first[np.lexsort((ids[first].astype(str), x, y))]
        schema = self._schema(self._dim or 0, len(order))
        # One contiguous chunk either way: pyarrow's page boundaries follow the input's chunks.
        in_order = len(order) == table.num_rows and bool((order == np.arange(len(order))).all())
        table = table.combine_chunks() if in_order else table.take(pa.array(order))
        table = table.replace_schema_metadata(schema.metadata)
        write_parquet_atomic(
            table,
            self.final,
            tmp_dir=self.staging,
            row_group_size=row_group_rows(self._dim or 1),
            **write_options(schema),
        )
        shutil.rmtree(self.staging, ignore_errors=True)
        LOG.info("published %s (%d tiles)", self.final, table.num_rows)
        return self.final
