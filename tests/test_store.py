"""Store: Parquet round trips, atomic resumable writes, locks, bulk reads, SQL, expression."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from embedstore._schema import META_ENCODER, META_SCHEMA_VERSION, Col, tile_id, tile_schema
from embedstore.errors import BadInput, FingerprintMismatch
from embedstore.store import open_store
from embedstore.store._files import NotPlain, _page_header, read_vectors_into, vectors_from_arrow
from embedstore.store._layout import LAYOUT_VERSION

DIM = 16
META = {"name": "toy", "family": "builtin", "cfg": {"dim": DIM}, "fingerprint": "f" * 16}


def make_tiles(slide: str, n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    xs = rng.permutation(n) * 224 + 112
    ys = rng.integers(0, 5, n) * 224 + 112
    return pa.table(
        {
            Col.SLIDE_ID: [slide] * n,
            Col.TILE_ID: [tile_id(x, y) for x, y in zip(xs, ys, strict=True)],
            Col.SPOT_ID: [f"spot{i}" if i % 3 else None for i in range(n)],
            Col.X: xs,
            Col.Y: ys,
            Col.MPP: [0.5] * n,
            Col.SIZE_PX: pa.array([224] * n, pa.int32()),
            Col.PADDED: [i % 7 == 0 for i in range(n)],
        },
        schema=tile_schema(),
    )


def embed(tiles: pa.Table) -> np.ndarray:
    """Deterministic fake encoder: the same tile always gets the same vector."""
    seeds = [zlib.crc32(t.encode()) for t in tiles.column(Col.TILE_ID).to_pylist()]
    return np.stack([np.random.default_rng(s).standard_normal(DIM) for s in seeds]).astype(np.float32)


def write_slide(store, slide: str, n: int, cohort: str = "c1", meta: dict = META, batch: int = 16) -> pa.Table:
    tiles = make_tiles(slide, n, seed=len(slide) + n)
    w = store.slide_writer(meta, cohort, slide)
    for i in range(0, n, batch):
        part = tiles.slice(i, batch)
        w.append(part, embed(part))
    w.commit()
    return tiles


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store", read_only=False)


def test_round_trip_columns_and_metadata(store):
    tiles = write_slide(store, "S1", 40)
    path = store.root / "embeddings/encoder=toy/cohort=c1/slide_id=S1/tiles.parquet"
    table = pq.read_table(path)
    meta = table.schema.metadata
    assert meta[META_SCHEMA_VERSION.encode()].decode() == LAYOUT_VERSION
    assert json.loads(meta[META_ENCODER.encode()]) == META
    assert table.schema.field(Col.EMBEDDING).type == pa.list_(pa.field("element", pa.float32(), False), DIM)
    # The folders carry the partition keys; the file holds the other columns only.
    assert not {Col.ENCODER, Col.COHORT, Col.SLIDE_ID} & set(table.column_names)
    # Rows come back sorted by (y, x); compare as sets keyed by tile id.
    got = table.to_pandas().set_index(Col.TILE_ID).sort_index()
    want = tiles.to_pandas().set_index(Col.TILE_ID).sort_index()
    for c in (Col.SPOT_ID, Col.X, Col.Y, Col.MPP, Col.SIZE_PX, Col.PADDED):
        assert got[c].tolist() == want[c].tolist(), c
    assert set(got[Col.FINGERPRINT]) == {META["fingerprint"]}
    read, _ = store.read_embeddings("toy")
    assert {c: set(read.column(c).to_pylist()) for c in (Col.ENCODER, Col.COHORT, Col.SLIDE_ID)} == {
        Col.ENCODER: {"toy"},
        Col.COHORT: {"c1"},
        Col.SLIDE_ID: {"S1"},
    }
    emb = np.stack(got[Col.EMBEDDING].to_numpy())
    ordered = tiles.take(pa.array(np.argsort(tiles.column(Col.TILE_ID).to_pylist())))
    np.testing.assert_array_equal(emb, embed(ordered))


def test_no_temporary_or_partial_file_is_visible(store):
    tiles = make_tiles("S1", 30)
    w = store.slide_writer(META, "c1", "S1")
    w.append(tiles.slice(0, 10), embed(tiles.slice(0, 10)))
    # Staged batches live outside embeddings/: readers see nothing yet.
    assert not [p for p in store.root.joinpath("embeddings").rglob("*") if p.is_file()]
    assert store.slide_status("toy", "c1", "S1") == "partial"
    assert store.sql("SELECT count(*) AS n FROM embeddings")["n"].iloc[0] == 0
    w.append(tiles.slice(10), embed(tiles.slice(10)))
    w.commit()
    files = [p.name for p in store.root.rglob("*") if p.is_file() and "_locks" not in p.parts]
    assert files == ["tiles.parquet"]
    assert not (store.root / "_staging/encoder=toy/cohort=c1/slide_id=S1").exists()
    assert store.slide_status("toy", "c1", "S1") == "complete"


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import META, embed, make_tiles
    from embedstore.store import open_store
    store = open_store({root!r}, read_only=False)
    tiles = make_tiles("S1", 50, seed=3)
    with store.lock_slide("toy", "c1", "S1") as ok:
        w = store.slide_writer(META, "c1", "S1")
        for i in range(0, 50, 10):
            if i == 30:
                os.kill(os.getpid(), 9)   # die mid-slide, holding the lock
            part = tiles.slice(i, 10)
            w.append(part, embed(part))
    """
)


