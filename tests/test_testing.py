"""The shipped synthetic generators: TIFF structure, determinism, cohort layout and expression signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import stats

from embedstore.slides import open_slide
from embedstore.testing import FEATURES, _render_region, _texture, write_synthetic_image, write_synthetic_slide


def test_synthetic_slide_is_a_tiled_page_pyramid(synthetic_slide_path):
    with tifffile.TiffFile(synthetic_slide_path) as tif:
        pages = list(tif.pages)
        assert [p.shape for p in pages] == [(1536, 2048, 3), (768, 1024, 3), (384, 512, 3)]
        assert [p.subfiletype for p in pages] == [0, 1, 1]
        assert all(p.is_tiled and p.compression == tifffile.COMPRESSION.ADOBE_DEFLATE for p in pages)
        assert pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = pages[0].tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(0.5)
        l0, l1 = pages[0].asarray(), pages[1].asarray()
    # each reduced level is the 2x2 box mean of the level above (rounded)
    ref = (l0.reshape(768, 2, 1024, 2, 3).astype(np.uint16).sum(axis=(1, 3)) + 2) // 4
    np.testing.assert_array_equal(l1, ref.astype(np.uint8))
    # tissue is darker and more coloured than glass, and has dark nuclei
    assert l0[768, 1024].astype(int).sum() < 3 * 235
    assert (l0.min(axis=2) < 120).mean() > 0.01


def test_synthetic_slide_is_deterministic_and_seeded(tmp_path):
    a = tifffile.imread(write_synthetic_slide(tmp_path / "a.tif", 700, 500, seed=3))
    b = tifffile.imread(write_synthetic_slide(tmp_path / "b.tif", 700, 500, seed=3))
    c = tifffile.imread(write_synthetic_slide(tmp_path / "c.tif", 700, 500, seed=4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_texture_is_continuous_across_tiles():
    tex = _texture(1024, 1024, 0.5, 1, False)
    _, whole = _render_region(tex, 300, 300, 200, 160)
    _, left = _render_region(tex, 300, 300, 77, 160)
    _, right = _render_region(tex, 377, 300, 123, 160)
    for key in ("tissue", "nuclei", "region"):
        np.testing.assert_array_equal(np.concatenate([left[key], right[key]], axis=1), whole[key])


def test_no_mpp_and_blank_slides(tmp_path):
    path = write_synthetic_slide(tmp_path / "nompp.tif", 600, 400, mpp=None)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
    blank = tifffile.imread(write_synthetic_slide(tmp_path / "blank.tif", 600, 400, blank=True))
    assert blank.min() >= 230
    assert (blank.max(axis=2).astype(int) - blank.min(axis=2)).max() <= 4  # grey: no stain


def test_plain_images(tmp_path):
    png = np.asarray(Image.open(write_synthetic_image(tmp_path / "x.png", 300, 200, seed=2)))
    jpg = np.asarray(Image.open(write_synthetic_image(tmp_path / "x.jpg", 300, 200, seed=2)))
    assert png.shape == jpg.shape == (200, 300, 3)
    assert np.abs(png.astype(int) - jpg).mean() < 6


def test_cohort_layout_and_signal(synthetic_cohort):
    cohort = synthetic_cohort
    assert len(cohort.sections) == 3
    assert [s.section for s in cohort.sections] == ["A1", "B1", "C1"]
    assert len(cohort.genes) == 50
    feats, logc = [], []
    for sec in cohort.sections:
        assert (
            sec.image_path
            == cohort.root / "data" / "ST-imgs" / sec.patient / sec.section / f"synthetic_HE_{sec.section}.tif"
        )
        counts = pd.read_csv(sec.counts_path, sep="\t", index_col=0)
        spots = pd.read_csv(sec.spots_path, sep="\t")
        assert list(spots.columns) == ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
        ids = [f"{x}x{y}" for x, y in zip(spots.x, spots.y, strict=True)]
        assert list(counts.index) == ids == sec.spot_ids
        assert list(counts.columns) == cohort.genes
        assert len(ids) >= 20
        np.testing.assert_array_equal(counts.to_numpy(), sec.counts)
        # 200 µm grid: neighbouring spots are 200 / mpp px apart
        step = np.diff(np.sort(np.unique(spots.x)))
        assert (step >= 1).all()
        dx = np.polyfit(spots.new_x, spots.pixel_x, 1)[0]
        assert dx == pytest.approx(200 / sec.mpp, rel=0.01)
        with open_slide(sec.image_path) as s:
            assert s.mpp == pytest.approx(sec.mpp)
            # spots lie on tissue: darker than the glass corner
            centre = np.stack([s.read_region(int(x) - 20, int(y) - 20, 0, 40, 40).mean() for x, y in sec.centers_xy])
            assert (centre < s.read_region(0, 0, 0, 40, 40).mean() - 15).all()
        feats.append(sec.features)
        logc.append(np.log1p(sec.counts / sec.counts.sum(axis=1, keepdims=True) * 1e4))
    feats, logc = np.concatenate(feats), np.concatenate(logc)
    # genes whose main driver is nuclear density follow it (Spearman, pooled over the cohort)
    k = FEATURES.index("nuclear_density")
    driven = np.arange(k, 50, len(FEATURES) + 1)
    rho = [abs(stats.spearmanr(feats[:, k], logc[:, g])[0]) for g in driven]
    assert np.median(rho) > 0.4
