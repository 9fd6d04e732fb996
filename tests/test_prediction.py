"""Reference -> index -> prediction on a real store: the AnnData contract, round trips, refusals."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from cli_helpers import assert_one_line_error, run

from embedstore._schema import tile_schema
from embedstore.build import build_reference_index, load_reference
from embedstore.embedding import embed
from embedstore.errors import BadInput, FingerprintMismatch
from embedstore.index_folder import load_index, save_index
from embedstore.prediction import OBS_COLUMNS, predict, write_h5ad
from embedstore.recipes import load_recipe, parse_recipe
from embedstore.spots import LEGACY_ST_SPOT_UM
from embedstore.store import open_store
from embedstore.testing import write_synthetic_slide


def _scanpy_default_library(adata):
    """What ``scanpy.pl.spatial(adata, color=...)`` draws with no extra arguments (scanpy 1.11's
    ``_check_spatial_data``, ``_check_img``, ``_check_scale_factor``, ``_check_spot_size``):
    the only library, its hires image, the hires scale factor and the spot diameter."""
    libraries = adata.uns["spatial"]
    assert len(libraries) == 1
    library = next(iter(libraries.values()))
    img_key = next(k for k in ("hires", "lowres") if k in library["images"])
    scalef = library["scalefactors"][f"tissue_{img_key}_scalef"]
    return library["images"][img_key], scalef, library["scalefactors"]["spot_diameter_fullres"]


def _in_sample_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "in-sample" in r.getMessage()]


def test_reference_joins_every_spot(store, cohort):
    ref = load_reference(store, "builtin", cohort="synthetic")
    assert len(ref.embeddings) == sum(len(s.spot_ids) for s in cohort.sections)
    assert ref.counts.shape == (len(ref.embeddings), len(cohort.genes))
    # row alignment: each spot's counts equal the generator's counts for that spot
    sec = cohort.sections[0]
    rows = [i for i, s in enumerate(ref.column("slide_id")) if s == sec.section]
    by_spot = dict(zip(ref.column("spot_id")[rows], ref.counts[rows].toarray(), strict=True))
    genes = [ref.genes.index(g) for g in cohort.genes]
    for spot, counts in zip(sec.spot_ids, sec.counts, strict=True):
        np.testing.assert_array_equal(by_spot[spot][genes], counts)


def test_prediction_follows_the_anndata_contract(index, store, cohort, tmp_path):
    sec = cohort.sections[0]
    adata = predict(index, store, slide_ids=[sec.section], exclude_own="slide_id")
    idx = load_index(index)
    assert list(adata.var_names) == idx.genes
    assert tuple(adata.obs.columns) == OBS_COLUMNS
    assert adata.obs.slide_id.dtype == "category"  # squidpy's library_key
    assert set(adata.obs.slide_id) == {sec.section}
    assert set(adata.obs.patient) == {sec.patient}
    assert set(adata.obs.cohort) == {"synthetic"}
    np.testing.assert_array_equal(adata.obsm["spatial"], adata.obs[["x", "y"]].to_numpy(dtype=float))
    # the tile centres are the generator's spot centres (rounded to level-0 pixels)
    truth = dict(zip(sec.spot_ids, sec.centers_xy, strict=True))
    expected = np.array([truth[s] for s in adata.obs.spot_id])
    assert np.abs(adata.obsm["spatial"] - expected).max() <= 0.5
    assert adata.X.dtype == np.float32
    assert np.isfinite(adata.X).all()
    # the contract survives the h5ad round trip
    back = ad.read_h5ad(write_h5ad(adata, tmp_path / "p.h5ad"))
    assert tuple(back.obs.columns) == OBS_COLUMNS
    assert back.obs.slide_id.dtype == "category"
    np.testing.assert_array_equal(
        back.uns["spatial"][sec.section]["images"]["hires"], adata.uns["spatial"][sec.section]["images"]["hires"]
    )


def test_spatial_library_is_the_sections_he_at_scanpys_defaults(index, store, cohort):
    """uns['spatial'] holds the section's H&E so scanpy draws the spots over their tissue."""
    sec = cohort.sections[1]
    adata = predict(index, store, slide_ids=[sec.section], exclude_own="slide_id")
    image, scalef, spot = _scanpy_default_library(adata)
    level0 = tifffile.imread(sec.image_path)  # 1,200 px: below the 2,000 px hires side, so unscaled
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, level0)
    assert scalef == 1.0
    assert spot == LEGACY_ST_SPOT_UM / sec.mpp  # the ST spot in level-0 px
    library = adata.uns["spatial"][sec.section]
    lowres, low_scalef = library["images"]["lowres"], library["scalefactors"]["tissue_lowres_scalef"]
    assert lowres.shape == (600, 600, 3)
    assert low_scalef == 0.5
    box = level0.reshape(600, 2, 600, 2, 3).mean(axis=(1, 3))
    assert np.abs(lowres - box).mean() < 3
    # where scanpy puts the spots: on the generator's spot centres, over tissue (darker than the corner)
    xy = adata.obsm["spatial"] * scalef
    cols, rows = np.round(xy).astype(int).T
    assert image[rows, cols].mean() < image[:20, :20].mean() - 20
    assert library["metadata"]["source_image_path"] == str(sec.image_path)


