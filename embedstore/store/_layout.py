"""Which columns a store file's path carries, and the layout version its metadata records.

The folders of a store file name its partition keys (``encoder=<e>/cohort=<c>/slide_id=<s>/``)
and the file holds every other column, so Hive discovery (pyarrow.dataset, pandas, polars,
DuckDB, Spark) reads a table folder with no options. Store layout 1 also kept the keys inside
each file, which those readers reject; embedstore still reads such files, taking the keys from
the path as for every file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from embedstore._schema import META_SCHEMA_VERSION, Col

LAYOUT_VERSION = "2"  # embedstore.schema_version of the files the store writes
OLD_LAYOUT = "1"  # partition keys stored inside the files too
READABLE_VERSIONS = (OLD_LAYOUT, LAYOUT_VERSION)

EMBEDDING_KEYS = (Col.ENCODER, Col.COHORT, Col.SLIDE_ID)  # embeddings/encoder=/cohort=/slide_id=/
SECTION_KEYS = (Col.COHORT, Col.SLIDE_ID)  # spots/ and expression/: cohort=/slide_id=/
KEYS = frozenset(EMBEDDING_KEYS)


def file_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` as a store file holds it: without partition keys, with the layout version in its metadata."""
    meta = {**(schema.metadata or {}), META_SCHEMA_VERSION.encode(): LAYOUT_VERSION.encode()}
    return pa.schema([f for f in schema if f.name not in KEYS], metadata=meta)


def stored_columns(columns: Sequence[str]) -> list[str]:
    """The names in ``columns`` that are read from inside a file (not from its path)."""
    return [c for c in columns if c not in KEYS]


def path_keys(path: Path) -> dict[str, str]:
    """Partition keys named by the folders just above a store file, e.g. ``{"cohort": "c1", "slide_id": "A1"}``."""
    keys: dict[str, str] = {}
    for folder in Path(path).parents:
        name, sep, value = folder.name.partition("=")
        if not sep or name not in KEYS:
            break
        keys[name] = value
    return keys


def with_keys(table: pa.Table, path: Path, columns: Sequence[str]) -> pa.Table:
    """``columns`` of a table read from ``path``: partition keys from the path, the others from ``table``."""
    keys = path_keys(path)
    arrays, fields = [], []
    for name in columns:
        if name in KEYS:
            arrays.append(pa.repeat(pa.scalar(keys[name], pa.string()), table.num_rows))
            fields.append(pa.field(name, pa.string(), nullable=False))
        else:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))
