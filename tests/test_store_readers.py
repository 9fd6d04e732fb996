"""Clients without embedstore read the store's table folders with no options, and get what embedstore reads.

Also: a store written in layout 1 (partition keys inside the files too) reads as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from test_store import DIM, write_slide

from embedstore._schema import META_SCHEMA_VERSION, Col, embedding_schema, expression_schema, spots_schema
from embedstore.store import open_store, verify_store
from embedstore.store._files import write_options
from embedstore.store._layout import LAYOUT_VERSION, OLD_LAYOUT

KEYS = {"embeddings": [Col.ENCODER, Col.COHORT, Col.SLIDE_ID], "spots": [Col.COHORT, Col.SLIDE_ID]}
KEYS["expression"] = KEYS["spots"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One encoder's tiles of three slides in two cohorts, and the spots and counts of two sections."""
    store = open_store(tmp_path_factory.mktemp("readers") / "store", read_only=False)
    for slide, n, cohort in (("A1", 40, "her2st"), ("B1", 25, "her2st"), ("C2", 30, "other")):
        write_slide(store, slide, n, cohort=cohort)
    rng = np.random.default_rng(0)
    for slide, n in (("A1", 12), ("B1", 9)):
        counts = sp.random(n, 6, density=0.4, format="csr", random_state=rng, data_rvs=lambda k: rng.integers(1, 50, k))
        spots = [f"{slide}-{i}" for i in range(n)]
        store.write_spots("her2st", slide, spots, rng.random((n, 2)) * 1000, counts, [f"G{g}" for g in range(6)])
    return store.root


def expected(root: Path, table: str) -> tuple[pd.DataFrame, np.ndarray | None]:
    """What embedstore reads: rows keyed by partition keys and ids, and the embedding matrix (embeddings only)."""
    store = open_store(root)
    if table == "embeddings":
        meta, X = store.read_embeddings("toy")
        return meta.to_pandas(), X
    obs, genes, counts = store.read_expression()
    obs = obs.to_pandas()
    if table == "spots":
        return obs, None
    coo = counts.tocoo()
    rows = obs.iloc[coo.row][[Col.COHORT, Col.SLIDE_ID, Col.SPOT_ID]].reset_index(drop=True)
    return rows.assign(**{Col.GENE: np.asarray(genes)[coo.col], Col.COUNT: coo.data}), None


def assert_same(got: pd.DataFrame, table: str, root: Path) -> None:
    """``got`` (a client's read of ``root/table``) holds embedstore's rows, partition values and vectors."""
    want, X = expected(root, table)
    ids = {"embeddings": [Col.TILE_ID], "spots": [Col.SPOT_ID], "expression": [Col.SPOT_ID, Col.GENE]}[table]
    key = KEYS[table] + ids
    got = got.astype(dict.fromkeys(KEYS[table], str))  # categorical in pandas, string elsewhere
    assert len(got) == len(want)
    pos = pd.Series(np.arange(len(want)), index=pd.MultiIndex.from_frame(want[key]))
    order = pos.loc[pd.MultiIndex.from_frame(got[key])].to_numpy()  # KeyError: a row embedstore does not have
    assert sorted(order) == list(range(len(want)))
    if table == "embeddings":
        vectors = np.stack([np.asarray(v, dtype=np.float32) for v in got[Col.EMBEDDING]])
        np.testing.assert_array_equal(vectors, X[order])
        np.testing.assert_array_equal(got[Col.X].to_numpy(), want[Col.X].to_numpy()[order])
    if table == "spots":
        np.testing.assert_array_equal(got[Col.X].to_numpy(), want[Col.X].to_numpy()[order])
    if table == "expression":
        np.testing.assert_array_equal(got[Col.COUNT].to_numpy(np.float32), want[Col.COUNT].to_numpy()[order])


CLIENTS = {
    "pyarrow.dataset": lambda folder: ds.dataset(folder, partitioning="hive").to_table().to_pandas(),
    "pandas": pd.read_parquet,
    "polars.read_parquet": lambda folder: pl.read_parquet(folder).to_pandas(),
    "polars.scan_parquet": lambda folder: pl.scan_parquet(folder).collect().to_pandas(),
    "polars glob": lambda folder: pl.read_parquet(f"{folder}/**/*.parquet", hive_partitioning=True).to_pandas(),
    "duckdb": lambda folder: duckdb.connect().sql(f"SELECT * FROM read_parquet('{folder}/**/*.parquet')").df(),
    "duckdb hive": lambda folder: (
        duckdb.connect().sql(f"SELECT * FROM read_parquet('{folder}/**/*.parquet', hive_partitioning = true)").df()
    ),
}


