"""The store: a folder of Hive-partitioned Parquet files with resumable, atomic slide writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._schema import (
    META_ENCODER,
    META_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Col,
    check_fingerprint,
    embedding_schema,
    tile_schema,
)
from embedstore.errors import BadInput
from embedstore.store import _catalog, _expression
from embedstore.store._files import (
    NotPlain,
    check_name,
    file_lock,
    fsync_dir,
    lock_holder,
    read_table_columns,
    read_vectors_into,
    row_group_rows,
    vectors_from_arrow,
    write_options,
    write_parquet_atomic,
)

LOG = logging.getLogger(__name__)

SLIDE_FILE = "tiles.parquet"
Status = Literal["complete", "partial", "absent"]


def _slide_dir(encoder: str, cohort: str, slide_id: str) -> Path:
    return Path(f"encoder={encoder}") / f"cohort={cohort}" / f"slide_id={slide_id}"


def _file_meta(path: Path, schema: pa.Schema | None = None) -> dict[str, Any]:
    """Encoder metadata of one embedding file; checks the schema version."""
    schema = schema if schema is not None else pq.read_schema(path)
    meta = schema.metadata or {}
    version = meta.get(META_SCHEMA_VERSION.encode(), b"").decode()
    if version != SCHEMA_VERSION:
        msg = f"{path}: embedstore schema version {version or 'missing'}, this embedstore reads {SCHEMA_VERSION}; re-embed or upgrade embedstore"
        raise BadInput(msg)
    return json.loads(meta.get(META_ENCODER.encode(), b"{}"))


def check_writable(root: str | Path) -> Path:
    """Raise :class:`BadInput` unless files can be created under ``root`` (created if missing)."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        msg = f"{root}: not writable ({e.strerror}); choose another store folder or fix its permissions"
        raise BadInput(msg) from e
    return root


