"""Parquet embedding store: Hive-partitioned files, resumable atomic writes, DuckDB SQL.

Layout of a store folder::

    embeddings/encoder=<e>/cohort=<c>/slide_id=<s>/tiles.parquet   one file per slide and encoder
    spots/cohort=<c>/slide_id=<s>/spots.parquet                    ST spots
    expression/cohort=<c>/slide_id=<s>/expression.parquet          nonzero counts, long form
    sentences/cohort=<c>/slide_id=<s>/sentences.parquet            gene sentences (embedstore.sentences)
    _staging/...   batches of slides being embedded (never read by queries)
    _sources/...   where each slide was embedded from, for `embedstore check --repair`
    _quarantine/.. damaged or foreign files moved aside (never deleted)
    _locks/...     flock files, one per slide and encoder

The folders carry the partition keys (encoder, cohort, slide_id); the files hold the other
columns, so pyarrow, pandas, polars, DuckDB and Spark read ``embeddings/``, ``spots/``,
``expression/`` and ``sentences/`` with no options. See ``_layout.py``.
"""

from __future__ import annotations

from embedstore.store._check import Problem, StoreCheck, verify_store
from embedstore.store._store import SlideWriter, Store, check_writable, open_store, sql

__all__ = ["Problem", "SlideWriter", "Store", "StoreCheck", "check_writable", "open_store", "sql", "verify_store"]
