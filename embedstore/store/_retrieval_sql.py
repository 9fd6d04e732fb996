"""Nearest-tile search as SQL: the functions every DuckDB session of a store gets.

Two table macros, joinable with the store's views (they return cohort, slide_id, tile_id,
spot_id, x, y, score, rank)::

    SELECT * FROM nearest_tiles(<vector>, k := 10)              -- tiles nearest a vector
    SELECT * FROM similar_tiles('C2', '123_456', k := 10)       -- tiles nearest a stored tile
    SELECT * FROM text_tiles('ERBB2 GRB7 KRT19', k := 10)       -- tiles nearest gene symbols (OmiCLIP)

with the named options ``encoder``, ``cohort``, ``slides`` (VARCHAR[]) and
``exclude_slides`` (VARCHAR[]), applied inside the search. They call two vectorised (Arrow)
Python functions, ``_es_nearest``, ``_es_similar`` and ``_es_text``, which DuckDB hands whole chunks of
queries at a time (a LATERAL join of 1,000 query rows is one or two FAISS calls), and which
search through :mod:`embedstore.store._tile_search`: the tile index where the store has one, exact
scans of the Parquet files otherwise. ``text_tiles`` embeds its text with the text tower of the
checkpoint the tiles were embedded with (:mod:`embedstore.store._text_query`). They only read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HIT_FIELDS = {
    "cohort": "VARCHAR",
    "slide_id": "VARCHAR",
    "tile_id": "VARCHAR",
    "spot_id": "VARCHAR",
    "x": "BIGINT",
    "y": "BIGINT",
    "score": "FLOAT",
    "rank": "INTEGER",
}
_OPTIONS = "k := 10, encoder := NULL, cohort := NULL, slides := NULL, exclude_slides := NULL"
_PASS = "k, encoder, cohort, slides, exclude_slides"
MACROS = (
    f"CREATE OR REPLACE MACRO nearest_tiles(query, {_OPTIONS}) AS TABLE "
    f"SELECT unnest(_es_nearest(CAST(query AS FLOAT[]), {_PASS}), recursive := true)",
    f"CREATE OR REPLACE MACRO similar_tiles(slide, tile, {_OPTIONS}) AS TABLE "
    f"SELECT unnest(_es_similar(CAST(slide AS VARCHAR), CAST(tile AS VARCHAR), {_PASS}), recursive := true)",
    f"CREATE OR REPLACE MACRO text_tiles(text, {_OPTIONS}) AS TABLE "
    f"SELECT unnest(_es_text(CAST(text AS VARCHAR), {_PASS}), recursive := true)",
)
_ARROW_HIT = pa.struct(
    [
        (name, t)
        for name, t in zip(HIT_FIELDS, (pa.string(),) * 4 + (pa.int64(),) * 2 + (pa.float32(), pa.int32()), strict=True)
    ]
)


def install(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Register the search functions and macros of the store at ``root`` in ``con``."""
    hits = duckdb.list_type(duckdb.struct_type(HIT_FIELDS))
    text, texts = duckdb.sqltype("VARCHAR"), duckdb.list_type("VARCHAR")
    options = [duckdb.sqltype("INTEGER"), text, text, texts, texts]
    for name in ("_es_nearest", "_es_similar", "_es_text"):
        with contextlib.suppress(duckdb.InvalidInputException):  # not registered yet
            con.remove_function(name)
    common = {"type": "arrow", "null_handling": "special", "side_effects": False}
    con.create_function("_es_nearest", _nearest(root), [duckdb.list_type("FLOAT"), *options], hits, **common)
    con.create_function("_es_similar", _similar(root), [text, text, *options], hits, **common)
    con.create_function("_es_text", _text(root), [text, *options], hits, **common)
    for macro in MACROS:
        con.execute(macro)


def _column(a: Any) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def _groups(options: list[pa.Array]) -> dict[tuple, list[int]]:
    """Rows by their (k, encoder, cohort, slides, exclude_slides): one search per distinct set."""
    values = [_column(a).to_pylist() for a in options]
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(zip(*values, strict=True)):
        key = tuple(tuple(v) if isinstance(v, list) else v for v in row)
        groups.setdefault(key, []).append(i)
    return groups