def test_grid_slide_library_has_the_tile_side_as_spot(index, tmp_path, caplog):
    """A plain slide (tissue grid): no spot or patient, spot diameter = tile side in level-0 px."""
    slide = write_synthetic_slide(tmp_path / "plain.tif", 1536, 1536, mpp=0.25, seed=3)
    store = tmp_path / "store"
    assert embed(slide, store, workers=0, progress=False).ok
    with caplog.at_level(logging.WARNING):
        adata = predict(index, store)
    assert not _in_sample_warnings(caplog)
    assert set(adata.obs.spot_id) == {""}
    assert set(adata.obs.patient) == {""}
    image, scalef, spot = _scanpy_default_library(adata)
    np.testing.assert_array_equal(image, tifffile.imread(slide))
    assert scalef == 1.0
    assert spot == 224 * 0.5 / 0.25  # 224 px tiles at 0.5 µm/px on a 0.25 µm/px slide


def test_missing_source_warns_once_and_still_predicts(index, store, cohort, caplog):
    slides = [s.section for s in cohort.sections[:2]]
    with_images = predict(index, store, slides, exclude_own="slide_id")
    moved = cohort.root.with_name(cohort.root.name + "-moved")
    cohort.root.rename(moved)
    try:
        with caplog.at_level(logging.WARNING):
            without = predict(index, store, slides, exclude_own="slide_id")
    finally:
        moved.rename(cohort.root)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert all(s in warnings[0] for s in slides)
    assert "is gone" in warnings[0]
    assert dict(without.uns["spatial"]) == {}
    np.testing.assert_array_equal(without.X, with_images.X)


def test_sections_he_comes_from_the_recorded_image_not_a_reread_of_the_counts(index, store, cohort):
    """The image path is recorded at embedding: predict attaches it without reading the counts again."""
    slide = cohort.sections[0].section
    counts = cohort.root / "data" / "ST-cnts"
    hidden = counts.with_name("ST-cnts-hidden")
    counts.rename(hidden)  # the data set can no longer be read as a whole
    try:
        adata = predict(index, store, [slide], exclude_own="slide_id")
    finally:
        hidden.rename(counts)
    assert slide in adata.uns["spatial"]
    assert adata.uns["spatial"][slide]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(
        100.0
    )  # 100 µm at 1 µm/px


