"""Tissue context from the store (embedstore.context) and spatial smoothing (embedstore.smoothing)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run

import embedstore as es
from embedstore import context as ctx
from embedstore._schema import fingerprint
from embedstore.build import build_index, load_reference
from embedstore.context import (
    check_radii,
    context_features,
    context_table,
    embed_context,
    positions_um,
    slide_mpp,
)
from embedstore.errors import BadInput, FingerprintMismatch
from embedstore.index_folder import load_index
from embedstore.metrics import pearson_columns
from embedstore.prediction import predict
from embedstore.recipes import AggregatorSpec, IndexSpec, PanelSpec, Recipe
from embedstore.smoothing import choose_alpha, neighbour_graph, smooth
from embedstore.store import open_store
from embedstore.store._writer import SOURCES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TABLE = "builtin-ctx250-600"


class _Killed(BaseException):
    """A SIGKILL stand-in: not an Exception, so no per-slide handler catches it."""


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def _copy(store, tmp_path, name="store"):
    out = tmp_path / name
    shutil.copytree(store, out, ignore=shutil.ignore_patterns("_locks"))
    return out


def _sources(root, encoder):
    return sorted((root / SOURCES / f"encoder={encoder}").glob("cohort=*/slide_id=*.json"))


def _brute_context(xy, emb, radii):
    """The definition, pair by pair: own embedding, then the mean over tiles at most r away (itself included)."""
    blocks = [emb.astype(np.float64)]
    for r in radii:
        out = np.zeros_like(emb, dtype=np.float64)
        for i in range(len(xy)):
            near = [j for j in range(len(xy)) if np.hypot(*(xy[i] - xy[j])) <= r]
            out[i] = emb[near].mean(axis=0)
        blocks.append(out)
    return np.hstack(blocks)


# --- context features on arrays ----------------------------------------------------------


def test_context_features_match_a_brute_force_loop(monkeypatch):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(180, 2))
    emb = rng.normal(size=(180, 6)).astype(np.float32)
    want = _brute_context(xy, emb, (120.0, 300.0))
    monkeypatch.setattr(ctx, "BLOCK_ROWS", 37)  # several blocks, the last one short
    got = context_features(xy, emb, radii_um=(120.0, 300.0))
    assert got.dtype == np.float32
    assert got.shape == (180, 18)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:, :6], emb)


def test_a_tile_without_neighbours_keeps_its_own_embedding_in_every_block():
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [5000.0, 5000.0]])
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    got = context_features(xy, emb, radii_um=(150.0, 250.0))
    np.testing.assert_array_equal(got[3], np.tile(emb[3], 3))  # alone: itself, three times
    np.testing.assert_allclose(got[0, 3:6], emb[:3].mean(0))  # the others: their group's mean
    assert not np.allclose(got[0, 3:6], emb[0])


@pytest.mark.parametrize("radii", [(), (0.0,), (-5.0, 100.0), (600.0, 250.0), (250.0, 250.0), (float("nan"),)])
def test_bad_radii_are_one_line(radii):
    with pytest.raises(BadInput) as err:
        check_radii(radii)
    _one_line(err, "radii_um", "--radius", "increasing")
    with pytest.raises(BadInput):
        context_features(np.zeros((2, 2)), np.zeros((2, 3), np.float32), radii_um=radii)


def test_table_names_are_store_names_and_distinct_per_radii():
    assert context_table("builtin") == TABLE
    assert context_table("builtin", (300.0,)) == "builtin-ctx300"
    assert context_table("uni", (62.5, 1000)) == "uni-ctx62.5-1000"
    from embedstore.store._catalog import view_name
    from embedstore.store._files import check_name

    assert check_name(context_table("timm:vit+x", (250, 600)), "encoder name")
    assert view_name(TABLE) == "embeddings_builtin_ctx250_600"


# --- positions in µm ----------------------------------------------------------------------


def test_um_radii_mean_the_same_at_two_resolutions(tmp_path):
    """The same tissue scanned at 0.5 and 1.0 µm/px: same tile positions and neighbours in µm."""
    from embedstore.testing import write_synthetic_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "fine.tif", 1536, 1536, mpp=0.5, seed=3)
    write_synthetic_slide(slides / "coarse.tif", 768, 768, mpp=1.0, seed=3)
    store = tmp_path / "store"
    report = es.embed(slides, store, target_mpp=1.0, size_px=64, workers=0, progress=False)
    assert report.ok
    # a fresh embed records the level-0 µm/px in each slide's source
    st = open_store(store)
    assert st.slide_source("builtin", "slides", "fine")["slide_mpp"] == 0.5
    assert st.slide_source("builtin", "slides", "coarse")["slide_mpp"] == 1.0
    (m_fine, xy_fine), (m_coarse, xy_coarse) = (positions_um(st, "builtin", "slides", s) for s in ("fine", "coarse"))
    assert m_fine.column("tile_id").to_pylist() != m_coarse.column("tile_id").to_pylist()  # pixels differ
    fine = {tuple(p) for p in np.round(xy_fine, 3)}
    coarse = {tuple(p) for p in np.round(xy_coarse, 3)}
    common = fine & coarse
    assert len(common) >= 0.9 * max(len(fine), len(coarse)) > 20

    def neighbours(xy, r):
        pts = [tuple(p) for p in np.round(xy, 3)]
        keep = [i for i, p in enumerate(pts) if p in common]
        sub = xy[keep]
        d = np.hypot(*(sub[:, None, :] - sub[None, :, :]).transpose(2, 0, 1))
        return {pts[keep[i]]: frozenset(pts[keep[j]] for j in np.flatnonzero(d[i] <= r)) for i in range(len(keep))}

    want = neighbours(xy_coarse, 150.0)
    assert neighbours(xy_fine, 150.0) == want
    assert max(len(v) for v in want.values()) > 9  # 150 µm reaches two 64 µm tiles away
    # a store from before slide_mpp was recorded: read from the slide file it was embedded from
    for path in _sources(store, "builtin"):
        doc = json.loads(path.read_text())
        del doc["slide_mpp"]
        path.write_text(json.dumps(doc))
    assert "slide_mpp" not in st.slide_source("builtin", "slides", "fine")
    assert slide_mpp(st, "builtin", "slides", "fine") == 0.5
    np.testing.assert_array_equal(positions_um(st, "builtin", "slides", "fine")[1], xy_fine)


def test_ray_tile_tables_carry_the_slide_mpp_to_the_recorded_source(synthetic_slide_path, tmp_path):
    from embedstore import ray_embed
    from embedstore.slide_jobs import EmbedSettings, SlideJob

    settings = EmbedSettings(
        data=synthetic_slide_path, cohort="c", encoder="builtin", weights=None, target_mpp=1.0, size_px=64,
        min_tissue=0.25, device="cpu", batch_size=8, workers=0, loader="threads", progress=False,
    )  # fmt: skip
    job = SlideJob("synthetic", synthetic_slide_path)
    tiles = ray_embed._tile_table_task(job, settings)
    assert ray_embed._slide_mpp(tiles) == 0.5
    assert ray_embed._slide_mpp(tiles.take([0, 1])) == 0.5  # survives the row selections the driver makes
    assert settings.source(job, slide_mpp=ray_embed._slide_mpp(tiles))["slide_mpp"] == 0.5
    assert settings.source(job)["slide_mpp"] is None


def test_slide_mpp_of_an_old_st_store_comes_from_its_image_else_one_line(store, tmp_path):
    root = _copy(store, tmp_path)
    st = open_store(root)
    section = st.sql("SELECT DISTINCT slide_id FROM slides ORDER BY 1").slide_id[0]
    assert st.slide_source("builtin", "synthetic", section)["slide_mpp"] == 1.0
    path = next(p for p in _sources(root, "builtin") if p.stem == f"slide_id={section}")
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "slide_mpp": 0.25}))
    assert slide_mpp(st, "builtin", "synthetic", section) == 0.25  # what was recorded wins
    doc.pop("slide_mpp")
    doc["mpp"] = None  # nothing recorded: the section's H&E says it
    path.write_text(json.dumps(doc))
    assert slide_mpp(st, "builtin", "synthetic", section) == 1.0
    doc["image"] = str(tmp_path / "moved.tif")
    path.write_text(json.dumps(doc))
    with pytest.raises(BadInput) as err:
        slide_mpp(st, "builtin", "synthetic", section)
    _one_line(err, section, "moved.tif", "re-embed", "--mpp")
    assert slide_mpp(st, "builtin", "synthetic", section, mpp=1.0) == 1.0
    with pytest.raises(BadInput) as err:
        embed_context(root, "builtin", progress=False)
    _one_line(err, section, "--mpp")
    assert not (root / "embeddings" / f"encoder={TABLE}").exists()  # refused before anything was written


# --- the derived table ---------------------------------------------------------------------


def test_embed_context_round_trip(store, tmp_path):
    root = _copy(store, tmp_path)
    report = embed_context(root, "builtin", progress=False)
    assert report.ok
    assert report.table == TABLE
    assert [r.status for r in report.results] == ["done"] * 3
    st = open_store(root)
    src_meta, src_emb = st.read_embeddings("builtin")
    meta, emb = st.read_embeddings(TABLE)
    for col in ("cohort", "slide_id", "tile_id", "spot_id", "x", "y", "mpp", "size_px", "padded"):
        assert meta.column(col).equals(src_meta.column(col)), col
    d = src_emb.shape[1]
    assert emb.shape == (len(src_emb), 3 * d)
    np.testing.assert_array_equal(emb[:, :d], src_emb)
    for section in dict.fromkeys(meta.column("slide_id").to_pylist()):
        rows = np.flatnonzero(np.asarray(meta.column("slide_id").to_pylist()) == section)
        _, xy = positions_um(st, "builtin", "synthetic", section)
        np.testing.assert_allclose(emb[rows], context_features(xy, src_emb[rows]), rtol=1e-6, atol=1e-7)
        assert len({tuple(v) for v in emb[rows, d : 2 * d]}) > 1  # spots do have neighbours at 250 µm
    src_fp = st.encoder_metadata("builtin")["fingerprint"]
    info = st.encoder_metadata(TABLE)
    assert info["fingerprint"] == fingerprint(src_fp, {"context": {"radii_um": [250.0, 600.0]}}) != src_fp
    assert info["family"] == "context"
    assert info["name"] == TABLE
    assert info["source"]["fingerprint"] == src_fp
    assert info["source"]["name"] == "builtin"
    assert info["context"] == {"radii_um": [250.0, 600.0], "source_fingerprint": src_fp}
    assert info["geometry"] == st.encoder_metadata("builtin")["geometry"]
    assert set(meta.column("fingerprint").to_pylist()) == {info["fingerprint"]}
    source = st.slide_source(TABLE, "synthetic", meta.column("slide_id")[0].as_py())
    assert source["kind"] == "context"
    assert source["radii_um"] == [250.0, 600.0]
    assert source["slide_mpp"] == 1.0
    # SQL sees it as any encoder's table
    n = st.sql(f"SELECT count(*) AS n FROM {'embeddings_builtin_ctx250_600'}").n[0]
    assert n == len(emb)
    assert TABLE in st.encoders()
    # a rerun skips every slide, touching nothing
    files = sorted((root / "embeddings" / f"encoder={TABLE}").rglob("tiles.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = embed_context(root, "builtin", progress=False)
    assert [r.status for r in again.results] == ["skipped"] * 3
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # other radii: another table beside it
    other = embed_context(root, "builtin", radii_um=(300.0,), progress=False)
    assert other.table == "builtin-ctx300"
    assert other.ok
    assert open_store(root).read_embeddings("builtin-ctx300")[1].shape == (len(src_emb), 2 * d)
    # radii that print the same but differ: refused in one line, nothing rewritten
    with pytest.raises(BadInput) as err:
        embed_context(root, "builtin", radii_um=(250.0000001, 600.0), progress=False)
    _one_line(err, "tiles.parquet", info["fingerprint"], "radii")
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # never read as, or mixed with, embeddings of another fingerprint
    with pytest.raises(FingerprintMismatch):
        st.read_embeddings(TABLE, fingerprint=src_fp)


def test_a_killed_run_resumes_to_the_uninterrupted_table(store, tmp_path, monkeypatch):
    whole = _copy(store, tmp_path, "whole")
    killed = _copy(store, tmp_path, "killed")
    monkeypatch.setattr(ctx, "BLOCK_ROWS", 8)
    assert embed_context(whole, "builtin", progress=False).ok
    block_means = ctx._block_means
    calls = []

    def dies_at_the_second_block(*args):
        calls.append(1)
        if len(calls) > 1:
            raise _Killed
        return block_means(*args)

    monkeypatch.setattr(ctx, "_block_means", dies_at_the_second_block)
    with pytest.raises(_Killed):
        embed_context(killed, "builtin", progress=False)
    monkeypatch.setattr(ctx, "_block_means", block_means)
    st = open_store(killed)
    first, *rest = st.sql("SELECT DISTINCT slide_id FROM slides ORDER BY 1").slide_id
    assert st.slide_status(TABLE, "synthetic", first) == "partial"
    assert all(st.slide_status(TABLE, "synthetic", s) == "absent" for s in rest)
    report = embed_context(killed, "builtin", progress=False)
    assert [r.status for r in report.results] == ["done"] * 3
    (m1, v1), (m2, v2) = open_store(whole).read_embeddings(TABLE), open_store(killed).read_embeddings(TABLE)
    assert m1.equals(m2)
    np.testing.assert_array_equal(v1, v2)
    assert not any((killed / "_staging").rglob("part-*"))


def test_check_repair_recomputes_a_damaged_context_slide(store, tmp_path):
    from embedstore.embedding import check_store

    root = _copy(store, tmp_path)
    assert embed_context(root, "builtin", progress=False).ok
    before = open_store(root).read_embeddings(TABLE)
    victim = sorted((root / "embeddings" / f"encoder={TABLE}").rglob("tiles.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert not check_store(root).ok
    report = check_store(root, repair=True)
    assert report.ok, report.remaining
    assert any("context made again" in line for line in report.repaired)
    after = open_store(root).read_embeddings(TABLE)
    assert after[0].equals(before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_index_and_prediction_on_the_context_table(store, tmp_path):
    root = _copy(store, tmp_path)
    assert embed_context(root, "builtin", progress=False).ok
    ref = load_reference(root, TABLE, cohort="synthetic")
    assert ref.embeddings.shape[1] == 3 * open_store(root).read_embeddings("builtin")[1].shape[1]
    recipe = Recipe(
        name="ctx", encoder=TABLE, cohort="synthetic", aligner=None, panel=PanelSpec(n_genes=10),
        index=IndexSpec(factory="Flat", keys="image"), aggregator=AggregatorSpec(name="mean", k=5),
    )  # fmt: skip
    out = build_index(recipe, root, tmp_path / "ctx.index")
    idx = load_index(out)
    assert idx.manifest["embedstore.encoder"]["name"] == TABLE
    assert idx.fingerprint == open_store(root).encoder_metadata(TABLE)["fingerprint"]
    adata = predict(out, root, exclude_own="slide_id")
    assert adata.shape == (len(ref.embeddings), 10)
    assert np.isfinite(adata.X).all()
    assert set(adata.uns["spatial"]) == set(adata.obs["slide_id"])  # the H&E found through the context's source
    # the source table's embeddings are not this index's
    src_meta, src_emb = open_store(root).read_embeddings("builtin")
    with pytest.raises(BadInput):
        idx.predict(src_emb, k=5)
    with pytest.raises(FingerprintMismatch):
        idx.check_query(ref.embeddings, fingerprint=src_meta.column("fingerprint")[0].as_py())


def test_cli_context_and_its_one_line_errors(store, tmp_path):
    root = _copy(store, tmp_path)
    result = run("-q", "context", root, "--encoder", "builtin", "--radius", "300", "--radius", "700")
    assert result.returncode == 0, result.stderr
    assert "3 done" in result.stdout
    assert "builtin-ctx300-700" in result.stdout
    assert open_store(root).encoder_metadata("builtin-ctx300-700")["context"]["radii_um"] == [300.0, 700.0]
    assert_one_line_error(run("context", root, "--encoder", "nope"), "encoder nope", "builtin")
    assert_one_line_error(run("context", root, "--encoder", "builtin", "--radius", "600", "--radius", "250"), "radii")
    with pytest.raises(BadInput) as err:
        embed_context(root, "nope", progress=False)
    _one_line(err, "encoder nope", "embed with it first")


# --- smoothing -----------------------------------------------------------------------------


def _brute_graph(xy, r):
    n = len(xy)
    g = np.zeros((n, n))
    for i in range(n):
        near = [j for j in range(n) if j != i and np.hypot(*(xy[i] - xy[j])) <= r]
        for j in near:
            g[i, j] = 1.0 / len(near)
    return g


def test_neighbour_graph_and_smooth_match_brute_force():
    rng = np.random.default_rng(1)
    xy = np.vstack([rng.uniform(0, 600, size=(70, 2)), [[5000.0, 5000.0]]])  # the last tile is alone
    want = _brute_graph(xy, 110.0)
    graph = neighbour_graph(xy, 110.0)
    np.testing.assert_allclose(graph.toarray(), want, rtol=1e-6)
    assert graph[70].nnz == 0
    assert graph.diagonal().sum() == 0
    pred = rng.normal(size=(71, 4)).astype(np.float32)
    for alpha in (0.0, 0.3, 1.0):
        got = smooth(pred, graph, alpha)
        assert got.dtype == np.float32
        expected = np.array(pred, dtype=np.float64)
        for i in range(71):
            if want[i].any():
                expected[i] = (1 - alpha) * pred[i] + alpha * (want[i] @ pred)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[70], pred[70])  # no neighbour: its own prediction
    with pytest.raises(BadInput):
        smooth(pred, graph, 1.5)


def _smooth_field(xy, n_genes, rng):
    """Genes varying slowly over a slide (wavelengths of ~1 mm), so neighbours 100 µm apart agree."""
    k = rng.uniform(2 * np.pi / 1500, 2 * np.pi / 800, size=(n_genes, 2))
    phase = rng.uniform(0, 2 * np.pi, size=n_genes)
    return np.sin(xy @ k.T + phase)


def test_choose_alpha_smooths_noisy_predictions_and_leaves_exact_ones():
    rng = np.random.default_rng(2)
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2) * 100.0
    xy = np.vstack([grid, grid])  # two slides at the same coordinates
    groups = np.repeat(["s1", "s2"], len(grid))
    truth = np.vstack([_smooth_field(grid, 8, rng), _smooth_field(grid, 8, rng)])
    truth[groups == "s2", 0] = 3.0  # a gene constant on one slide: skipped there
    noisy = truth + rng.normal(0, 0.6, size=truth.shape)
    alpha, scores = choose_alpha(noisy, truth, xy, groups, radius_um=150.0)
    assert alpha > 0
    assert set(scores) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert scores[alpha] > scores[0.0] + 0.05
    # the score: mean over slides of the mean per-gene Pearson, each slide's graph its own
    for a in (0.0, 0.5):
        per_slide = []
        for s in ("s1", "s2"):
            rows = groups == s
            r = pearson_columns(smooth(noisy[rows], neighbour_graph(xy[rows], 150.0), a), truth[rows])
            per_slide.append(np.nanmean(r))
        assert scores[a] == pytest.approx(np.mean(per_slide), rel=1e-6)
    exact, scores = choose_alpha(truth, truth, xy, groups, radius_um=150.0)
    assert exact == 0.0
    assert scores[0.0] == pytest.approx(1.0)
    assert max(v for a, v in scores.items() if a) < 1.0
    # ties go to the smaller alpha: isolated tiles are never smoothed, every alpha scores the same
    far = np.column_stack([np.arange(50) * 1000.0, np.zeros(50)])
    tie, scores = choose_alpha(noisy[:50], truth[:50], far, np.zeros(50), radius_um=150.0, alphas=(0.75, 0.25, 0.5))
    assert tie == 0.25
    assert len(set(scores.values())) == 1
    with pytest.raises(BadInput):
        choose_alpha(noisy, truth, xy, groups[:10], radius_um=150.0)
