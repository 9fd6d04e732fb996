"""Tile index of a store and nearest-tile search in Python and SQL, against a NumPy brute force."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_store import META, make_tiles

import embedstore.store._tile_search as search
import embedstore.tile_index as ti
from embedstore._schema import Col
from embedstore._vectors import l2_normalize
from embedstore.errors import BadInput, DamagedFile, FingerprintMismatch
from embedstore.store import open_store
from embedstore.store._files import file_lock

DIM = 16
CENTRES = np.random.default_rng(42).standard_normal((12, DIM)).astype(np.float32)
SLIDES = [("c1", "A", 60), ("c1", "B", 50), ("c2", "C", 40), ("c2", "D", 45)]


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (CENTRES[rng.integers(0, len(CENTRES), n)] + 0.4 * rng.standard_normal((n, DIM))).astype(np.float32)


def write(store, cohort: str, slide: str, n: int, seed: int, meta: dict = META) -> None:
    w = store.slide_writer(meta, cohort, slide)
    w.append(make_tiles(slide, n, seed=seed), vectors(n, seed))
    w.commit()


@pytest.fixture
def store(tmp_path):
    st = open_store(tmp_path / "store", read_only=False)
    for i, (cohort, slide, n) in enumerate(SLIDES):
        write(st, cohort, slide, n, seed=i)
    return st


def brute_force(store, queries: np.ndarray, k: int, keep=lambda cohort, slide: True) -> list[list[tuple]]:
    """Per query, the (cohort, slide_id, tile_id) of the k best tiles and their scores, by NumPy."""
    meta, x = store.read_embeddings(META["name"], columns=[Col.COHORT, Col.SLIDE_ID, Col.TILE_ID])
    rows = meta.to_pylist()
    ok = np.array([keep(r[Col.COHORT], r[Col.SLIDE_ID]) for r in rows])
    sims = l2_normalize(queries) @ l2_normalize(x).T
    sims[:, ~ok] = -np.inf
    out = []
    for s in sims:
        top = np.argsort(-s, kind="stable")[: min(k, int(ok.sum()))]
        out.append([((rows[j][Col.COHORT], rows[j][Col.SLIDE_ID], rows[j][Col.TILE_ID]), float(s[j])) for j in top])
    return out


def hits_of(table: pa.Table, n_queries: int) -> list[list[tuple]]:
    out: list[list[tuple]] = [[] for _ in range(n_queries)]
    for r in table.to_pylist():
        out[r["query"]].append(((r[Col.COHORT], r[Col.SLIDE_ID], r[Col.TILE_ID]), r["score"]))
    return out


def assert_same(found: list[list[tuple]], truth: list[list[tuple]]) -> None:
    assert [len(f) for f in found] == [len(t) for t in truth]
    for f, t in zip(found, truth, strict=True):
        np.testing.assert_allclose([s for _, s in f], [s for _, s in t], rtol=0, atol=1e-5)
        # same tiles, up to the order of exact ties
        assert {key for key, _ in f} == {key for key, _ in t} or np.ptp([s for _, s in t]) < 1e-5


QUERIES = vectors(7, seed=99)


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize(
    ("filters", "keep"),
    [
        ({}, lambda c, s: True),
        ({"cohort": "c2"}, lambda c, s: c == "c2"),
        ({"slides": ["A", "D"]}, lambda c, s: s in ("A", "D")),
        ({"exclude_slides": ["A"]}, lambda c, s: s != "A"),
        ({"cohort": "c1", "exclude_slides": ["B"]}, lambda c, s: c == "c1" and s != "B"),
    ],
)
def test_search_equals_brute_force(store, indexed, filters, keep):
    if indexed:
        report = ti.build_tile_index(store)
        assert report.rebuilt
        assert report.n_tiles == sum(n for *_, n in SLIDES)
        assert report.search["exact"]
    table = ti.nearest_tiles(store.root, QUERIES, 8, **filters)
    assert table.schema == ti.hit_schema()
    assert_same(hits_of(table, len(QUERIES)), brute_force(store, QUERIES, 8, keep))
    assert table.column("rank").to_pylist()[:8] == list(range(1, 9))


def test_k_larger_than_the_selection_returns_every_selected_tile(store):
    table = ti.nearest_tiles(store.root, QUERIES[:2], 1000, slides=["C"])
    assert table.num_rows == 2 * 40
    assert set(table.column(Col.SLIDE_ID).to_pylist()) == {"C"}


def test_ivf_index_with_filters_reaches_the_recall_target(tmp_path, monkeypatch):
    st = open_store(tmp_path / "store", read_only=False)
    for i in range(6):
        write(st, f"c{i % 2}", f"S{i}", 1500, seed=i)
    monkeypatch.setattr(search, "EXACT_BELOW", 0)  # always through the index's selector, however few tiles
    report = ti.build_tile_index(st, factory="IVF32,SQ8", target_recall=0.95)
    assert not report.search.get("exact")
    assert report.search["recall"] >= 0.9
    q = vectors(200, seed=7)
    for filters, keep in [
        ({}, lambda c, s: True),
        ({"cohort": "c1"}, lambda c, s: c == "c1"),
        ({"slides": ["S2"]}, lambda c, s: s == "S2"),
    ]:
        found = hits_of(ti.nearest_tiles(st.root, q, 10, **filters), len(q))
        truth = brute_force(st, q, 10, keep)
        assert all(keep(*key[:2]) for hits in found for key, _ in hits)
        recall = np.mean(
            [len({a for a, _ in f} & {b for b, _ in t}) / len(t) for f, t in zip(found, truth, strict=True)]
        )
        assert recall >= 0.95, (filters, recall)


def test_update_adds_drops_and_re_adds_changed_slides_like_a_rebuild(store, tmp_path):
    ti.build_tile_index(store)
    write(store, "c2", "E", 30, seed=10)  # new
    shutil.rmtree(store.root / "embeddings/encoder=toy/cohort=c1/slide_id=B")  # removed
    write(store, "c2", "C", 40, seed=11)  # re-embedded: other vectors, same slide
    report = ti.build_tile_index(store)
    assert not report.rebuilt
    assert sorted(report.added) == ["C", "E"]
    assert sorted(report.removed) == ["B", "C"]
    manifest = json.loads((ti.index_folder(store.root, "toy") / "manifest.json").read_text())
    assert sorted(e["slide_id"] for e in manifest["slides"]) == ["A", "C", "D", "E"]
    n_c = next(e["n"] for e in manifest["slides"] if e["slide_id"] == "C")
    assert manifest["next_id"] == sum(n for *_, n in SLIDES) + n_c + 30  # ids are never reused
    updated = ti.nearest_tiles(store.root, QUERIES, 10)
    assert_same(hits_of(updated, len(QUERIES)), brute_force(store, QUERIES, 10))
    assert ti.build_tile_index(store).summary().startswith("tile index up to date")
    rebuilt = ti.build_tile_index(store, rebuild=True)
    assert rebuilt.rebuilt
    assert_same(hits_of(ti.nearest_tiles(store.root, QUERIES, 10), len(QUERIES)), hits_of(updated, len(QUERIES)))


def test_a_stale_index_covers_new_and_changed_slides_exactly_and_says_so(store, caplog):
    ti.build_tile_index(store)
    write(store, "c2", "E", 30, seed=10)
    write(store, "c1", "A", 60, seed=12)
    shutil.rmtree(store.root / "embeddings/encoder=toy/cohort=c2/slide_id=D")
    search._WARNED.clear()
    with caplog.at_level("INFO", logger="embedstore.progress"):
        table = ti.nearest_tiles(store.root, QUERIES, 10)
    assert_same(hits_of(table, len(QUERIES)), brute_force(store, QUERIES, 10))
    assert "D" not in table.column(Col.SLIDE_ID).to_pylist()
    lines = [r.getMessage() for r in caplog.records if "does not cover" in r.getMessage()]
    assert len(lines) == 1
    assert "2 slide(s)" in lines[0]
    assert "embedstore index tiles" in lines[0]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "_locks" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("indexed", [False, True])
def test_sql_functions_join_with_the_views_and_write_nothing(store, indexed):
    if indexed:
        ti.build_tile_index(store)
    before = tree_digest(store.root)
    ro = open_store(store.root)
    q = ro.sql("SELECT embedding FROM embeddings WHERE slide_id = 'C' ORDER BY tile_id LIMIT 1", output="numpy")
    vec = np.asarray(q[Col.EMBEDDING][0], dtype=np.float32)
    tile = ro.sql("SELECT tile_id FROM embeddings WHERE slide_id = 'C' ORDER BY tile_id LIMIT 1").tile_id[0]
    by_vector = ro.sql("SELECT * FROM nearest_tiles($v, k := 6)", params={"v": vec.tolist()})
    by_tile = ro.sql(f"SELECT * FROM similar_tiles('C', '{tile}', k := 6)")
    expected = ti.nearest_tiles(store.root, vec, 6).to_pandas()
    for df in (by_vector, by_tile):
        assert list(df.columns) == ["cohort", "slide_id", "tile_id", "spot_id", "x", "y", "score", "rank"]
        assert df.tile_id.tolist() == expected.tile_id.tolist()
        np.testing.assert_allclose(df.score, expected.score, atol=1e-6)
    assert by_tile.tile_id[0] == tile
    assert by_tile.score[0] == pytest.approx(1.0, abs=1e-5)
    joined = ro.sql(
        f"SELECT h.rank, h.slide_id, e.x, s.slides_tiles FROM similar_tiles('C', '{tile}', k := 5, exclude_slides := ['C']) h "
        "JOIN embeddings e USING (cohort, slide_id, tile_id) "
        "JOIN (SELECT slide_id, n_tiles AS slides_tiles FROM slides) s USING (slide_id) ORDER BY h.rank"
    )
    assert len(joined) == 5
    assert "C" not in set(joined.slide_id)
    assert (joined.x > 0).all()
    assert tree_digest(store.root) == before


def test_a_batch_of_queries_in_one_statement_equals_python(store):
    ti.build_tile_index(store)
    df = open_store(store.root).sql(
        "SELECT e.tile_id AS query_tile, h.* FROM embeddings e, "
        "LATERAL nearest_tiles(e.embedding, k := 4, cohort := 'c2') h WHERE e.slide_id = 'A' ORDER BY query_tile, h.rank"
    )
    meta, x = store.read_embeddings("toy", slide_ids=["A"], columns=[Col.TILE_ID])
    order = np.argsort(meta.column(Col.TILE_ID).to_numpy(zero_copy_only=False))
    expected = ti.nearest_tiles(store.root, x[order], 4, cohort="c2").to_pandas()
    assert len(df) == 60 * 4
    assert df.tile_id.tolist() == expected.tile_id.tolist()
    assert set(df.cohort) == {"c2"}


def test_sql_errors_are_one_line(store):
    ro = open_store(store.root)
    for query, words in [
        ("SELECT * FROM nearest_tiles([1.0, 2.0], k := 3)", "16-d"),
        ("SELECT * FROM similar_tiles('nope', 'x', k := 3)", "slide nope"),
        ("SELECT * FROM similar_tiles('A', 'x', k := 3)", "tile x"),
        ("SELECT * FROM nearest_tiles((SELECT embedding FROM embeddings LIMIT 1), k := 0)", "k=0"),
        ("SELECT * FROM nearest_tiles((SELECT embedding FROM embeddings LIMIT 1), k := NULL)", "k is NULL"),
        (
            "SELECT * FROM nearest_tiles((SELECT embedding FROM embeddings LIMIT 1), encoder := 'other')",
            "encoder other",
        ),
    ]:
        with pytest.raises(BadInput) as e:
            ro.sql(query)
        assert words in str(e.value)
        assert "\n" not in str(e.value)
        assert "Python exception" not in str(e.value)


def test_several_encoders_need_a_name(store):
    write(store, "c1", "A", 20, seed=3, meta={**META, "name": "toy2", "fingerprint": "e" * 16})
    ro = open_store(store.root)
    with pytest.raises(BadInput, match="2 encoders"):
        ro.sql("SELECT * FROM similar_tiles('A', (SELECT min(tile_id) FROM embeddings_toy2), k := 3)")
    df = ro.sql(
        "SELECT * FROM similar_tiles('A', (SELECT min(tile_id) FROM embeddings_toy2), k := 3, encoder := 'toy2')"
    )
    assert len(df) == 3
    assert df.score[0] == pytest.approx(1.0, abs=1e-5)


def test_a_damaged_index_is_one_line_naming_it_and_the_rebuild(store):
    ti.build_tile_index(store)
    path = ti.index_folder(store.root, "toy") / "index.faiss"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DamagedFile) as e:
        ti.nearest_tiles(store.root, QUERIES, 3)
    assert str(path) in str(e.value)
    assert "--rebuild" in str(e.value)
    with pytest.raises(BadInput, match=r"index\.faiss"):
        open_store(store.root).sql("SELECT * FROM nearest_tiles((SELECT embedding FROM embeddings LIMIT 1))")
    assert ti.build_tile_index(store, rebuild=True).n_tiles == sum(n for *_, n in SLIDES)
    assert ti.nearest_tiles(store.root, QUERIES, 3).num_rows == 3 * len(QUERIES)


def test_build_refuses_a_folder_it_did_not_write_and_a_second_builder(store):
    folder = ti.index_folder(store.root, "toy")
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not a tile index"):
        ti.build_tile_index(store)
    assert (folder / "notes.txt").read_text() == "mine"
    shutil.rmtree(folder)
    lock = store.root / "_locks" / "tile_indexes" / "encoder=toy.lock"
    with file_lock(lock, blocking=True), pytest.raises(BadInput, match="another run"):
        ti.build_tile_index(store)
    assert not folder.exists()


def test_a_failed_update_leaves_the_old_index_in_place(store, monkeypatch):
    ti.build_tile_index(store)
    folder = ti.index_folder(store.root, "toy")
    before = tree_digest(folder)
    write(store, "c2", "E", 30, seed=10)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ti.pq, "write_table", full_disk)
    with pytest.raises(Exception, match="space"):
        ti.build_tile_index(store)
    assert tree_digest(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["encoder=toy"]


@pytest.mark.parametrize("indexed", [False, True])
def test_a_slide_of_other_weights_under_the_same_name_is_one_line(store, indexed):
    if indexed:
        ti.build_tile_index(store)
    write(store, "c2", "Z", 20, seed=5, meta={**META, "fingerprint": "0" * 16})
    path = store.root / "embeddings/encoder=toy/cohort=c2/slide_id=Z/tiles.parquet"
    with pytest.raises(FingerprintMismatch) as e:
        ti.nearest_tiles(store.root, QUERIES, 3)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)
    assert ti.nearest_tiles(store.root, QUERIES, 3, exclude_slides=["Z"]).num_rows == 3 * len(QUERIES)


def test_check_says_when_the_tile_index_is_behind_or_damaged(store):
    from embedstore.store import verify_store

    ti.build_tile_index(store)
    assert not [n for n in verify_store(store).notes if "tile index" in n]
    write(store, "c2", "E", 30, seed=10)
    (note,) = [n for n in verify_store(store).notes if "tile index" in n]
    assert "1 slide(s) embedded or changed" in note
    assert "embedstore index tiles" in note
    ti.build_tile_index(store)
    path = ti.index_folder(store.root, "toy") / "index.faiss"
    path.write_bytes(path.read_bytes()[:-10])
    (note,) = [n for n in verify_store(store).notes if "index.faiss" in n]
    assert "--rebuild" in note
    assert not verify_store(store).problems  # the index is derived: rebuilt, never a store problem
