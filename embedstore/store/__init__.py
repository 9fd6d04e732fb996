"""Parquet embedding store: Hive-partitioned files, resumable atomic writes, DuckDB SQL.

Layout of a store folder::

    embeddings/encoder=<e>/cohort=<c>/slide_id=<s>/tiles.parquet   one file per slide and encoder
    spots/cohort=<c>/slide_id=<s>/spots.parquet                    ST spots
    expression/cohort=<c>/slide_id=<s>/expression.parquet          nonzero counts, long form
    _staging/...   batches of slides being embedded (never read by queries)
    _locks/...     flock files, one per slide and encoder
"""

from __future__ import annotations

from embedstore.store._store import SlideWriter, Store, check_writable, open_store, sql

__all__ = ["SlideWriter", "Store", "check_writable", "open_store", "sql"]