class SlideWriter:
    """Stage the embeddings of one slide batch by batch, then publish them as one file.

    Use it while holding :meth:`Store.lock_slide`. Each :meth:`append` writes one durable
    part under ``STORE/_staging`` (outside the tree readers glob); :meth:`commit` merges the
    parts (and an earlier published file, if any) into ``embeddings/.../tiles.parquet``
    with one atomic rename, then removes the staging folder.
    """

    def __init__(self, store: Store, encoder_meta: dict[str, Any], cohort: str, slide_id: str) -> None:
        for key in ("name", "fingerprint"):
            if not encoder_meta.get(key):
                msg = f"encoder metadata: missing {key!r}; pass Encoder.metadata() (name, family, cfg, fingerprint)"
                raise BadInput(msg)
        self.store = store
        self.meta = dict(encoder_meta)
        self.encoder = check_name(str(encoder_meta["name"]), "encoder name")
        self.cohort = check_name(cohort, "cohort")
        self.slide_id = check_name(slide_id, "slide id")
        rel = _slide_dir(self.encoder, cohort, slide_id)
        self.final = store.root / "embeddings" / rel / SLIDE_FILE
        self.staging = store.root / "_staging" / rel
        self._dim: int | None = None
        if self.final.is_file() and self.staging.is_dir() and not self._parts():
            # Crash between publish and cleanup: the slide is complete, drop the leftovers.
            shutil.rmtree(self.staging, ignore_errors=True)
        for path in self._sources():
            schema = pq.read_schema(path)
            check_fingerprint(self.meta["fingerprint"], _file_meta(path, schema).get("fingerprint", ""), str(path))
            self._dim = schema.field(Col.EMBEDDING).type.list_size

    def _parts(self) -> list[Path]:
        return sorted(self.staging.glob("part-*.parquet")) if self.staging.is_dir() else []

    def _sources(self) -> list[Path]:
        return ([self.final] if self.final.is_file() else []) + self._parts()

    def done_tile_ids(self) -> set[str]:
        """Tile ids already published or staged by an earlier (possibly crashed) run."""
        done: set[str] = set()
        for path in self._sources():
            done.update(read_table_columns(path, [Col.TILE_ID]).column(0).to_pylist())
        return done

    def append(self, tiles: pa.Table, embeddings: np.ndarray) -> None:
        """Stage one batch durably and atomically.

        Parameters
        ----------
        tiles
            Rows of a tile table (:func:`embedstore._schema.tile_schema`) of this slide.
        embeddings
            ``(len(tiles), dim)`` finite floats, one row per tile.
        """
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        where = f"{self.encoder}/{self.cohort}/{self.slide_id}"
        if emb.ndim != 2 or emb.shape[0] != tiles.num_rows:
            msg = f"{where}: embeddings have shape {emb.shape}, expected ({tiles.num_rows}, dim); one row per tile"
            raise BadInput(msg)
        if self._dim is not None and emb.shape[1] != self._dim:
            msg = f"{where}: embeddings have dim {emb.shape[1]}, the slide already holds dim {self._dim}; use one encoder per writer"
            raise BadInput(msg)
        if not np.isfinite(emb).all():
            msg = f"{where}: embeddings contain NaN or inf; check the encoder's precision settings"
            raise BadInput(msg)
        missing = [n for n in tile_schema().names if n not in tiles.column_names and n != Col.PADDED]
        if missing:
            msg = f"{where}: tile table lacks columns {missing}; pass a table of tile_schema()"
            raise BadInput(msg)
        slides = set(tiles.column(Col.SLIDE_ID).unique().to_pylist())
        if slides - {self.slide_id}:
            msg = f"{where}: tile table holds slides {sorted(slides)}; append only tiles of slide {self.slide_id}"
            raise BadInput(msg)
        self._dim = emb.shape[1]
        n = tiles.num_rows
        cols: dict[str, Any] = {Col.COHORT: pa.array([self.cohort] * n, pa.string())}
        for f in tile_schema():
            if f.name in tiles.column_names:
                cols[f.name] = tiles.column(f.name).cast(f.type)
            else:
                cols[f.name] = pa.array([False] * n, pa.bool_())
        cols[Col.ENCODER] = pa.array([self.encoder] * n, pa.string())
        cols[Col.FINGERPRINT] = pa.array([self.meta["fingerprint"]] * n, pa.string())
        cols[Col.EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        schema = embedding_schema(emb.shape[1], self.meta)
        table = pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)
        parts = self._parts()
        index = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        dest = self.staging / f"part-{index:06d}.parquet"
        write_parquet_atomic(table, dest, row_group_size=row_group_rows(emb.shape[1]), **write_options(schema))

    def commit(self) -> Path:
        """Publish the slide's file atomically (rows sorted by y, x, tile id) and clean the staging."""
        sources = self._sources()
        if not sources:
            msg = f"{self.encoder}/{self.cohort}/{self.slide_id}: nothing to commit; append embeddings first"
            raise BadInput(msg)
        parts = self._parts()
        if not parts:  # already published by an earlier run
            shutil.rmtree(self.staging, ignore_errors=True)
            return self.final
        table = pa.concat_tables([pq.read_table(p, partitioning=None) for p in sources])
        ids = np.asarray(table.column(Col.TILE_ID).to_pylist(), dtype=object)
        # A tile staged twice (a batch retried after an ambiguous crash) keeps its first row.
        _, first = np.unique(ids, return_index=True)
        x = table.column(Col.X).to_numpy()[first]
        y = table.column(Col.Y).to_numpy()[first]
        order = first[np.lexsort((ids[first].astype(str), x, y))]
        if len(sources) == 1 and len(order) == table.num_rows and (order == np.arange(len(order))).all():
            # One staged part already in final order: publish it as it is (same writer options).
            self.final.parent.mkdir(parents=True, exist_ok=True)
            sources[0].replace(self.final)
            fsync_dir(self.final.parent)
            shutil.rmtree(self.staging, ignore_errors=True)
            return self.final
        table = table.take(pa.array(order))
        schema = embedding_schema(self._dim or 0, self.meta)
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