def test_killed_writer_resumes_to_uninterrupted_result(tmp_path):
    crashed = open_store(tmp_path / "crashed", read_only=False)
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), root=str(crashed.root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert crashed.slide_status("toy", "c1", "S1") == "partial"
    assert crashed.sql("SELECT count(*) AS n FROM embeddings")["n"].iloc[0] == 0
    # The lock died with the process: a resume gets it at once.
    tiles = make_tiles("S1", 50, seed=3)
    with crashed.lock_slide("toy", "c1", "S1", blocking=False) as ok:
        assert ok
        w = crashed.slide_writer(META, "c1", "S1")
        done = w.done_tile_ids()
        assert len(done) == 30
        todo = tiles.filter(pa.array([t not in done for t in tiles.column(Col.TILE_ID).to_pylist()]))
        for i in range(0, todo.num_rows, 7):  # other batch size than the crashed run
            w.append(todo.slice(i, 7), embed(todo.slice(i, 7)))
        w.commit()
    clean = open_store(tmp_path / "clean", read_only=False)
    w = clean.slide_writer(META, "c1", "S1")
    w.append(tiles, embed(tiles))
    w.commit()
    a = pq.read_table(crashed.root / "embeddings/encoder=toy/cohort=c1/slide_id=S1/tiles.parquet")
    b = pq.read_table(clean.root / "embeddings/encoder=toy/cohort=c1/slide_id=S1/tiles.parquet")
    assert a.equals(b, check_metadata=True)


def test_crash_between_publish_and_cleanup_is_complete(store):
    write_slide(store, "S1", 20)
    staging = store.root / "_staging/encoder=toy/cohort=c1/slide_id=S1"
    staging.mkdir(parents=True)
    (staging / ".tiles.parquet.tmp-1").write_bytes(b"junk")
    assert store.slide_status("toy", "c1", "S1") == "complete"
    store.slide_writer(META, "c1", "S1")
    assert not staging.exists()
    assert store.sql("SELECT count(*) AS n FROM embeddings")["n"].iloc[0] == 20


def test_lock_is_exclusive_across_threads(store):
    events = []
    with store.lock_slide("toy", "c1", "S1", blocking=False) as first:
        assert first
        with store.lock_slide("toy", "c1", "S1", blocking=False) as second:
            assert not second

        def waiter():
            with store.lock_slide("toy", "c1", "S1", blocking=True) as got:
                events.append(("got", got))

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.2)
        assert events == []  # still blocked
    t.join(timeout=10)
    assert events == [("got", True)]
    with store.lock_slide("toy", "c1", "S2", blocking=False) as other:
        assert other  # locks are per slide