def test_in_sample_prediction_warns_unless_own_slide_is_left_out(index, store, cohort, caplog):
    slide = cohort.sections[0].section
    with caplog.at_level(logging.WARNING):
        with_own = predict(index, store, slide_ids=[slide])
    warned = _in_sample_warnings(caplog)
    assert len(warned) == 1
    assert slide in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        without = predict(index, store, slide_ids=[slide], exclude_own="slide_id")
        predict(index, store, slide_ids=[slide], exclude_own="patient", images=False)
    assert not _in_sample_warnings(caplog)
    assert not np.allclose(with_own.X, without.X)


def test_streamed_row_groups_equal_one_shot_prediction(index, tmp_path, monkeypatch):
    """A slide read in several row groups is predicted exactly as all its tiles in one call."""
    import embedstore.store._writer as writer

    monkeypatch.setattr(writer, "row_group_rows", lambda dim: 1024)
    idx = load_index(index)
    n = 2500
    rng = np.random.default_rng(0)
    tiles = pa.table(
        {
            "slide_id": ["big"] * n,
            "tile_id": [f"t{i}" for i in range(n)],
            "spot_id": [None] * n,
            "x": rng.integers(0, 10**5, n),
            "y": rng.integers(0, 10**5, n),
            "mpp": [0.5] * n,
            "size_px": [224] * n,
            "padded": [False] * n,
        },
        schema=tile_schema(),
    )
    st = open_store(tmp_path / "store", read_only=False)
    encoder = idx.manifest["embedstore.encoder"]
    with st.lock_slide(encoder["name"], "query", "big"):
        w = st.slide_writer(encoder, "query", "big", idx.geometry, n)
        for s in range(0, n, 700):
            w.append(tiles.slice(s, 700), rng.normal(size=(min(700, n - s), 128)))
        path = w.commit()
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    streamed = predict(index, st, aggregator="softmax", images=False)
    meta, emb = st.read_embeddings(encoder["name"])
    one_shot = idx.predict(emb, k=idx.manifest["k"], aggregator="softmax")
    assert list(streamed.obs.tile_id) == meta.column("tile_id").to_pylist()
    np.testing.assert_array_equal(streamed.X, one_shot)


def test_saved_index_predicts_identically(store, tmp_path):
    ref = load_reference(store, "builtin", cohort="synthetic")
    live = build_reference_index(ref, n_genes=20, aligner={"proj_dim": 16, "max_epochs": 3}, aggregator="learned", k=5)
    save_index(live, tmp_path / "live.index")
    loaded = load_index(tmp_path / "live.index")
    np.testing.assert_array_equal(live.predict(ref.embeddings, k=5), loaded.predict(ref.embeddings, k=5))


def test_fingerprint_and_dimension_refused(index, store):
    idx = load_index(index)
    _, emb = open_store(store).read_embeddings("builtin", slide_ids=["A1"])
    with pytest.raises(FingerprintMismatch, match=f"{idx.fingerprint}.*required|required.*{idx.fingerprint}"):
        idx.predict(emb, fingerprint="0123456789abcdef")
    with pytest.raises(BadInput, match="128-d embeddings"):
        idx.predict(emb[:, :64])


def test_predict_cli_leaves_own_slide_out_and_writes_h5ad_and_maps(index, store, cohort, tmp_path):
    slide = cohort.sections[2].section
    out = tmp_path / "pred.h5ad"
    result = run("predict", "--index", index, "--store", store, "--slide", slide, "--exclude-own", "slide", "--out", out, "--plot")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "in-sample" not in result.stderr
    written = ad.read_h5ad(out)
    assert written.uns["embedstore"]["exclude_own"] == "slide_id"
    np.testing.assert_array_equal(written.X, predict(index, store, [slide], exclude_own="slide_id", images=False).X)
    assert slide in written.uns["spatial"]
    assert (tmp_path / f"pred.{slide}.png").is_file()
    bad = run("predict", "--index", index, "--store", store, "--exclude-own", "sample", "--out", out)
    assert_one_line_error(bad, "--exclude-own sample", "slide or patient")


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