class Store:
    """A store folder: embeddings per encoder, spots and expression, and their SQL views.

    Build it with :func:`open_store`.
    """

    def __init__(self, root: Path, read_only: bool = True) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self._con: Any = None

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, read_only={self.read_only})"

    # --- writing ---------------------------------------------------------------------

    def _need_writable(self, what: str) -> None:
        if self.read_only:
            msg = f"{self.root}: opened read-only, cannot {what}; use open_store(path, read_only=False)"
            raise BadInput(msg)

    def check_writable(self) -> None:
        """Raise :class:`BadInput` ``"<store>: not writable; ..."`` before any expensive work."""
        self._need_writable("write")
        check_writable(self.root)

    def slide_status(self, encoder: str, cohort: str, slide_id: str) -> Status:
        """``"complete"`` (published), ``"partial"`` (staged batches only) or ``"absent"``."""
        rel = _slide_dir(
            check_name(encoder, "encoder name"), check_name(cohort, "cohort"), check_name(slide_id, "slide id")
        )
        if (self.root / "embeddings" / rel / SLIDE_FILE).is_file():
            return "complete"
        if any((self.root / "_staging" / rel).glob("part-*.parquet")):
            return "partial"
        return "absent"

    @contextlib.contextmanager
    def lock_slide(self, encoder: str, cohort: str, slide_id: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the slide's OS lock; yield ``True`` if acquired (``False`` only when not ``blocking``).

        The lock is an ``flock`` on ``STORE/_locks/...lock``: the kernel releases it when the
        holding process exits or is killed, so no stale lock survives a crash.
        """
        self._need_writable("lock a slide")
        rel = _slide_dir(
            check_name(encoder, "encoder name"), check_name(cohort, "cohort"), check_name(slide_id, "slide id")
        )
        path = self.root / "_locks" / rel.with_suffix(".lock")
        with file_lock(path, blocking) as acquired:
            if not acquired:
                LOG.info("%s: held by another run (%s)", path, lock_holder(path) or "unknown")
            yield acquired

    def slide_writer(self, encoder_meta: dict[str, Any], cohort: str, slide_id: str) -> SlideWriter:
        """A :class:`SlideWriter` for one slide and encoder (hold :meth:`lock_slide` while using it)."""
        self._need_writable("write embeddings")
        return SlideWriter(self, encoder_meta, cohort, slide_id)

    def write_spots(
        self,
        cohort: str,
        slide_id: str,
        spot_ids: Sequence[str],
        xy: np.ndarray,
        counts_csr: Any,
        genes: Sequence[str],
        patient: str | Sequence[str | None] | None = None,
    ) -> None:
        """Store the spots and measured counts of one ST section (atomically, replacing any earlier).

        Parameters
        ----------
        cohort, slide_id
            Where the section goes; join keys with the embeddings.
        spot_ids
            One id per spot (matches ``spot_id`` of spot-centred tiles).
        xy
            ``(n_spots, 2)`` level-0 pixel centres (x = column, y = row).
        counts_csr
            ``(n_spots, n_genes)`` raw counts, sparse or dense.
        genes
            Gene names, one per column.
        patient
            One patient id for the section, one per spot, or ``None``.
        """
        self._need_writable("write spots")
        check_name(cohort, "cohort")
        check_name(slide_id, "slide id")
        spots, expr = _expression.spot_tables(cohort, slide_id, spot_ids, xy, counts_csr, genes, patient)
        _expression.write_section(self.root, self.root / "_staging", spots, expr, cohort, slide_id)
        self._con = None  # views list files at creation

    def write_spots_anndata(self, cohort: str, slide_id: str, adata: Any) -> None:
        """:meth:`write_spots` from an AnnData of the spots contract.

        Spot ids come from ``obs['spot_id']`` (the source's own ids, as the embedding
        table's ``spot_id`` holds them), else from ``obs_names``.
        """
        patient = adata.obs[Col.PATIENT].astype(str).tolist() if Col.PATIENT in adata.obs.columns else None
        ids = adata.obs[Col.SPOT_ID] if Col.SPOT_ID in adata.obs.columns else adata.obs_names
        self.write_spots(
            cohort, slide_id, list(map(str, ids)), np.asarray(adata.obsm["spatial"]), adata.X,
            list(map(str, adata.var_names)), patient,
        )  # fmt: skip

    # --- reading ---------------------------------------------------------------------

    def encoders(self) -> list[str]:
        """Names of the encoders with at least one published slide."""
        return [i["encoder"] for i in _catalog.encoder_info(self.root)]

    def _slide_files(
        self, encoder: str, cohort: str | Sequence[str] | None, slide_ids: Sequence[str] | None
    ) -> list[Path]:
        base = self.root / "embeddings" / f"encoder={check_name(encoder, 'encoder name')}"
        if not base.is_dir():
            msg = f"encoder {encoder}: no embeddings in {self.root}; embed with it first (stored: {', '.join(self.encoders()) or 'none'})"
            raise BadInput(msg)
        cohorts = [cohort] if isinstance(cohort, str) else cohort
        files = [
            p
            for p in sorted(base.glob(f"cohort=*/slide_id=*/{SLIDE_FILE}"))
            if cohorts is None or p.parent.parent.name.split("=", 1)[1] in cohorts
        ]
        if slide_ids is not None:
            by_slide: dict[str, list[Path]] = {}
            for p in files:
                by_slide.setdefault(p.parent.name.split("=", 1)[1], []).append(p)
            missing = [s for s in slide_ids if s not in by_slide]
            if missing:
                msg = f"slides {', '.join(missing[:5])}: no {encoder} embeddings in {self.root}; embed them or check the ids"
                raise BadInput(msg)
            files = [p for s in dict.fromkeys(slide_ids) for p in by_slide[s]]
        if not files:
            msg = f"encoder {encoder}, cohort {cohort}: no embeddings in {self.root}; check the cohort name"
            raise BadInput(msg)
        return files

    def encoder_metadata(self, encoder: str) -> dict[str, Any]:
        """The encoder metadata (name, family, cfg, fingerprint) stored with its embeddings."""
        return _file_meta(self._slide_files(encoder, None, None)[0])

    def read_embeddings(
        self,
        encoder: str,
        cohort: str | Sequence[str] | None = None,
        slide_ids: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        fingerprint: str | None = None,
    ) -> tuple[pa.Table, np.ndarray]:
        """Bulk-read the embeddings of a selection into one ``(N, D)`` float32 array.

        Parameters
        ----------
        encoder
            Encoder name.
        cohort
            One cohort, several, or all (``None``).
        slide_ids
            Slides to read, in this order; all of the cohort(s) when ``None``.
        columns
            Metadata columns to return (default: every column but the embedding).
        fingerprint
            Required encoder fingerprint; default: that of the first file.

        Returns
        -------
        The metadata table and the embeddings, row-aligned. Raises
        :class:`~embedstore.errors.FingerprintMismatch` if the files disagree.
        """
        files, metas, dim, cols = self._checked_files(encoder, cohort, slide_ids, columns, fingerprint)
        out = np.empty((sum(md.num_rows for md in metas), dim), dtype=np.float32)
        tables = []
        start = 0
        for path, md in zip(files, metas, strict=True):
            stop = start + md.num_rows
            try:
                read_vectors_into(path, md, Col.EMBEDDING, out[start:stop])
            except NotPlain as e:  # written by another tool: let pyarrow decode it
                LOG.debug("%s: generic read (%s)", path, e)
                out[start:stop] = vectors_from_arrow(read_table_columns(path, [Col.EMBEDDING]).column(0), dim)
            tables.append(read_table_columns(path, cols))
            start = stop
        return pa.concat_tables(tables), out

    def iter_embeddings(
        self,
        encoder: str,
        cohort: str | Sequence[str] | None = None,
        slide_ids: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        fingerprint: str | None = None,
    ) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """Like :meth:`read_embeddings`, one row group at a time (about 64 MiB of vectors).

        Memory stays bounded however large a slide is; each chunk belongs to one slide.
        """
        files, metas, dim, cols = self._checked_files(encoder, cohort, slide_ids, columns, fingerprint)
        for path, md in zip(files, metas, strict=True):
            handle = pq.ParquetFile(path)
            for rg in range(md.num_row_groups):
                out = np.empty((md.row_group(rg).num_rows, dim), dtype=np.float32)
                try:
                    read_vectors_into(path, md, Col.EMBEDDING, out, row_groups=[rg])
                except NotPlain:  # written by another tool: let pyarrow decode it
                    out = vectors_from_arrow(handle.read_row_group(rg, columns=[Col.EMBEDDING]).column(0), dim)
                yield handle.read_row_group(rg, columns=cols), out

    def _checked_files(
        self,
        encoder: str,
        cohort: str | Sequence[str] | None,
        slide_ids: Sequence[str] | None,
        columns: Sequence[str] | None,
        fingerprint: str | None,
    ) -> tuple[list[Path], list[Any], int, list[str]]:
        """Selected files, their metadata, the common dim and the metadata columns to read.

        Every file must carry ``fingerprint`` (default: the first file's) and the same dim.
        """
        files = self._slide_files(encoder, cohort, slide_ids)
        metas = [pq.read_metadata(p) for p in files]
        expected = fingerprint
        dim = None
        for path, md in zip(files, metas, strict=True):
            schema = md.schema.to_arrow_schema()
            found = _file_meta(path, schema).get("fingerprint", "")
            if expected is None:
                expected = found
            check_fingerprint(expected, found, str(path))
            d = schema.field(Col.EMBEDDING).type.list_size
            if dim is not None and d != dim:
                msg = f"{path}: embeddings of dim {d}, earlier files have {dim}; re-embed the slide"
                raise BadInput(msg)
            dim = d
        dim = int(dim or 0)
        cols = list(columns) if columns is not None else [n for n in embedding_schema(dim).names if n != Col.EMBEDDING]
        return files, metas, dim, cols

    def read_expression(
        self,
        cohort: str | Sequence[str] | None = None,
        slide_ids: Sequence[str] | None = None,
        genes: Sequence[str] | None = None,
    ) -> tuple[pa.Table, list[str], Any]:
        """Spots and counts of the selected ST sections.

        Returns
        -------
        obs
            Spots table (cohort, slide_id, spot_id, x, y, patient, total_counts).
        genes
            Column names: ``genes`` as given, or every measured gene (first-seen order).
        counts
            ``scipy.sparse.csr_matrix`` float32, spots x genes; a gene not measured in a
            section reads as 0 there.
        """
        cohorts = [cohort] if isinstance(cohort, str) else cohort
        sections = [
            (p.parent.parent.name.split("=", 1)[1], p.parent.name.split("=", 1)[1])
            for p in sorted((self.root / "spots").glob(f"cohort=*/slide_id=*/{_expression.SPOTS_FILE}"))
        ]
        sections = [s for s in sections if cohorts is None or s[0] in cohorts]
        if slide_ids is not None:
            by_slide = {s: (c, s) for c, s in sections}
            missing = [s for s in slide_ids if s not in by_slide]
            if missing:
                msg = f"slides {', '.join(missing[:5])}: no spots in {self.root}; write_spots first or check the ids"
                raise BadInput(msg)
            sections = [by_slide[s] for s in dict.fromkeys(slide_ids)]
        if not sections:
            msg = f"cohort {cohort}: no spots/expression in {self.root}; embed an ST data set first"
            raise BadInput(msg)
        return _expression.read_sections(self.root, sections, genes)

    # --- SQL -------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rebuild the SQL views (they list the files present when they were made)."""
        if self._con is not None:
            _catalog.create_views(self._con, self.root)

    def sql(self, query: str, params: Any = None, output: str = "pandas") -> Any:
        """Run SQL in DuckDB over the views ``embeddings``, ``embeddings_<encoder>``, ``encoders``,
        ``slides``, ``spots``, ``expression`` (macro ``cosine(a, b)``).

        Parameters
        ----------
        query
            SQL; only SELECT/EXPLAIN unless the store was opened with ``read_only=False``.
        params
            DuckDB parameters (``?`` or ``$name``).
        output
            ``"pandas"``, ``"arrow"`` or ``"numpy"`` (dict of arrays).
        """
        if self._con is None:
            self._con = _catalog.connect(self.root)
        return _catalog.run_sql(self._con, query, params, output, self.read_only)


def open_store(path: str | Path, read_only: bool = True) -> Store:
    """Open (``read_only=False``: create) a store folder.

    Parameters
    ----------
    path
        Store folder.
    read_only
        Refuse every write (SQL writes included) when ``True``.
    """
    root = Path(path).expanduser()
    if read_only:
        if not root.is_dir():
            msg = f"{root}: no store folder here; check the path, or embed slides into it first"
            raise BadInput(msg)
    else:
        check_writable(root)
    return Store(root.resolve(), read_only=read_only)


def sql(store: str | Path, query: str, params: Any = None, output: str = "pandas") -> Any:
    """Run read-only SQL on a store: ``open_store(store).sql(query, params, output)``.

    Views: ``embeddings`` (and ``embeddings_<encoder>``), ``slides``, ``encoders``, ``spots``,
    ``expression``; macro ``cosine(a, b)``.
    """
    return open_store(store).sql(query, params=params, output=output)