def test_sigkill_releases_lock(store):
    code = textwrap.dedent(
        f"""
        import sys, time
        from embedstore.store import open_store
        s = open_store({str(store.root)!r}, read_only=False)
        with s.lock_slide("toy", "c1", "S1", blocking=False) as ok:
            print("locked" if ok else "busy", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with store.lock_slide("toy", "c1", "S1", blocking=False) as ok:
            assert not ok
        lock = store.root / "_locks/encoder=toy/cohort=c1/slide_id=S1.lock"
        assert f"pid={proc.pid}" in lock.read_text()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with store.lock_slide("toy", "c1", "S1", blocking=False) as ok:
        assert ok


def test_read_embeddings_equals_written(store):
    t1 = write_slide(store, "S1", 33)
    t2 = write_slide(store, "S2", 20, cohort="c2")
    meta, X = store.read_embeddings("toy")
    assert X.dtype == np.float32
    assert X.shape == (53, DIM)
    assert meta.num_rows == 53
    want = dict(zip(t1.column(Col.TILE_ID).to_pylist(), embed(t1), strict=True))
    for i, (c, t) in enumerate(
        zip(meta.column(Col.COHORT).to_pylist(), meta.column(Col.TILE_ID).to_pylist(), strict=True)
    ):
        if c == "c1":
            np.testing.assert_array_equal(X[i], want[t])
    only, X2 = store.read_embeddings("toy", slide_ids=["S2"], columns=[Col.TILE_ID])
    assert only.column_names == [Col.TILE_ID]
    assert X2.shape == (20, DIM)
    assert sorted(only.column(0).to_pylist()) == sorted(t2.column(Col.TILE_ID).to_pylist())
    assert store.encoder_metadata("toy") == {**META, "geometry": {"mpp": 0.5, "size_px": 224, "resample": "bilinear"}}


def test_fast_vector_read_matches_pyarrow_and_falls_back(store, tmp_path):
    write_slide(store, "S1", 40)
    path = store.root / "embeddings/encoder=toy/cohort=c1/slide_id=S1/tiles.parquet"
    md = pq.read_metadata(path)
    out = np.empty((40, DIM), np.float32)
    read_vectors_into(path, md, Col.EMBEDDING, out)
    np.testing.assert_array_equal(out, vectors_from_arrow(pq.read_table(path).column(Col.EMBEDDING), DIM))
    # A file written with pyarrow defaults (dictionary, snappy, v1 pages) takes the generic path.
    other = tmp_path / "default.parquet"
    pq.write_table(pq.read_table(path), other)
    with pytest.raises(NotPlain):
        read_vectors_into(other, pq.read_metadata(other), Col.EMBEDDING, np.empty((40, DIM), np.float32))


def test_read_embeddings_rejects_mixed_fingerprints(store):
    write_slide(store, "S1", 10)
    write_slide(store, "S2", 10, meta={**META, "fingerprint": "0" * 16})
    with pytest.raises(
        FingerprintMismatch,
        match=r"slide_id=S2/tiles\.parquet: embeddings have encoder fingerprint 0{16}, but f{16} is required",
    ):
        store.read_embeddings("toy")
    with pytest.raises(FingerprintMismatch, match=r"0{16}"):
        store.slide_writer(META, "c1", "S2")


def test_sql_cosine_topk_matches_numpy(store):
    write_slide(store, "S1", 60)
    meta, X = store.read_embeddings("toy")
    q = X[5]
    df = store.sql(
        f"SELECT tile_id, cosine(embedding, $q::FLOAT[{DIM}]) AS sim FROM embeddings ORDER BY sim DESC LIMIT 5",
        {"q": q.tolist()},
    )
    sims = X @ q / (np.linalg.norm(X, axis=1) * np.linalg.norm(q))
    top = np.argsort(-sims)[:5]
    assert df[Col.TILE_ID].tolist() == [meta.column(Col.TILE_ID)[i].as_py() for i in top]
    np.testing.assert_allclose(df["sim"].to_numpy(), sims[top], rtol=1e-5)


def test_views_with_two_encoders_of_different_dims(store):
    write_slide(store, "S1", 10)
    tiles = make_tiles("S1", 10, seed=11)
    w = store.slide_writer({"name": "big:enc", "fingerprint": "b" * 16}, "c1", "S1")
    w.append(tiles, np.ones((10, 4), np.float32))
    w.commit()
    types = store.sql("SELECT typeof(embedding) AS t FROM embeddings_big_enc LIMIT 1")["t"].tolist()
    assert types == ["FLOAT[4]"]
    # Two encoders' rows and vectors never meet in one view: `embeddings` names the per-encoder views.
    with pytest.raises(BadInput, match=r"2 encoders, so there is no `embeddings` view.*embeddings_big_enc \(4-d\)"):
        store.sql("SELECT typeof(embedding) AS t FROM embeddings LIMIT 1")
    n = store.sql("SELECT encoder, n_tiles FROM slides ORDER BY encoder", output="arrow")
    assert n.to_pydict() == {"encoder": ["big:enc", "toy"], "n_tiles": [10, 10]}


def test_sql_is_read_only_by_default(store):
    write_slide(store, "S1", 5)
    ro = open_store(store.root)
    with pytest.raises(BadInput, match="read-only mode; the store is open read-only"):
        ro.sql("CREATE TABLE t AS SELECT 1")
    with pytest.raises(BadInput, match=r"Permission Error: .*opens no file"):
        ro.sql(f"COPY (SELECT 1) TO '{store.root / 'x.csv'}'")
    assert not (store.root / "x.csv").exists()
    with pytest.raises(BadInput, match="opened read-only, cannot write embeddings"):
        ro.slide_writer(META, "c1", "S9")
    assert store.sql("CREATE TABLE t AS SELECT 1 AS a; SELECT a FROM t")["a"].tolist() == [1]
    assert ro.sql("SELECT 1 AS a", output="numpy")["a"].tolist() == [1]


def test_expression_round_trip_and_join(store):
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(50)]
    mats = {}
    for slide, n in (("A", 30), ("B", 20)):
        m = sp.random(n, 50, density=0.2, format="csr", random_state=rng, data_rvs=lambda k: rng.integers(1, 9, k))
        mats[slide] = m
        store.write_spots(
            "c1", slide, [f"{slide}{i}" for i in range(n)], rng.random((n, 2)) * 1000, m, genes, patient="P1"
        )
    obs, got_genes, X = store.read_expression()
    assert got_genes == genes
    assert obs.column(Col.SPOT_ID).to_pylist()[:2] == ["A0", "A1"]
    want = sp.vstack([mats["A"], mats["B"]]).tocsr()
    assert X.dtype == np.float32
    assert abs(X - want).max() == 0
    np.testing.assert_allclose(obs.column(Col.TOTAL_COUNTS).to_numpy(), np.asarray(want.sum(axis=1)).ravel())
    _, sub_genes, Xs = store.read_expression(slide_ids=["B"], genes=["G3", "G1"])
    assert sub_genes == ["G3", "G1"]
    assert abs(Xs - mats["B"][:, [3, 1]]).max() == 0
    with pytest.raises(BadInput, match="genes NOPE: not measured in the selected slides"):
        store.read_expression(genes=["NOPE"])
    # SQL join of tiles with the expression of one gene.
    tiles = make_tiles("A", 5).set_column(2, Col.SPOT_ID, pa.array([f"A{i}" for i in range(5)]))
    w = store.slide_writer(META, "c1", "A")
    w.append(tiles, embed(tiles))
    w.commit()
    df = store.sql(
        "SELECT e.spot_id, coalesce(x.count, 0) AS n FROM embeddings e "
        "LEFT JOIN expression x ON x.cohort = e.cohort AND x.slide_id = e.slide_id AND x.spot_id = e.spot_id AND x.gene = 'G7' "
        "ORDER BY e.spot_id"
    )
    col = mats["A"][:5, 7].toarray().ravel()
    assert df["n"].tolist() == [int(col[int(s[1:])]) for s in df["spot_id"]]


def test_bad_input_messages(store, tmp_path):
    with pytest.raises(BadInput, match="'a/b': not a valid slide id for the store"):
        store.slide_writer(META, "c1", "a/b")
    w = store.slide_writer(META, "c1", "S1")
    tiles = make_tiles("S1", 4)
    with pytest.raises(BadInput, match=r"embeddings have shape \(3, 16\), expected \(4, dim\)"):
        w.append(tiles, np.zeros((3, DIM), np.float32))
    with pytest.raises(BadInput, match="embeddings contain NaN or inf"):
        w.append(tiles, np.full((4, DIM), np.nan, np.float32))
    with pytest.raises(BadInput, match="encoder nope: no embeddings in"):
        store.read_embeddings("nope")
    with pytest.raises(BadInput, match="no store folder here"):
        open_store(tmp_path / "missing")


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write to: mode 0500, or, for root (whom modes do not stop), a read-only tmpfs."""
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    if os.geteuid() != 0:
        ro_dir.chmod(0o500)
        yield ro_dir
        ro_dir.chmod(0o700)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro_dir)], capture_output=True, check=False
    )
    assert mounted.returncode == 0, mounted.stderr
    yield ro_dir
    subprocess.run(["umount", "-l", str(ro_dir)], check=False)


