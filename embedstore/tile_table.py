"""The tile table: its rows, the level-0 footprint a row stands for, and its Parquet file.

A tile table (``_schema.tile_schema()``) holds one row per tile: its level-0 centre ``x, y``, the
µm/px it is sampled at and its side in pixels. The file carries ``embedstore.schema_version`` and
``embedstore.kind = "tiles"`` metadata, so that only files embedstore wrote are read or replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedstore._atomic import atomic_file, check_replaceable
from embedstore._schema import META_KIND, META_SCHEMA_VERSION, SCHEMA_VERSION, Col, tile_id, tile_schema
from embedstore.errors import BadInput

__all__ = [
    "check_tiles_out",
    "make_tile_table",
    "read_tile_table",
    "tile_geometry",
    "tile_origin",
    "write_tile_table",
]

TILES_KIND = "tiles"


def tile_geometry(slide_mpp: float, target_mpp: float, size_px: int) -> float:
    """Side of a tile in level-0 pixels: ``size_px * target_mpp / slide_mpp``."""
    return size_px * target_mpp / slide_mpp


def tile_origin(centre: np.ndarray | int, side0: float) -> np.ndarray:
    """Level-0 top-left pixel of tiles of side ``side0`` centred on ``centre`` (per axis)."""
    # floor(c - side/2 + 0.5): for an even side in level-0 pixels the centre pixel is side/2
    return np.floor(np.asarray(centre, dtype=np.float64) - side0 / 2 + 0.5).astype(np.int64)


def make_tile_table(
    slide_id: str,
    cx: np.ndarray,
    cy: np.ndarray,
    spot_ids: Sequence[str] | None,
    mpp: float,
    size_px: int,
    padded: np.ndarray,
) -> pa.Table:
    """Tile table of one slide from level-0 centres, one sampling and the border flags.

    ``spot_ids`` (one per tile) is ``None`` for grid tiles; tile ids are made from the centres.
    """
    n = len(cx)
    return pa.table(
        {
            Col.SLIDE_ID: pa.array([slide_id] * n, pa.string()),
            Col.TILE_ID: pa.array([tile_id(x, y) for x, y in zip(cx.tolist(), cy.tolist(), strict=True)], pa.string()),
            Col.SPOT_ID: pa.array(list(spot_ids) if spot_ids is not None else [None] * n, pa.string()),
            Col.X: pa.array(cx, pa.int64()),
            Col.Y: pa.array(cy, pa.int64()),
            Col.MPP: pa.array(np.full(n, mpp, dtype=np.float64)),
            Col.SIZE_PX: pa.array(np.full(n, size_px, dtype=np.int32)),
            Col.PADDED: pa.array(padded.astype(bool)),
        },
        schema=tile_schema(),
    )


def write_tile_table(table: pa.Table, path: str | Path) -> Path:
    """Write a tile table to Parquet atomically (temporary file, then rename).

    The file carries ``embedstore.schema_version`` and ``embedstore.kind = "tiles"`` metadata.

    Returns
    -------
    The path written.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = table.select(tile_schema().names).cast(tile_schema())
    except (KeyError, pa.ArrowInvalid) as e:
        msg = f"{path}: table does not match the tile schema ({e}); make it with grid_tiles or spot_tiles"
        raise BadInput(msg) from e
    table = table.replace_schema_metadata({META_SCHEMA_VERSION: SCHEMA_VERSION, META_KIND: TILES_KIND})
    check_tiles_out(path)
    with atomic_file(path, size_hint=table.nbytes) as tmp:
        pq.write_table(table, tmp)
    return path


def _parquet_kind(path: Path) -> str | None:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return meta.get(META_KIND.encode(), b"").decode() or None


def check_tiles_out(path: str | Path) -> None:
    """Refuse (:class:`BadInput`, nothing touched) a tile-table path holding a file embedstore did not write."""
    check_replaceable(path, TILES_KIND, what="tile table (.parquet)", reader=_parquet_kind)


def read_tile_table(path: str | Path) -> pa.Table:
    """Read a tile table written by :func:`write_tile_table` (checks kind and schema version)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such file; write it with write_tile_table"
        raise BadInput(msg)
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    kind = meta.get(META_KIND.encode(), b"").decode()
    version = meta.get(META_SCHEMA_VERSION.encode(), b"").decode()
    if kind != TILES_KIND or version != SCHEMA_VERSION:
        msg = f"{path}: not an embedstore tile table of schema version {SCHEMA_VERSION} (kind={kind!r}, version={version!r}); tile the slide again"
        raise BadInput(msg)
    return table
