"""Stain robustness: Macenko normalisation (embedstore.stain), ``embed(stain_norm=...)`` and stain/blur in the generators."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

import embedstore as es
from embedstore import stain
from embedstore._schema import Col
from embedstore.errors import BadInput, FingerprintMismatch
from embedstore.slides import open_slide
from embedstore.testing import (
    STAIN_PRESETS,
    make_synthetic_cohort,
    write_synthetic_image,
    write_synthetic_slide,
)

# A stain far from the reference: redder hematoxylin, stronger and bluer eosin (OD vectors, columns H, E).
SHIFTED = np.array([[0.75, 0.30], [0.55, 1.10], [0.30, 0.35]])


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=0)


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------------- the method


def test_the_same_stain_and_image_as_torchstain(tmp_path):
    """A published implementation: torchstain's NumPy Macenko (adapted from Macenko's MATLAB code via HEnorm_python).

    torchstain's defaults are Macenko's (Io=240, alpha=1, beta=0.15): passed explicitly on both sides.
    Its reconstruction is ``Io * exp(-OD)`` truncated, ours ``Io * exp(-OD) - 1`` rounded (the exact
    inverse of OD = -log((I + 1) / Io)): the images differ by at most one grey level.
    """
    torchstain = pytest.importorskip("torchstain", reason="dev dependency: pip install -e '.[dev]'")
    rgb = _png(write_synthetic_image(tmp_path / "he.png", 512, 512, seed=4))
    theirs = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    assert np.array_equal(theirs.HERef, stain.REFERENCE.matrix)  # the same reference stain
    assert np.array_equal(theirs.maxCRef, stain.REFERENCE.max_conc)

    matrix, _, max_conc = theirs._NumpyMacenkoNormalizer__compute_matrices(rgb.reshape(-1, 3), 240, 1, 0.15)
    mine = stain.estimate_stains(rgb, Io=240, alpha=1, beta=0.15)
    cos = np.abs((_unit(matrix) * mine.matrix).sum(axis=0))  # up to sign
    assert cos.min() > 1 - 1e-9, (matrix, mine.matrix)
    np.testing.assert_allclose(mine.max_conc, max_conc, rtol=1e-9)

    expected, _, _ = theirs.normalize(rgb, Io=240, alpha=1, beta=0.15, stains=False)
    got = stain.normalize(rgb, mine, stain.REFERENCE, Io=240)
    diff = got.astype(np.int16) - expected
    assert got.shape == rgb.shape
    assert got.dtype == np.uint8
    assert np.abs(diff).max() <= 1
    assert _mad(got, expected) < 0.6


def test_known_stain_vectors_are_recovered():
    """Beer–Lambert with a chosen stain matrix and random concentrations: the vectors come back (H first)."""
    rng = np.random.default_rng(0)
    true = _unit(np.array([[0.65, 0.25], [0.70, 0.85], [0.29, 0.46]]))
    n = 40_000
    conc = rng.gamma(2.0, 0.35, size=(2, n))
    conc[1, : n // 5] *= 0.02  # some nearly pure hematoxylin and nearly pure eosin pixels, as in tissue
    conc[0, n // 5 : 2 * n // 5] *= 0.02
    light = 240 * np.exp(-(true @ conc)) - 1
    rgb = np.clip(np.rint(light + rng.normal(0, 1.0, light.shape)), 0, 255).astype(np.uint8).T.reshape(200, 200, 3)

    params = stain.estimate_stains(rgb)
    cos = (params.matrix * true).sum(axis=0)
    assert cos.min() > 0.99, cos
    np.testing.assert_allclose(np.linalg.norm(params.matrix, axis=0), 1.0)
    assert params.matrix[0, 0] > params.matrix[0, 1]  # hematoxylin: the larger red OD
    again = stain.estimate_stains(rgb.copy())
    assert np.array_equal(again.matrix, params.matrix)
    assert np.array_equal(again.max_conc, params.max_conc)


def test_an_image_in_the_reference_stain_is_left_nearly_unchanged():
    """Reference vectors and concentrations at the reference's percentiles: normalising changes next to nothing."""
    rng = np.random.default_rng(1)
    n = 40_000
    conc = rng.gamma(2.0, 0.35, size=(2, n))
    conc[1, : n // 5] *= 0.02
    conc[0, n // 5 : 2 * n // 5] *= 0.02
    conc *= (stain.REFERENCE.max_conc / np.percentile(conc, 99, axis=1))[:, None]
    light = 240 * np.exp(-(stain.REFERENCE.matrix @ conc)) - 1
    rgb = np.clip(np.rint(light), 0, 255).astype(np.uint8).T.reshape(200, 200, 3)

    params = stain.estimate_stains(rgb)
    assert (params.matrix * _unit(stain.REFERENCE.matrix)).sum(axis=0).min() > 0.995
    out = stain.normalize(rgb, params)
    assert _mad(out, rgb) < 1.5
    # the same stain in and out: only the rounding of the input (off the stain plane) is lost
    assert np.abs(stain.normalize(rgb, stain.REFERENCE, stain.REFERENCE).astype(np.int16) - rgb).max() <= 1


def test_two_stains_of_the_same_tissue_come_together(tmp_path):
    a = _png(write_synthetic_image(tmp_path / "a.png", 512, 512, seed=2, stain_matrix="reference"))
    b = _png(write_synthetic_image(tmp_path / "b.png", 512, 512, seed=2, stain_matrix=SHIFTED))
    na = stain.normalize(a, stain.estimate_stains(a))
    nb = stain.normalize(b, stain.estimate_stains(b))
    raw, normed = _mad(a, b), _mad(na, nb)
    assert raw > 8
    assert normed < 0.25 * raw, (raw, normed)


def test_a_batch_is_normalised_as_its_tiles_are():
    rng = np.random.default_rng(2)
    tiles = rng.integers(60, 250, size=(3, 16, 16, 3), dtype=np.uint8)
    params = stain.StainParams(_unit(SHIFTED), [1.5, 0.9])
    batch = stain.normalize(tiles, params)
    assert all(np.array_equal(batch[i], stain.normalize(tiles[i], params)) for i in range(3))
    then = stain.StainTransform(params, stain.REFERENCE, lambda x: x.astype(np.float32) / 255)
    assert np.array_equal(then(tiles), batch.astype(np.float32) / 255)
    assert np.array_equal(stain.StainParams.from_array(params.to_array()).to_array(), params.to_array())


def test_nothing_to_estimate_is_one_line():
    with pytest.raises(BadInput, match="stained pixels"):
        stain.estimate_stains(np.full((64, 64, 3), 240, np.uint8))
    with pytest.raises(BadInput, match="cannot be told apart"):  # one colour only: no second stain
        stain.estimate_stains(np.full((64, 64, 3), (120, 60, 140), np.uint8))
    with pytest.raises(BadInput, match="uint8 RGB"):
        stain.estimate_stains(np.zeros((8, 8, 3), np.float32))


def test_a_slides_stain_is_fitted_once_on_its_tissue(tmp_path):
    path = write_synthetic_slide(tmp_path / "pink.tif", 2048, 2048, seed=5, stain_matrix="pink")
    with open_slide(path) as slide:
        params = stain.slide_stain_params(slide, 0.5)
        again = stain.slide_stain_params(slide, 0.5)
    assert np.array_equal(params.to_array(), again.to_array())  # deterministic
    assert (params.matrix * _unit(STAIN_PRESETS["pink"])).sum(axis=0).min() > 0.98
    # a slide in the reference stain is nearly unchanged by normalisation; a shifted one is moved a lot
    ref = write_synthetic_slide(tmp_path / "ref.tif", 2048, 2048, seed=5, stain_matrix="reference")
    with open_slide(ref) as slide:
        tile = slide.read_region(700, 700, 0, 512, 512)
        assert _mad(stain.normalize(tile, stain.slide_stain_params(slide, 0.5)), tile) < 6
    with open_slide(path) as slide:
        pink = slide.read_region(700, 700, 0, 512, 512)
    assert _mad(stain.normalize(pink, params), tile) < 0.5 * _mad(pink, tile)


# ----------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def stained(tmp_path_factory):
    """One tissue scanned twice: in the reference stain and in a shifted one (same seed)."""
    folder = tmp_path_factory.mktemp("stain_slides") / "pair"
    folder.mkdir()
    write_synthetic_slide(folder / "ref.tif", 1536, 1536, seed=7, stain_matrix="reference")
    write_synthetic_slide(folder / "shift.tif", 1536, 1536, seed=7, stain_matrix=SHIFTED)
    return folder


@pytest.fixture(scope="module")
def store(stained, tmp_path_factory):
    """Cohort ``raw`` embedded as read, cohort ``norm`` with Macenko normalisation, in one store."""
    root = tmp_path_factory.mktemp("stain_store") / "store"
    for cohort, norm in (("raw", None), ("norm", "macenko")):
        report = es.embed(stained, root, cohort=cohort, progress=False, workers=0, stain_norm=norm)
        assert report.ok, report.summary()
    return root


def _meta(root: Path, cohort: str) -> dict:
    return es.open_store(root).encoder_metadata("builtin", cohort)


def test_stain_norm_changes_the_fingerprint_and_only_then(store):
    enc = es.create_encoder("builtin")
    raw, norm = _meta(store, "raw"), _meta(store, "norm")
    assert raw["fingerprint"] == enc.fingerprint  # without stain_norm: the encoder's own, as before
    assert "stain_norm" not in raw
    assert "encoder_fingerprint" not in raw
    assert norm["fingerprint"] != enc.fingerprint
    assert norm["encoder_fingerprint"] == enc.fingerprint
    assert norm["stain_norm"]["method"] == "macenko"
    assert norm["stain_norm"]["target"] == stain.REFERENCE.to_dict()
    assert stain.stain_metadata(enc.metadata(), None) == enc.metadata()
    # the recorded source says how to embed the slide again (check --repair)
    st = es.open_store(store)
    assert st.slide_source("builtin", "norm", "ref")["stain_norm"] == "macenko"
    assert "stain_norm" not in st.slide_source("builtin", "raw", "ref")


def test_normalised_and_raw_embeddings_are_never_mixed(store, stained):
    st = es.open_store(store)
    st.read_embeddings("builtin", cohort="raw")
    st.read_embeddings("builtin", cohort="norm")
    with pytest.raises(FingerprintMismatch):
        st.read_embeddings("builtin", cohort=["raw", "norm"])
    # embedding with normalisation over slides stored without it: each slide fails, naming both fingerprints
    report = es.embed(stained, store, cohort="raw", progress=False, workers=0, stain_norm="macenko")
    assert [r.status for r in report.results] == ["failed", "failed"]
    assert all("fingerprint" in r.reason for r in report.results)


def test_normalisation_brings_the_embeddings_of_two_stains_together(store):
    st = es.open_store(store)

    def by_tile(cohort: str) -> dict[str, dict[tuple[int, int], np.ndarray]]:
        meta, emb = st.read_embeddings("builtin", cohort=cohort)
        out: dict[str, dict] = {"ref": {}, "shift": {}}
        for s, x, y, e in zip(
            meta[Col.SLIDE_ID].to_pylist(), meta[Col.X].to_pylist(), meta[Col.Y].to_pylist(), emb, strict=True
        ):
            out[s][(x, y)] = e
        return out

    raw, norm = by_tile("raw"), by_tile("norm")
    common = sorted(set(raw["ref"]) & set(raw["shift"]) & set(norm["ref"]) & set(norm["shift"]))
    assert len(common) >= 15
    # one yardstick for both: the spread of the features over the tissue of the reference-stained slide
    scale = np.stack([raw["ref"][k] for k in common]).std(axis=0) + 1e-6

    def distance(d: dict) -> float:
        return float(np.mean([np.linalg.norm((d["ref"][k] - d["shift"][k]) / scale) for k in common]))

    assert distance(norm) < 0.6 * distance(raw), (distance(norm), distance(raw))


def test_a_slide_without_stain_fails_alone(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    pale = np.full((768, 768, 3), 250, np.uint8)
    pale[150:600, 150:600] = (240, 240, 200)  # coloured enough to be tissue, too pale to hold a stain
    Image.fromarray(pale).save(folder / "pale.png")
    write_synthetic_image(folder / "good.png", 768, 768, seed=3)
    report = es.embed(folder, tmp_path / "store", mpp=0.5, progress=False, workers=0, stain_norm="macenko")
    status = {r.slide_id: r for r in report.results}
    assert status["good"].status == "done"
    assert status["pale"].status == "failed"
    assert "stained pixels" in status["pale"].reason
    assert "\n" not in status["pale"].reason


def test_an_unknown_method_is_refused_before_anything_is_written(stained, tmp_path):
    with pytest.raises(BadInput, match="stain_norm='reinhard'"):
        es.embed(stained, tmp_path / "store", progress=False, stain_norm="reinhard")
    assert not (tmp_path / "store").exists()


def test_check_repair_embeds_a_damaged_slide_again_with_its_stain(store, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(store, root)
    path = next((root / "embeddings" / "encoder=builtin" / "cohort=norm").rglob("tiles.parquet"))
    before = pq.read_table(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = es.check_store(root, repair=True, workers=0)
    assert report.ok, report.remaining
    after = pq.read_table(path)
    assert after.equals(before)  # the same normalised embeddings, with the stain's fingerprint


def test_the_ray_engine_reads_tiles_normalised_as_the_local_engine(stained):
    """The Ray engine's pieces, without a cluster: the tile-table task fits the stain, the reading task applies it."""
    from embedstore import ray_embed, tiling
    from embedstore.slide_jobs import EmbedSettings, SlideJob

    settings = EmbedSettings(
        data=stained, cohort="pair", encoder="builtin", weights=None, target_mpp=0.5, size_px=224, min_tissue=0.25,
        device="cpu", batch_size=4, workers=0, loader="threads", progress=False, stain_norm="macenko",
    )  # fmt: skip
    job = SlideJob("shift", stained / "shift.tif")
    tiles = ray_embed._tile_table_task(job, settings)
    with open_slide(job.path) as slide:
        expected = stain.slide_stain_params(slide, 0.5)
    assert np.array_equal(ray_embed._stain(tiles), expected.to_array())
    rows = np.arange(min(6, tiles.num_rows))
    batch = {
        "slide": np.zeros(1, np.int32), "path": np.array([str(job.path)]), "slide_mpp": np.array([np.nan]),
        "rows": [rows], "x": [tiles[Col.X].to_numpy()[rows]], "y": [tiles[Col.Y].to_numpy()[rows]],
        "mpp": [tiles[Col.MPP].to_numpy()[rows]], "size_px": [tiles[Col.SIZE_PX].to_numpy()[rows]],
        "stain": [ray_embed._stain(tiles)],
    }  # fmt: skip
    images = np.concatenate([b["image"] for b in ray_embed.read_tiles(batch, batch_size=4)])
    reader = tiling.TileReader(job.path, tiles)
    local = stain.StainTransform(expected)(np.stack([reader[int(i)] for i in rows]))
    assert np.array_equal(images, local)
    plain = dict(batch, stain=[np.full(8, np.nan)])
    raw = np.concatenate([b["image"] for b in ray_embed.read_tiles(plain, batch_size=4)])
    assert np.array_equal(raw, np.stack([reader[int(i)] for i in rows]))


@pytest.mark.slow  # a local Ray cluster: about a minute on 2 cores
def test_the_ray_engine_writes_the_local_engines_normalised_table(stained, store, tmp_path):
    pytest.importorskip("ray")
    root = tmp_path / "ray"
    report = es.embed(stained, root, cohort="norm", progress=False, batch_size=8, engine="ray", stain_norm="macenko")
    assert report.ok, report.summary()
    for slide_id in ("ref", "shift"):
        mine = pq.read_table(next((root / "embeddings").rglob(f"slide_id={slide_id}/tiles.parquet")))
        local = pq.read_table(
            next((store / "embeddings" / "encoder=builtin" / "cohort=norm").rglob(f"slide_id={slide_id}/tiles.parquet"))
        )
        assert mine.equals(local)


# ----------------------------------------------------------------------------------- the generators


def test_patients_get_their_own_stain_and_expression_stays_that_of_the_tissue(tmp_path):
    kwargs = {"n_slides": 2, "n_spots": 8, "n_genes": 6, "width": 900, "height": 900, "seed": 1}
    plain = make_synthetic_cohort(tmp_path / "plain", **kwargs)
    shifted = make_synthetic_cohort(tmp_path / "shifted", stain_shift=0.3, blur_sigma_px=[0.0, 1.5], **kwargs)
    a, b = shifted.sections
    assert a.stain_matrix is not None
    assert b.stain_matrix is not None
    assert (_unit(a.stain_matrix) * _unit(b.stain_matrix)).sum(axis=0).min() < 0.99  # different stains
    assert (a.blur_sigma_px, b.blur_sigma_px) == (0.0, 1.5)
    assert plain.sections[0].stain_matrix is None
    assert plain.sections[0].blur_sigma_px == 0.0
    for p, s in zip(plain.sections, shifted.sections, strict=True):
        # the same tissue, spots, features and counts: only the look of the slide changed
        assert np.array_equal(p.features, s.features)
        assert np.array_equal(p.counts, s.counts)
        assert np.array_equal(p.centers_xy, s.centers_xy)
        assert not np.array_equal(tifffile.imread(p.image_path), tifffile.imread(s.image_path))
    # the slide's stain is the one recorded for its patient
    with open_slide(a.image_path) as slide:
        fitted = stain.slide_stain_params(slide, 0.5)
    assert (fitted.matrix * _unit(a.stain_matrix)).sum(axis=0).min() > 0.97


def _high_frequency(rgb: np.ndarray) -> float:
    grey = rgb.astype(np.float64).mean(axis=2)
    return float((np.diff(grey, axis=0) ** 2).mean() + (np.diff(grey, axis=1) ** 2).mean())


def test_blur_removes_high_frequencies(tmp_path):
    sharp = _png(write_synthetic_image(tmp_path / "a.png", 384, 384, seed=6, stain_matrix="reference"))
    blurred = _png(
        write_synthetic_image(tmp_path / "b.png", 384, 384, seed=6, stain_matrix="reference", blur_sigma_px=2)
    )
    assert _high_frequency(blurred) < 0.6 * _high_frequency(sharp)
    assert abs(float(blurred.mean()) - float(sharp.mean())) < 1.5  # the same light, only spread
    # tiles of a blurred slide agree at their borders (the margin is rendered, not padded)
    path = write_synthetic_slide(tmp_path / "blur.tif", 768, 768, seed=6, blur_sigma_px=2, tile_size=256)
    whole = _png(write_synthetic_image(tmp_path / "c.png", 768, 768, seed=6, blur_sigma_px=2))
    with tifffile.TiffFile(path) as tif:
        level0 = tif.pages[0].asarray()
    assert np.abs(level0.astype(np.int16) - whole).max() <= 8  # the same light; the sensor noise is per tile


def test_bad_looks_are_one_line(tmp_path):
    with pytest.raises(BadInput, match="not a preset"):
        write_synthetic_slide(tmp_path / "x.tif", 256, 256, stain_matrix="purple")
    with pytest.raises(BadInput, match="3 x 2"):
        write_synthetic_slide(tmp_path / "x.tif", 256, 256, stain_matrix=np.ones((2, 3)))
    with pytest.raises(BadInput, match="blur_sigma_px"):
        write_synthetic_slide(tmp_path / "x.tif", 256, 256, blur_sigma_px=-1)
    with pytest.raises(BadInput, match="patients"):
        make_synthetic_cohort(tmp_path / "c", n_slides=2, blur_sigma_px=[1.0, 2.0, 3.0])


# Computed with embedstore.testing before stain and blur existed: the defaults must give the same pixels.
DEFAULT_SLIDE_SHA256 = "aea02dea1ba56b38c3331ae2d3544e7212e302f89f15dc7f146b3ba7b5361933"
DEFAULT_IMAGE_SHA256 = "065a6cc1faea8572017ea95e12a9c14ff3c8be4e46029a14b852d8021a0d2417"
DEFAULT_COHORT_SHA256 = "c81d7055895d3fac2a6d143ab197d4e742018132aa063310c60e339e789d7a93"


def test_the_defaults_are_unchanged(tmp_path):
    """Pixels (every pyramid level), features and counts hash as they did (pixels, not file bytes: zlib may differ)."""
    path = write_synthetic_slide(tmp_path / "a.tif", 1024, 768, seed=3)
    with tifffile.TiffFile(path) as tif:
        assert hashlib.sha256(b"".join(p.asarray().tobytes() for p in tif.pages)).hexdigest() == DEFAULT_SLIDE_SHA256
    image = _png(write_synthetic_image(tmp_path / "a.png", 300, 200, seed=5))
    assert hashlib.sha256(image.tobytes()).hexdigest() == DEFAULT_IMAGE_SHA256
    cohort = make_synthetic_cohort(tmp_path / "c", n_slides=2, n_spots=8, n_genes=6, width=900, height=900, seed=1)
    h = hashlib.sha256()
    for s in cohort.sections:
        h.update(s.features.tobytes())
        h.update(s.counts.tobytes())
        h.update(s.centers_xy.tobytes())
        h.update(tifffile.TiffFile(s.image_path).pages[0].asarray().tobytes())
    assert h.hexdigest() == DEFAULT_COHORT_SHA256


def test_a_query_picture_is_normalised_as_the_stores_tiles_were(store, tmp_path):
    """Searching a normalised store by picture: the picture is fitted and normalised to the same target."""
    from PIL import Image

    from embedstore.retrieval import _stored_tile
    from embedstore.stain import REFERENCE, estimate_stains, normalize

    st = es.open_store(store)
    meta, emb = st.read_embeddings("builtin", cohort="norm", columns=["slide_id", "tile_id"])
    tile = meta.column("tile_id")[len(emb) // 2].as_py()
    picture = _stored_tile(st, "builtin", "norm", "shift", tile)  # as scanned, not normalised
    Image.fromarray(picture).save(tmp_path / "query.png")
    q = es.create_encoder("builtin").encode(normalize(picture, estimate_stains(picture), REFERENCE)[None])[0]
    scores = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    order = np.argsort(-scores, kind="stable")[:3]
    hits = es.search(store, image=tmp_path / "query.png", cohort="norm", k=3)
    assert hits.column("tile_id").to_pylist() == [meta.column("tile_id")[i].as_py() for i in order]
    np.testing.assert_allclose(hits.column("score").to_numpy(), scores[order], rtol=1e-4, atol=1e-5)


def test_text_of_the_same_checkpoint_pairs_with_normalised_images():
    from embedstore.errors import FingerprintMismatch
    from embedstore.stain import stain_metadata
    from embedstore.text_embedding import check_text_pairs

    image = {"name": "omiclip", "fingerprint": "abc"}
    normalised = stain_metadata(image, "macenko")
    check_text_pairs(normalised, {"image_fingerprint": "abc"}, "text")  # the checkpoint's own fingerprint
    with pytest.raises(FingerprintMismatch):
        check_text_pairs(normalised, {"image_fingerprint": normalised["fingerprint"]}, "text")