def test_a_read_only_store_folder_is_one_line(read_only_dir):
    with pytest.raises(BadInput, match=f"{read_only_dir}: not writable"):
        open_store(read_only_dir, read_only=False).check_writable()
    result = subprocess.run(
        [sys.executable, "-m", "embedstore", "sql", str(read_only_dir), "SELECT 1", "--write"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"{read_only_dir}: not writable" in result.stderr


def test_iter_embeddings_chunks_equal_the_bulk_read(store, monkeypatch):
    import embedstore.store._writer as store_module

    monkeypatch.setattr(store_module, "row_group_rows", lambda dim: 8)  # several row groups per slide
    write_slide(store, "S1", 33)
    write_slide(store, "S2", 12)
    meta, X = store.read_embeddings("toy")
    chunks = list(store.iter_embeddings("toy"))
    assert [len(c[1]) for c in chunks] == [8, 8, 8, 8, 1, 8, 4]
    assert all(len(set(m.column(Col.SLIDE_ID).to_pylist())) == 1 for m, _ in chunks)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), X)
    assert pa.concat_tables([c[0] for c in chunks]).equals(meta)


def _pages(path: Path, md: pq.FileMetaData, rg: int) -> int:
    """Data pages in the embedding column chunk of row group ``rg``, counted from the page headers."""
    leaf = next(i for i in range(md.num_columns) if md.schema.column(i).path.startswith(Col.EMBEDDING))
    cc = md.row_group(rg).column(leaf)
    off, end, n = cc.data_page_offset, cc.data_page_offset + cc.total_compressed_size, 0
    with path.open("rb") as f:
        while off < end:
            header, size = _page_header(f.fileno(), off)
            off += size + header[3]
            n += 1
    return n


