"""`embedstore sql` / Store.sql: read-only and confined by DuckDB's own settings, not by parsing SQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from embedstore.embedding import embed
from embedstore.errors import BadInput
from embedstore.store import open_store
from embedstore.testing import make_synthetic_cohort

CLI = [sys.executable, "-m", "embedstore"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A store of a 2-section synthetic ST cohort, embedded with the built-in encoder."""
    work = tmp_path_factory.mktemp("sqlsafe")
    cohort = make_synthetic_cohort(
        work / "cohort", n_slides=2, n_spots=8, n_genes=10, seed=0, width=800, height=800, mpp=1.0
    )
    report = embed(cohort.root, work / "store", encoder="builtin", workers=0, progress=False)
    assert report.ok
    (work / "store" / "_staging" / "probe").mkdir(parents=True, exist_ok=True)
    return work / "store"


@pytest.fixture
def writable(store_dir, tmp_path):
    """A private copy of the store, opened with SQL writes allowed."""
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    return open_store(root, read_only=False)


def one_line_refusal(store, query: str, *needles: str) -> str:
    with pytest.raises(BadInput) as info:
        store.sql(query)
    text = str(info.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_TOKEN": "hf_secret_token_for_the_test"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False, cwd=cwd, env=env)


# Every one of these ran, wrote or read before; each must now be one line naming what DuckDB refused.
ESCAPES = {
    "explain-analyze-copy": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{outside}/x.csv'",
    "explain-analyze-create": "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "create-table": "CREATE TABLE t AS SELECT 1",
    "replace-a-view": "CREATE OR REPLACE VIEW slides AS SELECT 1 AS x",
    "copy-outside": "COPY (SELECT 1) TO '{outside}/x.csv'",
    "copy-inside-store": "COPY (SELECT 1) TO '{root}/embeddings/x.csv'",
    "read-csv-passwd": "SELECT * FROM read_csv('/etc/passwd')",
    "read-text-environ": "SELECT * FROM read_text('/proc/self/environ')",
    "read-blob": "SELECT * FROM read_blob('/etc/hostname')",
    "replacement-scan": "SELECT * FROM '/etc/passwd'",
    "glob-etc": "SELECT * FROM glob('/etc/*')",
    "parquet-metadata-elsewhere": "SELECT * FROM parquet_metadata('{outside}/x.parquet')",
    "store-file-by-path": "SELECT count(*) FROM read_parquet('{root}/embeddings/*/*/*/*.parquet')",
    "store-internals": "SELECT * FROM glob('{root}/_staging/*')",
    "getenv": "SELECT getenv('HF_TOKEN')",
    "enable-external-access": "SET enable_external_access = true",
    "reset": "RESET enable_external_access",
    "unlock": "SET lock_configuration = false",
    "allow-everything": "SET allowed_directories = ['/']",
    "profiling-to-a-file": "PRAGMA profiling_output = '{outside}/p.txt'",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "attach-file": "ATTACH '{outside}/x.db' AS x",
    "export-database": "EXPORT DATABASE '{outside}/exported'",
    "commit-then-create": "COMMIT; CREATE TABLE t AS SELECT 1",
    "http": "SELECT * FROM read_csv('https://example.com/x.csv')",
}


@pytest.mark.parametrize("name", ESCAPES)
def test_read_only_sql_cannot_escape(store_dir, tmp_path, name):
    query = ESCAPES[name].format(outside=tmp_path, root=store_dir)
    store = open_store(store_dir)
    one_line_refusal(store, query, "query: ")
    assert list(tmp_path.iterdir()) == []  # nothing written outside
    assert not (store_dir / "embeddings" / "x.csv").exists()
    # The views are intact for the next query of the same Store.
    assert store.sql("SELECT count(*) AS n FROM slides")["n"].iloc[0] == 2


def test_read_only_session_state_does_not_outlive_a_query(store_dir):
    store = open_store(store_dir)
    store.sql("ATTACH ':memory:' AS scratch")  # harmless in a throwaway session
    store.sql("SET VARIABLE v = 1")
    assert store.sql("SELECT getvariable('v') AS v")["v"].isna().all()
    assert "scratch" not in store.sql("SELECT database_name FROM duckdb_databases()")["database_name"].tolist()
    assert store.sql("SELECT count(*) AS n FROM embeddings_builtin")["n"].iloc[0] > 0


def test_messages_say_why(store_dir):
    store = open_store(store_dir)
    one_line_refusal(store, "SELECT * FROM read_csv('/etc/passwd')", "/etc/passwd", "opens no file", "--write")
    one_line_refusal(store, "CREATE TABLE t AS SELECT 1", "read-only", "--write")
    one_line_refusal(store, "SET enable_external_access = true", "locked")
    one_line_refusal(store, "SELEC 1", "syntax error", "fix the SQL")


@pytest.mark.parametrize(
    "query",
    [
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{outside}/x.csv'",
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "SELECT * FROM read_text('/proc/self/environ')",
        "SELECT getenv('HF_TOKEN')",
        "SET enable_external_access = true",
    ],
)
def test_cli_refuses_in_one_line(store_dir, tmp_path, query):
    result = cli("sql", store_dir, query.format(outside=tmp_path))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "hf_secret_token" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []


def test_write_mode_writes_inside_the_store_only(writable, tmp_path):
    root = writable.root
    writable.sql(f"COPY (SELECT slide_id, n_tiles FROM slides) TO '{root}/export.csv'")
    assert (root / "export.csv").read_text().startswith("slide_id,n_tiles")
    writable.sql(f"ATTACH '{root}/scratch.duckdb' AS scratch; CREATE TABLE scratch.t AS SELECT 1 AS a")
    assert (root / "scratch.duckdb").is_file()
    # In-memory tables persist from one query to the next of the same Store.
    writable.sql("CREATE TABLE mine AS SELECT slide_id FROM slides")
    assert writable.sql("SELECT count(*) AS n FROM mine")["n"].iloc[0] == 2
    outside = tmp_path / "outside"
    outside.mkdir()
    for query in (
        f"COPY (SELECT 1) TO '{outside}/x.csv'",
        f"COPY (SELECT 1) TO '{root}/../x.csv'",
        f"ATTACH '{outside}/x.db' AS x",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SET enable_external_access = true",
        "INSTALL httpfs",
    ):
        one_line_refusal(writable, query, "query: ")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x.csv").exists()
    one_line_refusal(writable, "SELECT * FROM read_csv('/etc/passwd')", f"inside {root} only")


def test_write_mode_refreshes_views_and_keeps_own_tables(writable):
    writable.sql("CREATE TABLE mine AS SELECT 1 AS a")
    writable.refresh()
    assert writable.sql("SELECT a FROM mine")["a"].tolist() == [1]
    assert writable.sql("SELECT count(*) AS n FROM slides")["n"].iloc[0] == 2


def test_cli_write_allows_relative_paths_inside_the_store(writable, tmp_path):
    result = cli("sql", "store", "COPY (SELECT slide_id FROM slides) TO 'store/out.csv'", "--write", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "store" / "out.csv").is_file()
    result = cli("sql", "store", "COPY (SELECT 1) TO 'elsewhere.csv'", "--write", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "elsewhere.csv").exists()
