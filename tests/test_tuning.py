"""Build-time tuning of FAISS indexes: codec and nprobe chosen for a target recall, checked by NumPy brute force."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from embedstore._knn import build, build_tuned, nprobe_ladder, search, tune_search
from embedstore._vectors import l2_normalize
from embedstore.build import build_index
from embedstore.errors import BadInput
from embedstore.expression import Panel
from embedstore.index import build_exemplar_index
from embedstore.index_folder import load_index, save_index
from embedstore.recipes import AggregatorSpec, IndexSpec, PanelSpec, Recipe, parse_recipe


def clustered(n, d=32, seed=0):
    """20 Gaussian clusters spread along a 12-d subspace: IVF works on it, as on real embeddings."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((12, d))
    centres = np.random.default_rng(98).standard_normal((20, d)) * 3
    return l2_normalize(
        centres[rng.integers(0, 20, n)] + rng.standard_normal((n, 12)) @ basis + 0.1 * rng.standard_normal((n, d))
    )


def brute_ids(xb, xq, k, own=None):
    """Exact top-k rows of ``xb`` by NumPy matmul; ``own[i]`` (the query's own row) left out."""
    s = xq @ xb.T
    if own is not None:
        s[np.arange(len(xq)), own] = -np.inf
    top = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)


def recall(found, truth):
    return np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)])


@pytest.fixture(scope="module")
def data():
    """150,000 x 32 clustered vectors: above the exact-search size, so the automatic factory is IVF."""
    return clustered(150_000)


def test_nprobe_ladder():
    assert nprobe_ladder(256) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert nprobe_ladder(4096)[-3:] == [2048, 3072, 4096]
    assert nprobe_ladder(1) == [1]


def test_build_tuned_reaches_the_target_on_queries_it_never_saw(data):
    index, settings = build_tuned(data, "IVF256,SQ8", k=10, target_recall=0.95)
    assert settings["factory"] == "IVF256,SQ8"
    assert (settings["n_tune"], settings["n_check"], settings["k"]) == (500, 500, 10)
    assert settings["recall"] >= 0.95
    assert settings["reached"]
    nprobe = settings["nprobe"]
    assert faiss.extract_index_ivf(index).nprobe == nprobe
    # the smallest nprobe of the ladder reaching the target on the tuning half
    below = [r for p, r in settings["sweep"] if p < nprobe]
    assert below
    assert max(below) < 0.95
    assert settings["sweep"][-1] == [nprobe, settings["recall_tune"]]
    # new queries (not indexed) against NumPy brute force over every vector
    xq = clustered(300, seed=7)
    _, found = search(index, xq, 10)
    assert recall(found, brute_ids(data, xq, 10)) >= 0.95
    # indexed vectors as queries, each one's own row left out on both sides
    rows = np.random.default_rng(3).choice(len(data), 300, replace=False)
    _, found = search(index, data[rows], 11)
    found = np.array([[i for i in f if i != r][:10] for f, r in zip(found, rows, strict=True)])
    assert abs(recall(found, brute_ids(data, data[rows], 10, own=rows)) - settings["recall"]) < 0.03


def test_tune_search_sets_nprobe_and_measures_a_given_one(data):
    index = build(data, "IVF256,SQ8", nprobe=1)
    settings = tune_search(index, data, k=10, target_recall=0.9, n_queries=400)
    assert settings["nprobe"] == faiss.extract_index_ivf(index).nprobe
    assert settings["reached"]
    assert (settings["n_tune"], settings["n_check"]) == (200, 200)
    fixed = tune_search(index, data, k=10, target_recall=0.9, n_queries=400, nprobe=1)
    assert fixed["nprobe"] == 1 == faiss.extract_index_ivf(index).nprobe
    assert fixed["sweep"] == []
    assert not fixed["reached"]
    assert fixed["recall"] < settings["recall"]