def test_fast_read_over_many_pages_and_row_groups_equals_pyarrow(store, monkeypatch):
    import embedstore.store._files as files_module
    import embedstore.store._store as store_module
    import embedstore.store._writer as writer_module

    monkeypatch.setattr(writer_module, "row_group_rows", lambda dim: 160)
    monkeypatch.setattr(files_module, "DATA_PAGE_SIZE", 512)
    for slide, n, cohort in (("S1", 450, "c1"), ("S2", 333, "c2"), ("S3", 90, "c1")):
        write_slide(store, slide, n, cohort=cohort, batch=64)
    paths = {p.parent.name.split("=")[1]: p for p in store.root.glob("embeddings/*/*/*/tiles.parquet")}
    md = pq.read_metadata(paths["S1"])
    assert md.num_row_groups == 3
    assert all(_pages(paths["S1"], md, rg) >= 3 for rg in range(3))

    def boom(*args):
        msg = "read_embeddings left the fast path"
        raise AssertionError(msg)

    monkeypatch.setattr(store_module, "vectors_from_arrow", boom)
    for slide_ids, cohort in ((None, None), (["S2", "S1"], None), (["S3"], None), (None, "c1")):
        meta, X = store.read_embeddings("toy", cohort=cohort, slide_ids=slide_ids)
        # Without slide ids, files come in path order: cohort, then slide.
        by_path = sorted(paths, key=lambda s: paths[s])
        order = slide_ids or [s for s in by_path if cohort in (None, paths[s].parent.parent.name.split("=")[1])]
        generic = [pq.read_table(paths[s], columns=[Col.TILE_ID, Col.EMBEDDING]) for s in order]
        want = np.concatenate(
            [t.column(Col.EMBEDDING).combine_chunks().flatten().to_numpy().reshape(-1, DIM) for t in generic]
        )
        np.testing.assert_array_equal(X, want)
        assert meta.column(Col.SLIDE_ID).to_pylist() == [
            s for s, t in zip(order, generic, strict=True) for _ in range(t.num_rows)
        ]
        assert meta.column(Col.TILE_ID).to_pylist() == [i for t in generic for i in t.column(0).to_pylist()]


def test_footer_checks_are_remembered_per_file_version_only(store, monkeypatch):
    from embedstore.errors import DamagedFile
    from embedstore.store import _integrity

    write_slide(store, "S1", 40)
    path = store.root / "embeddings/encoder=toy/cohort=c1/slide_id=S1/tiles.parquet"
    old = time.time() - 60
    os.utime(path, (old, old))  # written a minute ago: settled
    calls = []
    real = _integrity.inspect_footer
    monkeypatch.setattr(_integrity, "inspect_footer", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(3):
        _integrity.inspect_slide_file(path, "fix")
    assert len(calls) == 1
    data = bytearray(path.read_bytes())
    data[-12:-8] = b"\xff\xff\xff\xff"  # footer length: same size, another file
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFile):
        _integrity.inspect_slide_file(path, "fix")
    fresh = store.root / "embeddings/encoder=toy/cohort=c1/slide_id=S2/tiles.parquet"
    write_slide(store, "S2", 20)  # just written: checked every time until it settles
    _integrity.inspect_slide_file(fresh, "fix")
    _integrity.inspect_slide_file(fresh, "fix")
    assert len(calls) == 4
