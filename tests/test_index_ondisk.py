"""Indexes larger than memory: IVF lists built shard by shard and merged on disk, against in-memory builds and NumPy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import faiss
import numpy as np
import pytest
from test_tile_index import brute_force, hits_of, tree_digest, vectors, write

import embedstore._ondisk as ondisk
import embedstore.store._tile_search as search
import embedstore.tile_index as ti
from embedstore._knn import _trained
from embedstore._vectors import l2_normalize
from embedstore.errors import BadInput
from embedstore.store import open_store
from embedstore.store._tile_search import read_ondisk_index

SLIDES = [(f"c{i % 2}", f"S{i}", 700 + 50 * i) for i in range(6)]
FACTORY = "IVF32,SQ8"


@pytest.fixture
def big_store(tmp_path, monkeypatch):
    st = open_store(tmp_path / "store", read_only=False)
    for i, (cohort, slide, n) in enumerate(SLIDES):
        write(st, cohort, slide, n, seed=i)
    monkeypatch.setattr(search, "EXACT_BELOW", 0)  # search through the index, however few tiles
    return st


def recall(found: list[list[tuple]], truth: list[list[tuple]]) -> float:
    return float(
        np.mean([len({a for a, _ in f} & {b for b, _ in t}) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def test_shards_merged_on_disk_search_exactly_like_one_in_memory_index(tmp_path):
    x = l2_normalize(vectors(3000, seed=1))
    trained = tmp_path / "trained.faiss"
    faiss.write_index(_trained(faiss, x, FACTORY, "ip", "cpu", 0), str(trained))
    memory = faiss.read_index(str(trained))
    memory.add_with_ids(x, np.arange(len(x)))
    shards = []
    for i, (a, b) in enumerate([(0, 1000), (1000, 2200), (2200, 3000)]):
        shards.append(tmp_path / f"shard{i}.faiss")
        ondisk.fill_shard(trained, [(np.arange(a, b), x[a:b])], shards[-1])
    built = tmp_path / "built"
    built.mkdir()
    merged = ondisk._merge(trained, shards, built / ondisk.IVFDATA_FILE)
    faiss.write_index(merged, str(built / "index.faiss"))
    del merged
    built.rename(tmp_path / "moved")  # the lists are found beside the index wherever the folder goes
    moved = tmp_path / "moved"
    mapped = read_ondisk_index(moved / "index.faiss", moved / ondisk.IVFDATA_FILE)
    q = l2_normalize(vectors(100, seed=2))
    for index in (memory, mapped):
        faiss.extract_index_ivf(index).nprobe = 6
    d_mem, i_mem = memory.search(q, 10)
    d_disk, i_disk = mapped.search(q, 10)
    np.testing.assert_array_equal(i_disk, i_mem)
    np.testing.assert_array_equal(d_disk, d_mem)


def test_exact_top_k_of_shards_equals_numpy_brute_force():
    x = l2_normalize(vectors(900, seed=3))
    ids = np.arange(900) + 50
    held = ondisk.HeldOut(x[[3, 400, 899]], ids[[3, 400, 899]], 5)
    parts = [ondisk.exact_top_k(held, [(ids[a : a + 300], x[a : a + 300])]) for a in (0, 300, 600)]
    found = ondisk.merge_top_k(parts, 5)
    sims = held.queries @ x.T
    sims[np.arange(3), [3, 400, 899]] = -np.inf  # a query's own vector never counts
    truth = ids[np.argsort(-sims, axis=1)[:, :5]]
    assert [set(f) for f in found] == [set(t) for t in truth]


def test_exact_top_k_holds_its_answers_not_a_matrix_of_similarities():
    # the neighbours that tune an on-disk build were found through (queries x block) similarity and id
    # matrices, ~420 MB a shard at 1,000 queries: most of the build's peak memory
    x = l2_normalize(vectors(20_000, seed=4))
    ids = np.arange(20_000) + 7
    held = ondisk.HeldOut(x[:200].copy(), ids[:200], 10)
    tracemalloc.start()
    try:
        _, found = ondisk.exact_top_k(held, [(ids, x)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 20_000 * 4 // 4  # a quarter of one (queries x batch) float32 matrix
    sims = held.queries @ x.T
    sims[np.arange(200), np.arange(200)] = -np.inf
    assert [set(f) for f in found] == [set(t) for t in ids[np.argsort(-sims, axis=1)[:, :10]]]


def test_ondisk_tile_index_recall_matches_the_in_memory_one(big_store, tmp_path):
    q = vectors(200, seed=7)
    truth = brute_force(big_store, q, 10)
    ti.build_tile_index(big_store, factory=FACTORY, layout="memory")
    in_memory = recall(hits_of(ti.nearest_tiles(big_store.root, q, 10), len(q)), truth)
    report = ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000)
    assert report.rebuilt
    assert "inverted lists on disk" in report.summary()
    folder = ti.index_folder(big_store.root, "toy")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["layout"]["invlists"] == "ondisk"
    assert manifest["layout"]["n_shards"] > 1  # the budget splits the tiles into several shards
    assert sorted(manifest["files"]) == ["index.faiss", "index.ivfdata", "tiles.parquet"]
    assert manifest["files"]["index.ivfdata"] == (folder / "index.ivfdata").stat().st_size
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.faiss",
        "index.ivfdata",
        "manifest.json",
        "tiles.parquet",
    ]
    on_disk = recall(hits_of(ti.nearest_tiles(big_store.root, q, 10), len(q)), truth)
    assert on_disk >= in_memory - 0.01
    assert on_disk >= 0.9
    # the store moved: the index still finds its lists beside it
    moved = tmp_path / "elsewhere"
    shutil.move(big_store.root, moved)
    assert hits_of(ti.nearest_tiles(moved, q, 10), len(q)) == hits_of(ti.nearest_tiles(moved, q, 10), len(q))
    assert recall(hits_of(ti.nearest_tiles(moved, q, 10), len(q)), truth) == on_disk


def test_shards_follow_the_budget_whatever_reuses_the_memory_of_freed_indexes(big_store, monkeypatch):
    # the IVF shape that sizes the shards was read from a view into an index already freed: new
    # faiss objects of the same class take its memory, and their code size sized the shards
    sample = ti._sample

    def sample_then_allocate(*args, **kwargs):
        out = sample(*args, **kwargs)
        others = [faiss.index_factory(64, "IVF8,SQfp16", faiss.METRIC_INNER_PRODUCT) for _ in range(200)]
        del others
        return out

    monkeypatch.setattr(ti, "_sample", sample_then_allocate)
    report = ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000)
    per_shard = ondisk.shard_rows(300_000, 16)  # IVF32,SQ8 at 16-d: 16 bytes a code
    shards, rows = 1, 0
    for _, _, n in SLIDES:
        if rows and rows + n > per_shard:
            shards, rows = shards + 1, 0
        rows += n
    assert report.search["layout"]["n_shards"] == shards
    assert ondisk.ivf_shape(FACTORY, 16) == (32, 16)


def test_auto_layout_goes_on_disk_past_the_budget(big_store):
    report = ti.build_tile_index(big_store, memory_budget="200kB")
    assert report.search["layout"]["invlists"] == "ondisk"
    assert report.search["factory"].startswith("IVF")
    # the budget grows: the same tiles call for lists in memory, a rebuild says why
    again = ti.build_tile_index(big_store, memory_budget="1GB")
    assert again.rebuilt
    manifest = json.loads((ti.index_folder(big_store.root, "toy") / "manifest.json").read_text())
    assert manifest["layout"] == {"invlists": "memory"}


def test_update_of_an_ondisk_index_adds_and_removes_slides(big_store):
    ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000)
    folder = ti.index_folder(big_store.root, "toy")
    write(big_store, "c1", "NEW", 300, seed=20)
    shutil.rmtree(big_store.root / "embeddings/encoder=toy/cohort=c0/slide_id=S0")
    report = ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000)
    assert not report.rebuilt
    assert (report.added, report.removed) == (["NEW"], ["S0"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["layout"]["invlists"] == "ondisk"
    assert manifest["n_tiles"] == sum(n for _, s, n in SLIDES if s != "S0") + 300
    meta, x = big_store.read_embeddings("toy", slide_ids=["NEW"], columns=["tile_id"])
    hits = ti.nearest_tiles(big_store.root, x[:30], 1).to_pylist()
    assert [(h["slide_id"], h["tile_id"]) for h in hits] == [
        ("NEW", t) for t in meta.column("tile_id").to_pylist()[:30]
    ]
    q = vectors(200, seed=7)
    found = ti.nearest_tiles(big_store.root, q, 10)
    assert "S0" not in found.column("slide_id").to_pylist()
    assert recall(hits_of(found, len(q)), brute_force(big_store, q, 10)) >= 0.9


def test_a_failed_ondisk_build_leaves_the_previous_index(big_store, monkeypatch):
    ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000)
    folder = ti.index_folder(big_store.root, "toy")
    before = tree_digest(folder)
    q = vectors(20, seed=7)
    hits = ti.nearest_tiles(big_store.root, q, 10)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ondisk, "_merge", full_disk)
    with pytest.raises(Exception, match="space"):
        ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000, rebuild=True)
    assert tree_digest(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["encoder=toy"]
    assert ti.nearest_tiles(big_store.root, q, 10) == hits


def test_a_build_killed_while_merging_leaves_the_previous_index(big_store):
    ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000)
    folder = ti.index_folder(big_store.root, "toy")
    before = tree_digest(folder)
    code = textwrap.dedent(f"""
        import os, signal
        import embedstore._ondisk as ondisk
        import embedstore.tile_index as ti
        merge = ondisk._merge
        def killed(trained, shards, ivfdata):
            merge(trained, shards, ivfdata)  # the new lists are on disk, the folder not yet published
            os.kill(os.getpid(), signal.SIGKILL)
        ondisk._merge = killed
        ti.build_tile_index({str(big_store.root)!r}, factory={FACTORY!r}, layout="ondisk", memory_budget=300_000,
                            rebuild=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == -9, done.stderr
    assert tree_digest(folder) == before
    assert any(p.name.startswith(".encoder=toy.tmp-") for p in folder.parent.iterdir())  # left by the killed run
    q = vectors(20, seed=7)
    assert recall(hits_of(ti.nearest_tiles(big_store.root, q, 10), len(q)), brute_force(big_store, q, 10)) >= 0.9
    ti.build_tile_index(big_store, factory=FACTORY, layout="ondisk", memory_budget=300_000, rebuild=True)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["encoder=toy"]  # the next run clears it


def test_exemplar_index_on_disk_saves_moves_loads_and_predicts_the_same(tmp_path):
    from embedstore.expression import Panel
    from embedstore.index import build_exemplar_index
    from embedstore.index_folder import load_index, save_index
    from embedstore.testing import seeded_embeddings

    img, expr, slides = seeded_embeddings(n=2000)
    panel = Panel(tuple(f"g{i}" for i in range(expr.shape[1])), "hvg", {"n": expr.shape[1]})
    ids = {"slide_ids": slides, "spot_ids": [f"s{i}" for i in range(len(img))]}
    common = {"keys": "image", "factory": "IVF16,SQ8", "k": 8, "scratch_dir": tmp_path}
    idx = build_exemplar_index(img, expr, panel, **ids, **common, layout="ondisk", memory_budget=100_000)
    memory = build_exemplar_index(img, expr, panel, **ids, **common, layout="memory")
    assert idx.manifest["search"]["layout"]["invlists"] == "ondisk"
    truth = np.argsort(-(idx.key_vectors[:50] @ idx.key_vectors.T), axis=1)[:, :8]
    for built in (idx, memory):
        faiss.extract_index_ivf(built.index).nprobe = 16  # every list: both exact up to the codes
    found = [b.retrieve(img[:50], 8)[2] for b in (idx, memory)]
    hits = [np.mean([len(set(f) & set(t)) / 8 for f, t in zip(ids_, truth, strict=True)]) for ids_ in found]
    assert hits[0] >= hits[1] - 0.01
    expected = idx.predict(img[:100], 8)
    path = save_index(idx, tmp_path / "ix")
    assert sorted(p.name for p in path.iterdir()) == [
        "exemplars.parquet", "index.faiss", "index.ivfdata", "manifest.json", "panel.json",
    ]  # fmt: skip
    files = json.loads((path / "manifest.json").read_text())["search"]["layout"]["files"]
    assert files["index.ivfdata"] == (path / "index.ivfdata").stat().st_size
    del idx  # its scratch lists go with it; the saved folder holds its own
    path.rename(tmp_path / "renamed")
    again = load_index(tmp_path / "renamed", nprobe=16)
    np.testing.assert_array_equal(again.predict(img[:100], 8), expected)
    # A new file renamed over the lists: `again` still maps the old one (truncating a mapped
    # file in place made a later access die of SIGBUS in CI).
    (tmp_path / "short").write_bytes(b"short")
    (tmp_path / "short").replace(tmp_path / "renamed/index.ivfdata")
    with pytest.raises(BadInput, match=r"index\.ivfdata: missing or not the .* bytes its manifest records"):
        load_index(tmp_path / "renamed")


def test_budget_and_layout_errors_are_one_line(big_store):
    assert ondisk.parse_memory_budget("512MB") == 512 * 10**6
    assert ondisk.parse_memory_budget("2GiB") == 2 * 2**30
    assert ondisk.parse_memory_budget(None) > 0
    with pytest.raises(BadInput, match=r"memory_budget='lots': not a memory size; give bytes or text such as '512MB'"):
        ondisk.parse_memory_budget("lots")
    with pytest.raises(BadInput, match=r"layout='disk': unknown; use 'auto', 'memory' or 'ondisk'"):
        ti.build_tile_index(big_store, layout="disk")
    with pytest.raises(BadInput, match=r"factory 'Flat': keeps every vector in memory; use an IVF factory"):
        ti.build_tile_index(big_store, factory="Flat", layout="ondisk")
    assert not ti.index_folder(big_store.root, "toy").exists()
