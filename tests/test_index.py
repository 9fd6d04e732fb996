from __future__ import annotations

import json

import numpy as np
import pytest

from embedstore._schema import Col
from embedstore.aggregate import LearnedAggregatorConfig, create_aggregator
from embedstore.aligner import AlignerConfig, fit
from embedstore.errors import BadInput, FingerprintMismatch
from embedstore.expression import Panel
from embedstore.index import (
    ExemplarIndex,
    build,
    build_exemplar_index,
    default_factory,
    l2_normalize,
    search,
    set_search_params,
)
from embedstore.index_folder import load_index, save_index
from embedstore.testing import seeded_embeddings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute(xb, xq, k, allowed=None):
    """Exact top-k by NumPy matmul; rows of ``xb`` outside ``allowed`` (per query) are removed."""
    s = xq @ xb.T
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def clustered(n, d, seed):
    """20 Gaussian clusters whose spread spans a 12-d subspace (embeddings have a low intrinsic dimension)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((12, d))
    centres = np.random.default_rng(98).standard_normal((20, d)) * 3
    return l2_normalize(
        centres[rng.integers(0, 20, n)] + rng.standard_normal((n, 12)) @ basis + 0.1 * rng.standard_normal((n, d))
    )


def test_flat_equals_numpy_brute_force():
    xb, xq = clustered(2000, 32, 0), clustered(300, 32, 1)
    sims, ids = search(build(xb, "Flat"), xq, 10, batch_size=64)
    ref_s, ref_i = brute(xb, xq, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sims, ref_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("factory", "params"), [("IVF128,Flat", {"nprobe": 16}), ("HNSW32", {"efSearch": 64})])
def test_approximate_recall_against_flat(factory, params):
    xb, xq = clustered(20_000, 64, 2), clustered(500, 64, 3)
    _, truth = search(build(xb, "Flat"), xq, 10)
    _, found = search(build(xb, factory, **params), xq, 10)
    recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95


@pytest.mark.parametrize("method", ["selector", "filter"])
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_exclusion_equals_brute_force_without_the_rows(method, factory):
    xb, xq = clustered(1500, 16, 4), clustered(200, 16, 5)
    rng = np.random.default_rng(6)
    ex_groups = rng.choice(["a", "b", "c"], size=1500, p=[0.6, 0.3, 0.1])
    q_groups = rng.choice(["a", "b", "c", "new"], size=200)
    index = build(xb, factory)
    set_search_params(index, nprobe=16)  # all lists: exact, so comparable to brute force
    sims, ids = search(index, xq, 20, exclude=(ex_groups, q_groups), method=method, batch_size=50)
    ref_s, ref_i = brute(xb, xq, 20, allowed=ex_groups[None, :] != q_groups[:, None])
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sims, ref_s, rtol=1e-5, atol=1e-6)
    assert not (ex_groups[ids] == q_groups[:, None]).any()


def test_search_errors():
    index = build(clustered(50, 8, 0), "Flat")
    with pytest.raises(BadInput, match="only 10 exemplars lie outside group 'a', fewer than k=20"):
        search(index, clustered(2, 8, 1), 20, exclude=(np.array(["a"] * 40 + ["b"] * 10), np.array(["a", "a"])))
    with pytest.raises(BadInput, match="the index holds 8-d vectors"):
        search(index, np.zeros((2, 9), np.float32), 5)
    with pytest.raises(BadInput, match="factory 'IVFbogus': faiss cannot build it"):
        build(clustered(50, 8, 0), "IVFbogus")


def test_default_factory():
    assert default_factory(5_000, 256) == "Flat"
    # SQ8 first; build_tuned switches to SQfp16 where SQ8 cannot reach the target recall
    assert default_factory(1_000_000, 256) == "IVF4096,SQ8"


def _ids(n, slides):
    return {"slide_ids": slides, "spot_ids": [f"spot{i}" for i in range(n)], "patients": [f"p{s}" for s in slides]}


def pearson_per_gene(pred, truth):
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    return float(np.mean((p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))))


def test_alignment_beats_raw_knn_leave_slide_out():
    img, expr, slides = seeded_embeddings()
    panel = Panel(tuple(f"g{i}" for i in range(20)), "list")
    aligner = fit(img, expr, slides, AlignerConfig(proj_dim=32, batch_size=128, max_epochs=40, patience=8), seed=0)
    raw = build_exemplar_index(img, expr, panel, **_ids(len(img), slides), keys="image")
    bleep = build_exemplar_index(img, expr, panel, **_ids(len(img), slides), aligner=aligner, keys="expression")
    egn = build_exemplar_index(img, expr, panel, **_ids(len(img), slides), aligner=aligner, keys="image")
    r_raw = pearson_per_gene(raw.predict(img, k=10, query_groups=slides), expr)
    r_bleep = pearson_per_gene(bleep.predict(img, k=10, query_groups=slides), expr)
    r_egn = pearson_per_gene(egn.predict(img, k=10, query_groups=slides), expr)
    assert r_bleep > r_raw + 0.1
    assert r_egn > r_raw + 0.1


def test_raw_baseline_predict_is_mean_of_brute_force_neighbours():
    img, expr, slides = seeded_embeddings(n=200)
    panel = Panel(tuple(f"g{i}" for i in range(20)), "list")
    idx = build_exemplar_index(img, expr, panel, **_ids(200, slides), keys="image")
    q = img[:30] + 0.1
    _, ref_i = brute(l2_normalize(img), l2_normalize(q), 5, allowed=slides[None, :] != slides[:30, None])
    expected = expr[ref_i].mean(1)
    np.testing.assert_allclose(idx.predict(q, k=5, query_groups=slides[:30], batch_size=7), expected, rtol=1e-5)
    np.testing.assert_allclose(idx.predict(q, k=5, query_groups=slides[:30]), expected, rtol=1e-5)
    # patient exclusion uses the patient column (one patient per slide here: same answer)
    np.testing.assert_allclose(
        idx.predict(q, 5, None, ["ps" + s[1:] for s in slides[:30]], group_by=Col.PATIENT), expected, rtol=1e-5
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    img, expr, slides = seeded_embeddings(n=240)
    panel = Panel(tuple(f"g{i}" for i in range(20)), "hvg", {"n": 20})
    cfg = AlignerConfig(
        proj_dim=16, max_epochs=3, encoder_fingerprint="fp-1", encoder_name="builtin", genes=panel.genes
    )
    aligner = fit(img, expr, slides, cfg, seed=0)
    idx = build_exemplar_index(img, expr, panel, **_ids(240, slides), aligner=aligner, aggregator="softmax")
    idx.fit_learned_aggregator(img, k=8, cfg=LearnedAggregatorConfig(hidden=16, max_epochs=2), seed=0)
    path = save_index(idx, tmp_path_factory.mktemp("ix") / "index")
    return idx, path, img, slides


def test_save_load_predict_identical(saved):
    idx, path, img, slides = saved
    names = sorted(p.name for p in path.iterdir())
    assert names == ["aggregator", "aligner", "exemplars.parquet", "index.faiss", "manifest.json", "panel.json"]
    man = json.loads((path / "manifest.json").read_text())
    assert man["embedstore.encoder"] == {"fingerprint": "fp-1", "name": "builtin"}
    assert (man["factory"], man["metric"], man["keys"], man["n"], man["dim"]) == ("Flat", "ip", "expression", 240, 16)
    assert man["aggregator"] == {"name": "learned", "params": {"path": "aggregator"}}
    again = load_index(path)
    assert isinstance(again, ExemplarIndex)
    assert again.genes == idx.genes
    for agg in (None, "mean", create_aggregator("idw", eps=0.01)):
        np.testing.assert_array_equal(
            again.predict(img, 8, agg, slides, fingerprint="fp-1"), idx.predict(img, 8, agg, slides, fingerprint="fp-1")
        )


def test_mismatches_give_one_line_errors(saved):
    idx, _, img, _ = saved
    with pytest.raises(
        FingerprintMismatch, match="query embeddings: embeddings have encoder fingerprint fp-2, but fp-1 is required"
    ):
        idx.predict(img, 8, fingerprint="fp-2")
    with pytest.raises(
        BadInput, match=r"query embeddings: shape \(3, 40\), but the index was built from 48-d embeddings \(builtin\)"
    ):
        idx.predict(np.zeros((3, 40), np.float32))
    with pytest.raises(
        BadInput,
        match=r"truth.h5ad: gene panel \(2 genes, e.g. not in index: \['X'\]\) differs from the index panel \(20 genes",
    ):
        idx.check_panel(["g0", "X"], "truth.h5ad")
    other = Panel(tuple(f"h{i}" for i in range(20)), "list")
    img2, expr2, slides2 = seeded_embeddings(n=40)
    with pytest.raises(BadInput, match=r"aligner: trained on a 20-gene panel .* but the index panel has 20 genes"):
        build_exemplar_index(img2, expr2, other, **_ids(40, slides2), aligner=idx.aligner)
    with pytest.raises(BadInput, match="keys='expression': needs a trained aligner"):
        build_exemplar_index(img2, expr2, other, **_ids(40, slides2))


def test_corrupted_or_foreign_files_give_bad_input(saved, tmp_path):
    import shutil

    _, path, _, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "index.faiss").write_bytes(b"garbage" * 20)
    with pytest.raises(BadInput, match=r"bad/index.faiss: faiss cannot read it .*corrupted, rebuild the index"):
        load_index(bad)
    shutil.copy(path / "index.faiss", bad / "index.faiss")
    (bad / "exemplars.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(BadInput, match=r"bad/exemplars.parquet: cannot be read as Parquet"):
        load_index(bad)
    shutil.copy(path / "exemplars.parquet", bad / "exemplars.parquet")
    man = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**man, "embedstore.schema_version": "99"}))
    with pytest.raises(BadInput, match=r"manifest\.json: schema version 99, this embedstore reads 1"):
        load_index(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(BadInput, match=r"bad/manifest\.json: missing"):
        load_index(bad)
    with pytest.raises(BadInput, match="already exists; pass overwrite=True"):
        save_index(saved[0], path)