def test_exact_index_needs_no_search_and_ids_survive_removal():
    xb = clustered(3000, seed=1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5
    index, settings = build_tuned(xb, ids=ids, k=10)
    assert settings == {
        "factory": "IDMap2,Flat", "k": 10, "target_recall": 0.95, "exact": True, "nprobe": None, "recall": 1.0,
        "n_tune": 0, "n_check": 0,
    }  # fmt: skip
    xq = clustered(50, seed=2)
    _, found = index.search(xq, 10)
    np.testing.assert_array_equal(found, ids[brute_ids(xb, xq, 10)])
    gone = np.arange(0, 3000, 3)
    assert index.remove_ids(ids[gone]) == len(gone)
    keep = np.setdiff1d(np.arange(3000), gone)
    _, found = index.search(xq, 10)
    np.testing.assert_array_equal(found, ids[keep][brute_ids(xb[keep], xq, 10)])
    index.add_with_ids(xb[gone], ids[gone])  # back in: the same answers as before the removal
    _, found = index.search(xq, 10)
    np.testing.assert_array_equal(found, ids[brute_ids(xb, xq, 10)])


def test_ivf_takes_ids_and_removals_directly(data):
    ids = np.arange(len(data), dtype=np.int64)[::-1] * 2 + 1
    index, settings = build_tuned(data, "IVF256,Flat", ids=ids, k=10, target_recall=0.9)
    assert settings["factory"] == "IVF256,Flat"  # no id map around an IVF index
    assert settings["recall"] >= 0.9
    faiss.extract_index_ivf(index).nprobe = 256  # every list: exact, comparable to brute force
    xq = clustered(40, seed=5)
    gone = np.arange(0, len(data), 2)
    assert index.remove_ids(ids[gone]) == len(gone)
    keep = np.setdiff1d(np.arange(len(data)), gone)
    _, found = index.search(xq, 10)
    np.testing.assert_array_equal(found, ids[keep][brute_ids(data[keep], xq, 10)])


def test_sq8_is_kept_when_it_reaches_the_target_else_sqfp16_on_the_same_quantiser():
    x = clustered(100_000, seed=4)
    sq8, kept = build_tuned(x, None, k=10, target_recall=0.9)
    assert kept["factory"] == "IVF1024,SQ8"
    assert kept["codec"] == "SQ8"
    assert kept["codec_reason"].startswith("SQ8 reached recall@10")
    index, settings = build_tuned(x, None, k=10, target_recall=0.999)
    assert settings["factory"] == "IVF1024,SQfp16"
    assert settings["codec"] == "SQfp16"
    assert "SQ8 reached recall@10" in settings["codec_reason"]
    assert "below the target 0.999" in settings["codec_reason"]
    assert max(r for p, r in settings["sweep"]) >= 0.999
    assert settings["recall"] >= 0.99
    # the coarse quantiser is the one trained for SQ8 (same seed: same sample and k-means)
    fp16 = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    sq8_centroids = faiss.downcast_index(faiss.extract_index_ivf(sq8).quantizer).reconstruct_n(0, 1024)
    np.testing.assert_array_equal(fp16.reconstruct_n(0, 1024), sq8_centroids)
    # and every vector sits in the list SQ8 put it in: its nearest centroid
    lists = faiss.extract_index_ivf(index).invlists
    assign = np.empty(len(x), np.int64)
    for lst in range(1024):
        assign[faiss.rev_swig_ptr(lists.get_ids(lst), lists.list_size(lst))] = lst
    np.testing.assert_array_equal(assign, fp16.search(x, 1)[1][:, 0])
    xq = clustered(200, seed=8)
    _, found = search(index, xq, 10)
    assert recall(found, brute_ids(x, xq, 10)) >= 0.99


def test_bad_ids_and_targets_are_one_line():
    x = clustered(100)
    with pytest.raises(BadInput, match=r"^build_tuned: ids must be unique, 1 repeat; give each vector its own id$"):
        build_tuned(x, ids=np.r_[np.arange(99), 0])
    with pytest.raises(BadInput, match=r"^build_tuned: ids must be \(100,\) integers"):
        build_tuned(x, ids=np.arange(50))
    with pytest.raises(BadInput, match=r"^build_tuned: target_recall=1.5 must be a number in \(0, 1\]"):
        build_tuned(x, target_recall=1.5)


def _small_index(factory, **kw):
    x, n = clustered(3000, seed=9), 3000
    rng = np.random.default_rng(0)
    expr = rng.random((n, 5), dtype=np.float32)
    panel = Panel(tuple(f"g{i}" for i in range(5)), "list")
    slides = np.repeat(["s0", "s1", "s2"], n // 3)
    return x, build_exemplar_index(
        x, expr, panel, slides, [str(i) for i in range(n)], keys="image", factory=factory, **kw
    )


def test_manifest_search_round_trips_and_old_indexes_still_load(tmp_path):
    x, idx = _small_index("IVF32,SQ8", k=10, target_recall=0.9)
    search_settings = idx.manifest["search"]
    assert search_settings["k"] == 10
    assert search_settings["target_recall"] == 0.9
    assert idx.manifest["factory"] == "IVF32,SQ8"
    path = save_index(idx, tmp_path / "ix")
    again = load_index(path)
    assert again.manifest["search"] == search_settings
    assert faiss.extract_index_ivf(again.index).nprobe == search_settings["nprobe"]
    np.testing.assert_array_equal(again.predict(x[:100], k=10), idx.predict(x[:100], k=10))
    # an index folder from before build-time tuning: no "search" key, the nprobe its file holds
    man = json.loads((path / "manifest.json").read_text())
    del man["search"]
    (path / "manifest.json").write_text(json.dumps(man))
    old = load_index(path)
    assert "search" not in old.manifest
    np.testing.assert_array_equal(old.predict(x[:100], k=10), idx.predict(x[:100], k=10))
    assert faiss.extract_index_ivf(load_index(path, nprobe=3).index).nprobe == 3
    (path / "manifest.json").write_text(json.dumps({**man, "search": {"nprobe": 0}}))
    with pytest.raises(BadInput, match=r"manifest.json: key 'search' is .*nprobe is None or an integer >= 1"):
        load_index(path)


def test_recipe_sets_target_recall_and_nprobe(store, tmp_path):
    def recipe(**index):
        return Recipe(
            name="ivf", encoder="builtin", cohort="synthetic", aligner=None, panel=PanelSpec(n_genes=10),
            index=IndexSpec(factory="IVF4,Flat", keys="image", **index), aggregator=AggregatorSpec(name="mean", k=5),
        )  # fmt: skip

    chosen = load_index(build_index(recipe(target_recall=0.9), store, tmp_path / "a.index")).manifest["search"]
    assert (chosen["factory"], chosen["k"], chosen["target_recall"]) == ("IVF4,Flat", 5, 0.9)
    assert chosen["recall_tune"] >= 0.9
    assert chosen["sweep"]
    fixed = load_index(build_index(recipe(nprobe=2), store, tmp_path / "b.index"))
    assert fixed.manifest["search"]["nprobe"] == 2
    assert fixed.manifest["search"]["sweep"] == []
    assert faiss.extract_index_ivf(fixed.index).nprobe == 2
    base = {"name": "r", "encoder": "builtin"}
    assert parse_recipe({**base, "index": {"target_recall": 0.99}}).index.target_recall == 0.99
    with pytest.raises(
        BadInput, match=r"^r\.toml \[index\]: target_recall = 1.5: must be a finite number > 0 and <= 1$"
    ):
        parse_recipe({**base, "index": {"target_recall": 1.5}}, source="r.toml")


class _Recording:
    """A faiss index that records the number of queries of each search call."""

    def __init__(self, index):
        self.inner, self.calls = index, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def search(self, q, k, **kw):
        self.calls.append(len(q))
        return self.inner.search(q, k, **kw)


def test_predict_searches_whole_batches_and_splits_only_the_aggregation():
    """2,000 genes: the memory budget allows 167 queries per aggregation step, but FAISS gets 4,096."""
    rng = np.random.default_rng(1)
    n, genes = 2000, 2000
    keys = clustered(n, d=16, seed=11)
    expr = rng.random((n, genes), dtype=np.float32)
    panel = Panel(tuple(f"g{i}" for i in range(genes)), "list")
    slides = np.repeat(["a", "b"], n // 2)
    idx = build_exemplar_index(
        keys, expr, panel, slides, [str(i) for i in range(n)], keys="image", aggregator="softmax"
    )
    queries = clustered(4200, d=16, seed=12)
    idx.index = _Recording(idx.index)
    got = idx.predict(queries, k=50)
    assert idx.index.calls == [4096, 104]
    rows = np.r_[0:100, 4000:4200]  # the start, and across the end of the first search batch
    sims = queries @ keys.T
    top = brute_ids(keys, queries[rows], 50)
    s = np.take_along_axis(sims[rows], top, 1).astype(np.float64) / 0.1
    w = np.exp(s - s.max(1, keepdims=True))
    want = np.einsum("nk,nkg->ng", w / w.sum(1, keepdims=True), expr[top])
    np.testing.assert_allclose(got[rows], want, rtol=1e-4, atol=1e-5)
    # own-slide exclusion through the same batching equals the brute force without those rows
    groups = np.where(np.arange(300) % 2 == 0, "a", "b")
    idx.index = idx.index.inner
    got = idx.predict(queries[:300], k=50, aggregator="mean", query_groups=groups, batch_size=256)
    masked = np.where(slides[None, :] != groups[:, None], sims[:300], -np.inf)
    top = np.argsort(-masked, axis=1, kind="stable")[:, :50]
    np.testing.assert_allclose(got, expr[top].mean(1), rtol=1e-5, atol=1e-6)


def test_thread_policy_is_set_before_openmp_starts():
    """Importing the index module sets OMP_WAIT_POLICY=PASSIVE before faiss or torch load; a user's value wins."""
    code = (
        "import os, sys, embedstore.index_folder; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'faiss' in sys.modules, 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "False", "False"]
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split()[0] == "ACTIVE"