@pytest.mark.parametrize("table", ["embeddings", "spots", "expression"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_reads_the_table_folder_with_no_options(root, client, table):
    assert_same(CLIENTS[client](root / table), table, root)


@pytest.mark.slow
def test_spark_reads_the_table_folders_with_no_options(root):
    pytest.importorskip("pyspark", reason="pyspark is not in the dev extra (about 500 MB); pip install pyspark")
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[1]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    try:
        for table in ("embeddings", "spots", "expression"):
            assert_same(spark.read.parquet(str(root / table)).toPandas(), table, root)
    finally:
        spark.stop()


def to_layout_1(root: Path) -> None:
    """Rewrite every store file as store layout 1 did: partition keys inside the file too, schema version 1."""
    schemas = {"embeddings": embedding_schema(DIM), "spots": spots_schema(), "expression": expression_schema()}
    for table, schema in schemas.items():
        for path in (root / table).rglob("*.parquet"):
            stored = pq.read_table(path, partitioning=None)
            keys = dict(part.split("=", 1) for part in path.relative_to(root / table).parent.parts)
            n = stored.num_rows
            cols = [pa.array([keys[c]] * n, pa.string()) if c in keys else stored.column(c) for c in schema.names]
            meta = {**stored.schema.metadata, META_SCHEMA_VERSION.encode(): OLD_LAYOUT.encode()}
            old = pa.Table.from_arrays(cols, schema=schema.with_metadata(meta))
            options = write_options(old.schema) if table == "embeddings" else {"compression": "zstd"}
            pq.write_table(old, path, **options)


def test_a_layout_1_store_reads_as_before_and_takes_new_slides(root, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(root, old)
    to_layout_1(old)
    assert pq.read_table(next(old.rglob("tiles.parquet"))).schema.names[0] == Col.COHORT
    new_store, old_store = open_store(root), open_store(old)
    meta_new, X_new = new_store.read_embeddings("toy")
    meta_old, X_old = old_store.read_embeddings("toy")
    assert meta_old.equals(meta_new)
    np.testing.assert_array_equal(X_old, X_new)
    chunks = list(old_store.iter_embeddings("toy", slide_ids=["C2", "A1"]))
    want, X = new_store.read_embeddings("toy", slide_ids=["C2", "A1"])
    assert pa.concat_tables([m for m, _ in chunks]).equals(want)
    np.testing.assert_array_equal(np.concatenate([x for _, x in chunks]), X)
    for query in (
        "SELECT encoder, cohort, slide_id, tile_id, embedding FROM embeddings ORDER BY ALL",
        "SELECT * FROM slides ORDER BY ALL",
        "SELECT * FROM spots ORDER BY ALL",
        "SELECT * FROM expression ORDER BY ALL",
    ):
        assert old_store.sql(query, output="arrow").equals(new_store.sql(query, output="arrow")), query
    (obs_old, genes_old, counts_old), (obs_new, genes_new, counts_new) = (
        old_store.read_expression(),
        new_store.read_expression(),
    )
    assert obs_old.equals(obs_new)
    assert genes_old == genes_new
    assert (counts_old != counts_new).nnz == 0
    check = verify_store(old_store)
    assert check.problems == []
    assert any("7 file(s) of store layout 1" in note and "pandas" in note for note in check.notes), check.notes
    # A slide embedded into the old store now is written in the new layout; both read together.
    writable = open_store(old, read_only=False)
    write_slide(writable, "D1", 12, cohort="other")
    meta, X = writable.read_embeddings("toy", cohort="other")
    assert meta.column(Col.SLIDE_ID).to_pylist() == ["C2"] * 30 + ["D1"] * 12
    assert set(meta.column(Col.COHORT).to_pylist()) == {"other"}
    np.testing.assert_array_equal(X[:30], new_store.read_embeddings("toy", slide_ids=["C2"])[1])
    assert writable.sql("SELECT count(*) AS n FROM embeddings WHERE cohort = 'other'")["n"].iloc[0] == 42


def test_check_flags_a_current_file_that_holds_its_partition_keys(root, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(root, store)
    to_layout_1(store)
    path = next(store.rglob("slide_id=B1/tiles.parquet"))
    table = pq.read_table(path, partitioning=None)
    meta = {**table.schema.metadata, META_SCHEMA_VERSION.encode(): LAYOUT_VERSION.encode()}
    pq.write_table(table.replace_schema_metadata(meta), path, **write_options(table.schema))
    problems = verify_store(open_store(store)).problems
    assert [(p.path, p.kind) for p in problems] == [(path, "slide")]
    assert "holds partition key columns (encoder, cohort, slide_id)" in problems[0].what


def test_read_embeddings_in_parallel_matches_pyarrow_row_group_by_row_group(tmp_path, monkeypatch):
    """Row groups of several files are read concurrently into their rows; a file another tool
    wrote (zstd pages, no fast path) is decoded by pyarrow in the same pool."""
    import embedstore.store._store as store_module
    import embedstore.store._writer as writer_module

    monkeypatch.setattr(writer_module, "row_group_rows", lambda dim: 1000)
    monkeypatch.setattr(store_module, "READ_THREADS", 3)
    store = open_store(tmp_path / "store", read_only=False)
    for slide, n in (("A", 2500), ("B", 999), ("C", 2001)):
        write_slide(store, slide, n, batch=500)
    foreign = tmp_path / "store/embeddings/encoder=toy/cohort=c1/slide_id=B/tiles.parquet"
    table = pq.read_table(foreign, partitioning=None)
    pq.write_table(table, foreign, compression="zstd", row_group_size=400)  # 3 row groups, no fast path

    meta, X = store.read_embeddings("toy")
    files = [tmp_path / f"store/embeddings/encoder=toy/cohort=c1/slide_id={s}/tiles.parquet" for s in "ABC"]
    assert [pq.ParquetFile(f).num_row_groups for f in files] == [3, 3, 3]
    want = pa.concat_tables([pq.read_table(f, partitioning=None) for f in files])
    np.testing.assert_array_equal(X, np.asarray(want.column(Col.EMBEDDING).to_pylist(), dtype=np.float32))
    assert meta.column(Col.TILE_ID).equals(want.column(Col.TILE_ID))
    assert meta.column(Col.SLIDE_ID).to_pylist() == ["A"] * 2500 + ["B"] * 999 + ["C"] * 2001
