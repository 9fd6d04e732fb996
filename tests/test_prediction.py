"""Reference -> index -> prediction on a real store: the AnnData contract, round trips, refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from embedstore.embedding import embed
from embedstore.errors import BadInput, FingerprintMismatch
from embedstore.index import load_index
from embedstore.prediction import predict
from embedstore.recipes import load_recipe, parse_recipe
from embedstore.reference import build_index, load_reference
from embedstore.store import open_store


@pytest.fixture(scope="module")
def store(synthetic_cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("pred") / "store"
    assert embed(synthetic_cohort.root, path, cohort="synthetic", workers=0, progress=False).ok
    return path


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "tiny.toml"
    path.write_text(
        'name = "tiny"\nencoder = "builtin"\ncohort = "synthetic"\n'
        '[panel]\nmethod = "hvg"\nn_genes = 20\n'
        "[aligner]\nproj_dim = 32\nmax_epochs = 15\n"
        '[index]\nfactory = "Flat"\n'
        '[aggregator]\nname = "softmax"\nk = 8\ntau = 0.2\n'
    )
    return path


@pytest.fixture(scope="module")
def index_dir(store, recipe_file, tmp_path_factory):
    return build_index(recipe_file, store, tmp_path_factory.mktemp("idx") / "tiny.index")


def test_reference_joins_every_spot(store, synthetic_cohort):
    ref = load_reference(store, "builtin", cohort="synthetic")
    assert len(ref.embeddings) == sum(len(s.spot_ids) for s in synthetic_cohort.sections)
    assert ref.counts.shape == (len(ref.embeddings), len(synthetic_cohort.genes))
    # row alignment: each spot's counts equal the generator's counts for that spot
    sec = synthetic_cohort.sections[0]
    rows = [i for i, s in enumerate(ref.column("slide_id")) if s == sec.section]
    by_spot = dict(zip(ref.column("spot_id")[rows], ref.counts[rows].toarray(), strict=True))
    genes = [ref.genes.index(g) for g in synthetic_cohort.genes]
    for spot, counts in zip(sec.spot_ids, sec.counts, strict=True):
        np.testing.assert_array_equal(by_spot[spot][genes], counts)


def test_prediction_follows_the_anndata_contract(index_dir, store):
    adata = predict(index_dir, store, slide_ids=["A1"])
    idx = load_index(index_dir)
    assert adata.n_vars == 20
    assert list(adata.var_names) == idx.genes
    assert set(adata.obs.slide_id) == {"A1"}
    assert {"tile_id", "spot_id", "x", "y", "cohort"} <= set(adata.obs.columns)
    np.testing.assert_array_equal(adata.obsm["spatial"], adata.obs[["x", "y"]].to_numpy(dtype=float))
    assert adata.X.dtype == np.float32
    assert np.isfinite(adata.X).all()
    assert idx.manifest["k"] == 8
    assert idx.manifest["aggregator"]["name"] == "softmax"


def test_saved_index_predicts_identically(store, recipe_file, tmp_path):
    from embedstore.reference import build_reference_index

    ref = load_reference(store, "builtin", cohort="synthetic")
    live = build_reference_index(ref, n_genes=20, aligner={"proj_dim": 32, "max_epochs": 10}, aggregator="learned", k=8)
    live.save(tmp_path / "live.index")
    loaded = load_index(tmp_path / "live.index")
    np.testing.assert_array_equal(live.predict(ref.embeddings, k=8), loaded.predict(ref.embeddings, k=8))


def test_leave_own_slide_out_changes_retrieval(index_dir, store):
    with_own = predict(index_dir, store, slide_ids=["B1"])
    without = predict(index_dir, store, slide_ids=["B1"], exclude_own="slide_id")
    assert not np.allclose(with_own.X, without.X)


def test_fingerprint_and_dimension_refused(index_dir, store):
    idx = load_index(index_dir)
    _, emb = open_store(store).read_embeddings("builtin", slide_ids=["A1"])
    with pytest.raises(FingerprintMismatch, match=f"{idx.fingerprint}.*required|required.*{idx.fingerprint}"):
        idx.predict(emb, fingerprint="0123456789abcdef")
    with pytest.raises(BadInput, match="128-d embeddings"):
        idx.predict(emb[:, :64])


def test_predict_cli_writes_h5ad_and_maps(index_dir, store, tmp_path):
    out = tmp_path / "pred.h5ad"
    cmd = [sys.executable, "-m", "embedstore", "predict", "--index", str(index_dir), "--store", str(store)]
    result = subprocess.run(
        [*cmd, "--slide", "C1", "--out", str(out), "--plot"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    import anndata as ad

    assert ad.read_h5ad(out).n_obs > 0
    assert (tmp_path / "pred.C1.png").is_file()


def test_recipe_unknown_key_lists_valid_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nencoder = "builtin"\n[index]\nfactroy = "Flat"\n')
    with pytest.raises(BadInput, match="unknown key\\(s\\) factroy; valid keys are factory, keys, nprobe"):
        load_recipe(bad)
    with pytest.raises(BadInput, match="missing key 'encoder'"):
        parse_recipe({"name": "x"})


def test_shipped_recipes_parse():
    for name in ("her2st-builtin", "synthetic-demo"):
        recipe = load_recipe(name)
        assert recipe.encoder == "builtin"
        assert recipe.aggregator.k > 0
