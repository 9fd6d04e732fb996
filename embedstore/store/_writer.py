"""Staging and publishing one slide's embeddings: resumable batches, one atomic file, recorded geometry."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._atomic import atomic_file
from embedstore._schema import (
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
from embedstore.store._files import check_name, fsync_dir, row_group_rows, write_options, write_parquet_atomic
from embedstore.store._integrity import SlideFile, inspect_slide_file, quarantine, read_all, repair_hint
from embedstore.store._layout import KEYS, file_schema

LOG = logging.getLogger(__name__)

SLIDE_FILE = "tiles.parquet"
SOURCES = "_sources"  # STORE/_sources/encoder=/cohort=/slide_id=<s>.json: provenance of each slide


def slide_dir(encoder: str, cohort: str, slide_id: str) -> Path:
    """Hive path of a slide below ``embeddings/``, ``_staging/`` and ``_locks/``."""
    return Path(f"encoder={encoder}") / f"cohort={cohort}" / f"slide_id={slide_id}"


def source_file(root: Path, rel: Path) -> Path:
    """Sidecar recording where a slide came from; outside the data tree, so it survives a damaged footer."""
    return root / SOURCES / rel.parent / f"{rel.name}.json"


class SlideWriter:
    """Stage the embeddings of one slide batch by batch, then publish them as one file.

    Use it while holding :meth:`Store.lock_slide`. Each :meth:`append` writes one durable
    part under ``STORE/_staging`` (outside the tree readers glob); :meth:`commit` merges the
    parts (and an earlier published file, if any) into ``embeddings/.../tiles.parquet``
    with one atomic rename, then removes the staging folder.

    Every part and the published file record the encoder metadata and the tile geometry;
    parts of another fingerprint or geometry (an interrupted run with other settings) are
    never merged.
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
        store.clear_stale_staging(self.encoder, cohort, slide_id)
        if self.final.is_file():
            self._check_same(inspect_slide_file(self.final, self._fix), staged=False)
        for path in self._parts():
            try:
                info = inspect_slide_file(path, self._fix, part=True)
            except DamagedFile as e:  # its tiles are simply embedded again
                LOG.warning("%s: %s; moved it to %s", path, e.problem, quarantine(store.root, path))
                continue
            self._check_same(info, staged=True)
        if source is not None:
            with atomic_file(source_file(store.root, rel)) as tmp:
                tmp.write_text(json.dumps(source, sort_keys=True, indent=1))

    def _check_same(self, info: SlideFile, staged: bool) -> None:
        """Refuse to merge a file of another fingerprint or geometry into this slide."""
        fp = self.meta["fingerprint"]
        if staged and info.fingerprint != fp:
            msg = (
                f"{self.staging}: batches staged by an interrupted run have encoder fingerprint {info.fingerprint}, "
                f"this run has {fp}; resume with the original encoder and weights, or delete {self.staging} "
                "to embed the slide anew (or embed into another store)"
            )
            raise FingerprintMismatch(msg)
        check_fingerprint(fp, info.fingerprint, str(info.path))
        if self.geometry is None:
            self.geometry = info.geometry
        elif staged and info.geometry != self.geometry:
            msg = (
                f"{self.staging}: batches staged by an interrupted run were tiled at {describe_geometry(info.geometry)}, "
                f"this run tiles at {describe_geometry(self.geometry)}; resume with the original --target-mpp and --size, "
                f"or delete {self.staging} to embed the slide anew (or embed into another store)"
            )
            raise GeometryMismatch(msg)
        check_geometry(self.geometry, info.geometry, str(info.path))
        if self._dim is not None and info.dim != self._dim:
            raise DamagedFile(
                info.path, f"embeddings of dim {info.dim}, other files of the slide have {self._dim}", self._fix
            )
        self._dim = info.dim

    def _parts(self) -> list[Path]:
        return sorted(self.staging.glob("part-*.parquet")) if self.staging.is_dir() else []

    def _sources(self) -> list[Path]:
        return ([self.final] if self.final.is_file() else []) + self._parts()

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
        return read_all(path, self._fix, columns)

    def append(self, tiles: pa.Table, embeddings: np.ndarray) -> None:
        """Stage one batch durably and atomically.

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
        missing = [n for n in tile_schema().names if n not in tiles.column_names and n != Col.PADDED]
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
        for f in tile_schema():
            if f.name in KEYS:
                continue
            if f.name in tiles.column_names:
                cols[f.name] = tiles.column(f.name).cast(f.type)
            else:
                cols[f.name] = pa.array([False] * n, pa.bool_())
        cols[Col.FINGERPRINT] = pa.array([self.meta["fingerprint"]] * n, pa.string())
        cols[Col.EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        schema = self._schema(emb.shape[1], self.n_tiles)
        table = pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)
        parts = self._parts()
        index = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        dest = self.staging / f"part-{index:06d}.parquet"
        write_parquet_atomic(table, dest, row_group_size=row_group_rows(emb.shape[1]), **write_options(schema))

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
        sources = self._sources()
        if not sources:
            msg = f"{where}: nothing to commit; append embeddings first"
            raise BadInput(msg)
        parts = self._parts()
        if not parts:  # already published by an earlier run
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
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if (
            len(sources) == 1
            and len(order) == table.num_rows
            and (order == np.arange(len(order))).all()
            and pq.read_schema(sources[0]).metadata == schema.metadata
        ):
            # One staged part already in final order and with the final metadata: publish it as it is.
            sources[0].replace(self.final)
            fsync_dir(self.final.parent)
            shutil.rmtree(self.staging, ignore_errors=True)
            return self.final
        table = table.take(pa.array(order)).replace_schema_metadata(schema.metadata)
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
