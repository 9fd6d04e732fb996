"""The DuckDB catalog of a store: an in-memory connection with views over the Parquet files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._schema import META_ENCODER, Col, embedding_schema, expression_schema, spots_schema
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

# Statement types a read-only store runs; everything else (CREATE, INSERT, COPY, ATTACH,
# SET, PRAGMA, ...) needs open_store(path, read_only=False).
_READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def view_name(encoder: str) -> str:
    """SQL name of the per-encoder view, e.g. ``embeddings_timm_vit_small``."""
    return "embeddings_" + re.sub(r"\W", "_", encoder).lower()


def _lit(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def encoder_info(root: Path) -> list[dict[str, Any]]:
    """One dict per encoder folder with files: name, dim, fingerprint, family, glob."""
    out = []
    for d in sorted((root / "embeddings").glob("encoder=*")):
        files = sorted(d.glob("cohort=*/slide_id=*/*.parquet"))
        if not files:
            continue
        schema = pq.read_schema(files[0])
        meta = json.loads((schema.metadata or {}).get(META_ENCODER.encode(), b"{}"))
        out.append(
            {
                "encoder": d.name.split("=", 1)[1],
                "dim": schema.field(Col.EMBEDDING).type.list_size,
                "fingerprint": meta.get("fingerprint"),
                "family": meta.get("family"),
                "n_files": len(files),
                "glob": str(d / "cohort=*" / "slide_id=*" / "*.parquet"),
            }
        )
    return out


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views and macros."""
    con = duckdb.connect(":memory:")
    create_views(con, root)
    return con


def _empty(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema) -> str:
    con.register(f"_empty_{name}", schema.empty_table())
    return f"SELECT * FROM _empty_{name}"


def create_views(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """(Re)create the views ``embeddings``, ``embeddings_<encoder>``, ``encoders``, ``slides``,
    ``spots``, ``expression`` and the macro ``cosine(a, b)``."""
    infos = encoder_info(root)
    selects = []
    for info in infos:
        dim = info["dim"]
        sel = (
            f"SELECT * REPLACE (CAST({Col.EMBEDDING} AS FLOAT[{dim}]) AS {Col.EMBEDDING}) "
            f"FROM read_parquet({_lit(info['glob'])}, hive_partitioning = false)"
        )
        con.execute(f"CREATE OR REPLACE VIEW {view_name(info['encoder'])} AS {sel}")
        selects.append((dim, info["glob"]))
    dims = {d for d, _ in selects}
    if not selects:
        body = _empty(con, "embeddings", embedding_schema(1))
    elif len(dims) == 1:
        # One dimension: cast to the fixed-size ARRAY type so array_cosine_similarity works.
        globs = ", ".join(_lit(g) for _, g in selects)
        body = (
            f"SELECT * REPLACE (CAST({Col.EMBEDDING} AS FLOAT[{dims.pop()}]) AS {Col.EMBEDDING}) "
            f"FROM read_parquet([{globs}], hive_partitioning = false)"
        )
    else:
        # Mixed dimensions cannot share an ARRAY type: FLOAT[] lists here, per-encoder views cast.
        globs = ", ".join(_lit(g) for _, g in selects)
        body = f"SELECT * FROM read_parquet([{globs}], hive_partitioning = false)"
    con.execute(f"CREATE OR REPLACE VIEW embeddings AS {body}")
    enc_table = pa.table(
        {
            "encoder": pa.array([i["encoder"] for i in infos], pa.string()),
            "family": pa.array([i["family"] for i in infos], pa.string()),
            "dim": pa.array([i["dim"] for i in infos], pa.int32()),
            "fingerprint": pa.array([i["fingerprint"] for i in infos], pa.string()),
            "n_slides": pa.array([i["n_files"] for i in infos], pa.int64()),
        }
    )
    con.register("_encoders", enc_table)
    con.execute("CREATE OR REPLACE VIEW encoders AS SELECT * FROM _encoders")
    con.execute(
        f"""CREATE OR REPLACE VIEW slides AS
        SELECT {Col.ENCODER}, {Col.COHORT}, {Col.SLIDE_ID}, count(*) AS n_tiles,
               any_value({Col.FINGERPRINT}) AS {Col.FINGERPRINT}, any_value({Col.MPP}) AS {Col.MPP},
               any_value({Col.SIZE_PX}) AS {Col.SIZE_PX}, count({Col.SPOT_ID}) AS n_spot_tiles
        FROM embeddings GROUP BY ALL"""
    )
    for name, schema, sub, fname in (
        ("spots", spots_schema(), "spots", "spots.parquet"),
        ("expression", expression_schema(), "expression", "expression.parquet"),
    ):
        pattern = root / sub / "cohort=*" / "slide_id=*" / fname
        if any((root / sub).glob(f"cohort=*/slide_id=*/{fname}")):
            body = f"SELECT * FROM read_parquet({_lit(pattern)}, hive_partitioning = false, union_by_name = true)"
        else:
            body = _empty(con, name, schema)
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
    con.execute("CREATE OR REPLACE MACRO cosine(a, b) AS array_cosine_similarity(a, b)")


def run_sql(con: duckdb.DuckDBPyConnection, query: str, params: Any, output: str, read_only: bool) -> Any:
    """Run ``query`` (checked for writes when ``read_only``) and return it as pandas, arrow or numpy."""
    if output not in ("pandas", "arrow", "numpy"):
        msg = f"output={output!r}: not a known output; use 'pandas', 'arrow' or 'numpy'"
        raise BadInput(msg)
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        msg = f"query: {e}; fix the SQL"
        raise BadInput(msg) from e
    if not statements:
        msg = "query: empty SQL; give a SELECT statement"
        raise BadInput(msg)
    if read_only:
        bad = [s.type.name for s in statements if s.type not in _READ_ONLY]
        if bad:
            msg = (
                f"query: {bad[0]} statements are not allowed on a read-only store; "
                "open_store(path, read_only=False) (CLI: --write) to allow writes"
            )
            raise BadInput(msg)
    for s in statements[:-1]:
        con.execute(s)
    try:
        if output == "arrow":  # the relation API hands Arrow over without an extra copy
            return con.sql(statements[-1].query, params=params).to_arrow_table()
        res = con.execute(statements[-1], params) if params is not None else con.execute(statements[-1])
    except duckdb.Error as e:
        msg = f"query: {e}; fix the SQL (views: embeddings, embeddings_<encoder>, encoders, slides, spots, expression)"
        raise BadInput(msg) from e
    if output == "numpy":
        return res.fetchnumpy()
    return res.df()
