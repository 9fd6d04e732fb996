"""The store: a folder of Hive-partitioned Parquet files with resumable, atomic slide writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._schema import (
    Col,
    check_fingerprint,
    check_geometry,
    embedding_schema,
)
from embedstore._schema import geometry as make_geometry
from embedstore.errors import BadInput, DamagedFile
from embedstore.store import _catalog, _expression
from embedstore.store._files import (
    NotPlain,
    check_name,
    file_lock,
    lock_holder,
    read_vectors_into,
    vectors_from_arrow,
)
from embedstore.store._integrity import (
    READ_ERRORS,
    SlideFile,
    first_line,
    inspect_slide_file,
    inspect_table_file,
    quarantine,
    read_all,
    repair_hint,
)
from embedstore.store._layout import stored_columns, with_keys
from embedstore.store._writer import SLIDE_FILE, SOURCES, SlideWriter, read_staged, slide_dir, source_file, staged_files

LOG = logging.getLogger(__name__)

# Threads of read_embeddings: page-cache copies scale with cores up to the memory bandwidth.
READ_THREADS = min(8, os.cpu_count() or 1)

Status = Literal["complete", "damaged", "partial", "absent"]


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

    def _rel(self, encoder: str, cohort: str, slide_id: str) -> Path:
        return slide_dir(
            check_name(encoder, "encoder name"), check_name(cohort, "cohort"), check_name(slide_id, "slide id")
        )

    def slide_status(self, encoder: str, cohort: str, slide_id: str) -> Status:
        """``"complete"`` (a valid published file), ``"damaged"`` (a published file that fails
        :meth:`published_slide`), ``"partial"`` (staged batches only) or ``"absent"``."""
        rel = self._rel(encoder, cohort, slide_id)
        if (self.root / "embeddings" / rel / SLIDE_FILE).is_file():
            try:
                self.published_slide(encoder, cohort, slide_id)
            except DamagedFile:
                return "damaged"
            return "complete"
        if staged_files(self.root / "_staging" / rel):
            return "partial"
        return "absent"

    def published_slide(self, encoder: str, cohort: str, slide_id: str) -> SlideFile | None:
        """The footer of a slide's published file (``None`` when there is none), checked cheaply.

        Raises
        ------
        DamagedFile
            The file is truncated, zeroed, empty, incomplete or not an embedstore embedding file.
        """
        path = self.root / "embeddings" / self._rel(encoder, cohort, slide_id) / SLIDE_FILE
        return inspect_slide_file(path, repair_hint(self.root)) if path.is_file() else None

    def quarantine(self, path: str | Path) -> Path:
        """Move a damaged or foreign file to ``STORE/_quarantine/<time>/...`` (never deleted); return where."""
        self._need_writable("move files aside")
        return quarantine(self.root, Path(path))

    def slide_source(self, encoder: str, cohort: str, slide_id: str) -> dict[str, Any] | None:
        """Where a slide was embedded from and with which settings (recorded by ``embed``), or ``None``."""
        rel = self._rel(encoder, cohort, slide_id)
        path = source_file(self.root, rel)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):  # the sidecar is gone: a readable footer still says it
            try:
                info = self.published_slide(encoder, cohort, slide_id)
            except (DamagedFile, BadInput):
                return None
            doc = info.source if info is not None else None
        return doc

    def damaged_section_files(self, cohort: str, slide_id: str) -> list[tuple[Path, str]]:
        """``(file, problem)`` for an ST section's spots and expression files that are missing or fail the cheap check."""
        part = Path(f"cohort={check_name(cohort, 'cohort')}") / f"slide_id={check_name(slide_id, 'slide id')}"
        out = []
        for sub, name, kind in (
            ("spots", _expression.SPOTS_FILE, "spots"),
            ("expression", _expression.EXPRESSION_FILE, "expression"),
        ):
            path = self.root / sub / part / name
            if not path.is_file():
                out.append((path, "missing"))
                continue
            try:
                inspect_table_file(path, kind, repair_hint(self.root))
            except DamagedFile as e:
                out.append((path, e.problem))
        return out

    def sources(self, cohort: str, slide_id: str) -> list[dict[str, Any]]:
        """Provenance recorded for a slide by every encoder that embedded it (see :meth:`slide_source`)."""
        found = []
        for d in sorted((self.root / SOURCES).glob("encoder=*")):
            doc = self.slide_source(d.name.split("=", 1)[1], cohort, slide_id)
            if doc is not None:
                found.append(doc)
        return found

    def stale_staging(self, encoder: str, cohort: str, slide_id: str) -> bool:
        """True when a published, valid slide still has a staging folder whose tiles are all published."""
        rel = self._rel(encoder, cohort, slide_id)
        staging, final = self.root / "_staging" / rel, self.root / "embeddings" / rel / SLIDE_FILE
        if not staging.is_dir() or not final.is_file():
            return False
        fix = repair_hint(self.root)
        try:
            inspect_slide_file(final, fix)
            published = set(read_all(final, fix, [Col.TILE_ID]).column(0).to_pylist())
            staged: set[str] = set()
            for p in staged_files(staging):
                staged.update(read_staged(p, fix, [Col.TILE_ID]).column(0).to_pylist())
        except DamagedFile:
            return False
        if not staged <= published:
            LOG.warning("%s: staged tiles that are not in %s; left in place", staging, final)
            return False
        return True

    def clear_stale_staging(self, encoder: str, cohort: str, slide_id: str) -> bool:
        """Remove a published slide's staging folder when every tile staged there is in the published file.

        A run killed between publishing a slide and removing its staged parts leaves them
        behind; the next run (or ``embedstore check --repair``) clears them with this. Hold
        :meth:`lock_slide`. Returns whether anything was removed.
        """
        if not self.stale_staging(encoder, cohort, slide_id):
            return False
        staging = self.root / "_staging" / self._rel(encoder, cohort, slide_id)
        shutil.rmtree(staging, ignore_errors=True)
        LOG.info("%s: removed the staging left by a run killed after publishing", staging)
        return True

    @contextlib.contextmanager
    def lock_slide(self, encoder: str, cohort: str, slide_id: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the slide's OS lock; yield ``True`` if acquired (``False`` only when not ``blocking``).

        The lock is an ``flock`` on ``STORE/_locks/...lock``: the kernel releases it when the
        holding process exits or is killed, so no stale lock survives a crash.
        """
        self._need_writable("lock a slide")
        rel = slide_dir(
            check_name(encoder, "encoder name"), check_name(cohort, "cohort"), check_name(slide_id, "slide id")
        )
        path = self.root / "_locks" / rel.with_suffix(".lock")
        with file_lock(path, blocking) as acquired:
            if not acquired:
                LOG.info("%s: held by another run (%s)", path, lock_holder(path) or "unknown")
            yield acquired

    def slide_writer(
        self,
        encoder_meta: dict[str, Any],
        cohort: str,
        slide_id: str,
        geometry: dict[str, Any] | None = None,
        n_tiles: int | None = None,
        source: dict[str, Any] | None = None,
    ) -> SlideWriter:
        """A :class:`SlideWriter` for one slide and encoder (hold :meth:`lock_slide` while using it).

        Parameters
        ----------
        encoder_meta
            ``Encoder.metadata()`` (name, family, cfg, fingerprint).
        cohort, slide_id
            Where the slide goes.
        geometry
            Tile geometry (:func:`embedstore._schema.geometry`); default: that of earlier
            staged batches, else of the first appended tiles.
        n_tiles
            The slide's tile count; the slide is published only when all are embedded.
        source
            JSON-able provenance (source path and settings) recorded for ``embedstore check --repair``.
        """
        self._need_writable("write embeddings")
        return SlideWriter(self, encoder_meta, cohort, slide_id, geometry, n_tiles, source)

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

    def encoder_metadata(
        self, encoder: str, cohort: str | Sequence[str] | None = None, slide_ids: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The encoder metadata (name, family, cfg, fingerprint) stored with its embeddings, and
        their tile ``"geometry"`` (:func:`embedstore._schema.geometry`).

        Read from the first file of the selection (``cohort``, ``slide_ids``; all by default):
        cohorts of one store may be tiled at different geometries.
        """
        info = inspect_slide_file(self._slide_files(encoder, cohort, slide_ids)[0], repair_hint(self.root))
        return {**info.encoder, "geometry": info.geometry}

    def read_embeddings(
        self,
        encoder: str,
        cohort: str | Sequence[str] | None = None,
        slide_ids: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        fingerprint: str | None = None,
        geometry: dict[str, Any] | None = None,
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
        geometry
            Required tile geometry (:func:`embedstore._schema.geometry`); default: that of the first file.

        Returns
        -------
        The metadata table and the embeddings, row-aligned. Raises
        :class:`~embedstore.errors.FingerprintMismatch` (or its subclass
        :class:`~embedstore.errors.GeometryMismatch`) if the files disagree, and
        :class:`~embedstore.errors.DamagedFile` naming a file that cannot be read.
        """
        files, metas, dim, cols = self._checked_files(encoder, cohort, slide_ids, columns, fingerprint, geometry)
        out = np.empty((sum(md.num_rows for md in metas), dim), dtype=np.float32)

        def read_columns(path: Path, md: pq.FileMetaData) -> pa.Table:
            # The footer checked above is reused (no second parse); page CRCs are verified.
            with self._reading(path):
                handle = pq.ParquetFile(path, metadata=md, page_checksum_verification=True, pre_buffer=True)
                return with_keys(handle.read(stored_columns(cols), use_threads=False), path, cols)

        def read_vectors(path: Path, md: pq.FileMetaData, rows: np.ndarray, row_groups: list[int]) -> None:
            with self._reading(path):
                try:
                    read_vectors_into(path, md, Col.EMBEDDING, rows, row_groups=row_groups)
                except NotPlain as e:  # written by another tool (or damaged pages): let pyarrow decode it
                    LOG.debug("%s: generic read (%s)", path, e)
                    handle = pq.ParquetFile(path, metadata=md, page_checksum_verification=True)
                    rows[:] = vectors_from_arrow(
                        handle.read_row_groups(row_groups, columns=[Col.EMBEDDING]).column(0), dim
                    )

        # Row groups are read in parallel, straight into their rows of `out` (the reads release
        # the GIL), while pyarrow decodes the small columns in the same pool.
        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = [pool.submit(read_columns, path, md) for path, md in zip(files, metas, strict=True)]
            vectors = []
            start = 0
            for path, md in zip(files, metas, strict=True):
                for rg in range(md.num_row_groups):
                    stop = start + md.row_group(rg).num_rows
                    vectors.append(pool.submit(read_vectors, path, md, out[start:stop], [rg]))
                    start = stop
            for done in vectors:
                done.result()
            return pa.concat_tables([t.result() for t in tables]), out

    def iter_embeddings(
        self,
        encoder: str,
        cohort: str | Sequence[str] | None = None,
        slide_ids: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        fingerprint: str | None = None,
        geometry: dict[str, Any] | None = None,
    ) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """Like :meth:`read_embeddings`, one row group at a time (about 64 MiB of vectors).

        Memory stays bounded however large a slide is; each chunk belongs to one slide.
        """
        files, metas, dim, cols = self._checked_files(encoder, cohort, slide_ids, columns, fingerprint, geometry)
        for path, md in zip(files, metas, strict=True):
            for rg in range(md.num_row_groups):
                out = np.empty((md.row_group(rg).num_rows, dim), dtype=np.float32)
                with self._reading(path):
                    handle = pq.ParquetFile(path, page_checksum_verification=True)
                    try:
                        read_vectors_into(path, md, Col.EMBEDDING, out, row_groups=[rg])
                    except NotPlain:  # written by another tool (or damaged pages): let pyarrow decode it
                        out = vectors_from_arrow(handle.read_row_group(rg, columns=[Col.EMBEDDING]).column(0), dim)
                    meta = with_keys(handle.read_row_group(rg, columns=stored_columns(cols)), path, cols)
                yield meta, out

    @contextlib.contextmanager
    def _reading(self, path: Path) -> Iterator[None]:
        """Turn pyarrow's errors on unreadable pages into one :class:`DamagedFile` line."""
        try:
            yield
        except READ_ERRORS as e:
            raise DamagedFile(path, f"unreadable data ({first_line(e)})", repair_hint(self.root)) from e

    def _checked_files(
        self,
        encoder: str,
        cohort: str | Sequence[str] | None,
        slide_ids: Sequence[str] | None,
        columns: Sequence[str] | None,
        fingerprint: str | None,
        geometry: dict[str, Any] | None = None,
    ) -> tuple[list[Path], list[Any], int, list[str]]:
        """Selected files, their metadata, the common dim and the metadata columns to read.

        Every file must pass the cheap checks and carry ``fingerprint`` and ``geometry``
        (default: the first file's) and the same dim.
        """
        files = self._slide_files(encoder, cohort, slide_ids)
        fix = repair_hint(self.root)
        infos = [inspect_slide_file(p, fix) for p in files]
        expected = fingerprint if fingerprint is not None else infos[0].fingerprint
        geom = make_geometry(**geometry) if geometry is not None else infos[0].geometry
        dim = None
        for info in infos:
            check_fingerprint(expected, info.fingerprint, str(info.path))
            check_geometry(geom, info.geometry, str(info.path))
            if dim is not None and info.dim != dim:
                msg = f"{info.path}: embeddings of dim {info.dim}, earlier files have {dim}; re-embed the slide"
                raise BadInput(msg)
            dim = info.dim
        dim = int(dim or 0)
        names = [n for n in embedding_schema(dim).names if n != Col.EMBEDDING]
        cols = list(columns) if columns is not None else names
        unknown = [c for c in cols if c not in names]
        if unknown:
            msg = f"columns {', '.join(map(str, unknown))}: not metadata columns of the embedding table; use some of {', '.join(names)}"
            raise BadInput(msg)
        return files, [i.metadata for i in infos], dim, cols

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
        """Run SQL in DuckDB over the views ``embeddings_<encoder>`` (one per encoder, vectors as
        ``FLOAT[dim]``), ``embeddings`` (only in a store of one encoder), ``encoders``, ``slides``
        (all encoders), ``spots``, ``expression``, ``sentences`` (the spots' gene sentences,
        ``embedstore embed-text``) (macro ``cosine(a, b)``), and the nearest-tile
        table functions ``nearest_tiles(vector, k := 10)``, ``similar_tiles(slide_id, tile_id,
        k := 10)`` and ``text_tiles('ERBB2 GRB7 KRT19', k := 10)`` (zero-shot, with an encoder that
        has a text tower such as OmiCLIP) (options ``encoder``, ``cohort``, ``slides``, ``exclude_slides``), served by the
        tile index where there is one (:mod:`embedstore.store._tile_search`).

        DuckDB itself confines the query: it installs and loads no extension, cannot change its
        settings, and opens no file but through the views. Read-only (the default), each query
        runs in a fresh session whose statements are read-only transactions, so nothing it does
        outlives it. With ``read_only=False``, one session serves the store's queries (tables
        made in memory persist), and files may be read and written inside the store folder only
        (``COPY ... TO 'STORE/export.parquet'``, ``ATTACH 'STORE/scratch.duckdb'``).

        Parameters
        ----------
        query
            SQL, one or more statements; the last one's result is returned.
        params
            DuckDB parameters (``?`` or ``$name``) of the last statement.
        output
            ``"pandas"``, ``"arrow"`` or ``"numpy"`` (dict of arrays). A result whose
            ``embedding`` column mixes vector lengths or fingerprints is refused.
        """
        if self._con is None:
            # One line naming a damaged file (and the repair), not DuckDB's error from deep in a scan.
            _expression.inspect_sections(self.root, repair_hint(self.root))
            self._con = _catalog.connect(self.root, read_only=self.read_only)
        return _catalog.run_sql(self._con, query, params, output)


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

    Views: ``embeddings_<encoder>`` (``embeddings`` in a one-encoder store), ``slides``,
    ``encoders``, ``spots``, ``expression``; macro ``cosine(a, b)``; table functions
    ``nearest_tiles``, ``similar_tiles`` and ``text_tiles``. See :meth:`Store.sql`.
    """
    return open_store(store).sql(query, params=params, output=output)