def _search(root: Path, queries: np.ndarray, key: tuple) -> pa.Table:
    from embedstore.errors import BadInput
    from embedstore.store._tile_search import nearest_tiles

    k, encoder, cohort, slides, exclude = key
    if k is None:
        msg = "nearest_tiles/similar_tiles: k is NULL; give a number of tiles, e.g. k := 10"
        raise BadInput(msg)
    return nearest_tiles(root, queries, int(k), encoder=encoder, cohort=cohort, slides=slides, exclude_slides=exclude)


def _assemble(n: int, results: list[tuple[np.ndarray, pa.Table]], valid: np.ndarray) -> pa.Array:
    """One list of hits per input row (NULL where the row's query was NULL)."""
    tables, counts = [], np.zeros(n, dtype=np.int64)
    for rows, hits in results:
        if not hits.num_rows:
            continue
        q = rows[hits.column("query").to_numpy()]
        tables.append(hits.append_column("_row", pa.array(q)))
        np.add.at(counts, q, 1)
    if tables:
        allhits = pa.concat_tables(tables)
        allhits = allhits.take(pc.sort_indices(allhits, [("_row", "ascending"), ("rank", "ascending")]))
        values = pa.StructArray.from_arrays(
            [allhits.column(c).combine_chunks() for c in HIT_FIELDS], fields=list(_ARROW_HIT)
        )
    else:
        values = pa.array([], _ARROW_HIT)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~valid))


def _nearest(root: Path) -> Any:
    def nearest(query: Any, k: Any, encoder: Any, cohort: Any, slides: Any, exclude_slides: Any) -> pa.Array:
        options = [k, encoder, cohort, slides, exclude_slides]
        query = _column(query)
        n = len(query)
        valid = ~np.asarray(query.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        results = []
        for key, rows in _groups(options).items():
            rows = np.array([r for r in rows if valid[r]], dtype=np.int64)
            if not len(rows):
                continue
            lists = query.take(pa.array(rows))
            lengths = set(pc.list_value_length(lists).to_pylist())
            if len(lengths) != 1:
                from embedstore.errors import BadInput

                msg = f"nearest_tiles: query vectors of {sorted(lengths)} values in one call; give vectors of the encoder's dim"
                raise BadInput(msg)
            vectors = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), -1)
            results.append((rows, _search(root, vectors, key)))
        return _assemble(n, results, valid)

    return nearest


def _similar(root: Path) -> Any:
    def similar(slide: Any, tile: Any, k: Any, encoder: Any, cohort: Any, slides: Any, exclude_slides: Any) -> pa.Array:
        options = [k, encoder, cohort, slides, exclude_slides]
        from embedstore.store._tile_search import tile_vector

        slides, tiles = _column(slide).to_pylist(), _column(tile).to_pylist()
        valid = np.array([s is not None and t is not None for s, t in zip(slides, tiles, strict=True)])
        results = []
        for key, rows in _groups(options).items():
            rows = np.array([r for r in rows if valid[r]], dtype=np.int64)
            if not len(rows):
                continue
            _, encoder, cohort, _, _ = key
            vectors = np.stack([tile_vector(root, slides[r], tiles[r], encoder=encoder, cohort=cohort) for r in rows])
            results.append((rows, _search(root, vectors, key)))
        return _assemble(len(slides), results, valid)

    return similar


def _text(root: Path) -> Any:
    def text_tiles(text: Any, k: Any, encoder: Any, cohort: Any, slides: Any, exclude_slides: Any) -> pa.Array:
        from embedstore.store._store import Store
        from embedstore.store._text_query import image_encoder, measured_genes, text_vector

        options = [k, encoder, cohort, slides, exclude_slides]
        texts = _column(text).to_pylist()
        valid = np.array([t is not None for t in texts])
        st = Store(root)
        known = measured_genes(st)
        results = []
        for key, rows in _groups(options).items():
            rows = np.array([r for r in rows if valid[r]], dtype=np.int64)
            if not len(rows):
                continue
            k_, encoder_, cohort_, slides_, exclude_ = key
            name = image_encoder(st.encoders(), encoder_, root)
            meta = st.encoder_metadata(name, cohort_, slides_)
            vectors = np.stack([text_vector(meta, texts[r], known, root) for r in rows])
            results.append((rows, _search(root, vectors, (k_, name, cohort_, slides_, exclude_))))
        return _assemble(len(texts), results, valid)

    return text_tiles
