"""Slides: OpenSlide and Pillow backends against tifffile / PIL references, µm/px, tissue mask, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
from PIL import Image

from embedstore.errors import BadInput
from embedstore.slides import lookup_mpp, open_slide, read_mpp_csv, tissue_mask
from embedstore.testing import _texture, write_synthetic_image, write_synthetic_slide


@pytest.fixture(scope="module")
def level_arrays(synthetic_slide_path):
    """Every pyramid level as a numpy array, read by tifffile (a reader independent of OpenSlide)."""
    with tifffile.TiffFile(synthetic_slide_path) as tif:
        return [p.asarray() for p in tif.pages]


def test_openslide_reads_synthetic_pyramid(synthetic_slide_path, level_arrays):
    with open_slide(synthetic_slide_path) as s:
        assert s.backend == "openslide"
        assert s.slide_id == "synthetic"
        assert s.mpp == pytest.approx(0.5)
        assert s.dimensions == (2048, 1536)
        assert s.level_count == 3
        assert s.level_downsamples == pytest.approx([1, 2, 4])
        assert s.level_dimensions == [(a.shape[1], a.shape[0]) for a in level_arrays]
        assert s.level_mpp(2) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("x", "y", "level", "w", "h"),
    [(300, 200, 0, 97, 64), (1000, 700, 1, 50, 40), (-20, -10, 0, 60, 30), (2000, 1500, 0, 100, 80)],
)
def test_read_region_equals_tifffile_crop(synthetic_slide_path, level_arrays, x, y, level, w, h):
    ref = level_arrays[level]
    ds = 2**level
    expected = np.full((h, w, 3), 255, np.uint8)  # outside the slide is white
    lx, ly = x // ds, y // ds
    H, W = ref.shape[:2]
    x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
    expected[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = ref[y0:y1, x0:x1]
    with open_slide(synthetic_slide_path) as s:
        got = s.read_region(x, y, level, w, h)
    assert got.dtype == np.uint8
    assert got.flags.writeable
    assert got.shape == (h, w, 3)
    np.testing.assert_array_equal(got, expected)


def test_best_level_for_mpp(synthetic_slide_path):
    with open_slide(synthetic_slide_path) as s:
        got = [s.best_level_for_mpp(m) for m in (0.25, 0.5, 0.75, 1.0, 1.99, 2.0, 3.0, 100.0)]
    assert got == [0, 0, 0, 1, 1, 2, 2, 2]


def test_mpp_argument_overrides_metadata(synthetic_slide_path):
    with open_slide(synthetic_slide_path, mpp=0.25, slide_id="s1") as s:
        assert s.mpp == 0.25
        assert s.slide_id == "s1"


def test_thumbnail_and_slide_not_picklable(synthetic_slide_path):
    with open_slide(synthetic_slide_path) as s:
        th = s.thumbnail(256)
        assert th.size == (256, 192)
        assert th.mode == "RGB"
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(s)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_plain_images(tmp_path, suffix):
    path = write_synthetic_image(tmp_path / f"img{suffix}", 640, 480, seed=3)
    with pytest.raises(BadInput) as err:
        open_slide(path)
    assert (
        str(err.value)
        == f"{path}: no µm/px in the metadata; pass mpp=... (--mpp) or a CSV with columns slide,mpp (--mpp-csv)"
    )
    ref = np.asarray(Image.open(path).convert("RGB"))
    with open_slide(path, mpp=0.8) as s:
        assert s.backend == "pillow"
        assert s.dimensions == (640, 480)
        assert s.level_count == 1
        assert s.mpp == 0.8
        np.testing.assert_array_equal(s.read_region(100, 50, 0, 30, 20), ref[50:70, 100:130])
        edge = s.read_region(630, 470, 0, 20, 20)
        np.testing.assert_array_equal(edge[:10, :10], ref[470:, 630:])
        assert (edge[10:] == 255).all()
        assert (edge[:, 10:] == 255).all()
        assert max(s.thumbnail(100).size) == 100


def test_plain_stripped_tiff_mpp_from_resolution_tags(tmp_path):
    path = tmp_path / "strip.tif"
    arr = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    tifffile.imwrite(path, arr, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.backend == "pillow"
        assert s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 160, 120), arr)


def test_her2st_jpeg_opens_with_explicit_mpp(shared_data):
    path = shared_data / "her2st" / "data" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
    with pytest.raises(BadInput, match="no µm/px in the metadata; pass mpp="):
        open_slide(path)
    with open_slide(path, mpp=0.69) as s:
        assert s.dimensions == (9274, 9911)
        assert s.backend == "pillow"
        tile = s.read_region(6930 - 50, 3510 - 50, 0, 100, 100)  # around spot 25x13
        assert tile.shape == (100, 100, 3)
        corner = s.read_region(0, 0, 0, 100, 100)
        assert tile.mean() < corner.mean()  # tissue is darker than glass
        mask, ds = tissue_mask(s)
        assert mask[int(3510 / ds), int(6930 / ds)]
        assert not mask[5, 5]


def test_tissue_mask_matches_drawn_blob(synthetic_slide_path):
    with open_slide(synthetic_slide_path) as s:
        mask, ds = tissue_mask(s, target_size=512)
    assert ds == pytest.approx(2048 / mask.shape[1])
    # reference: the blob the generator drew, evaluated at the mask's pixel centres
    tex = _texture(2048, 1536, 0.5, 7, False)
    xs = (np.arange(mask.shape[1]) + 0.5) * ds
    ys = (np.arange(mask.shape[0]) + 0.5) * ds
    truth = tex.tissue(xs, ys)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95


def test_blank_slide_has_no_tissue(tmp_path):
    path = write_synthetic_slide(tmp_path / "glass.tif", 1024, 768, blank=True)
    with open_slide(path) as s, pytest.raises(BadInput) as err:
        tissue_mask(s)
    assert (
        str(err.value)
        == f"{path}: no tissue found (the slide looks blank); check the file, or give spot or tile coordinates instead of tissue detection"
    )


def test_bad_input_messages(tmp_path, synthetic_slide_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(BadInput) as err:
        open_slide(missing)
    assert str(err.value) == f"{missing}: no such file; check the path"

    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    with pytest.raises(BadInput) as err:
        open_slide(text, mpp=0.5)
    assert (
        str(err.value)
        == f"{text}: not a slide or image that OpenSlide or Pillow can read; give an SVS/NDPI/MRXS/pyramidal TIFF or a JPEG/PNG/TIFF"
    )

    fake_svs = tmp_path / "broken.svs"
    fake_svs.write_bytes(b"\x00" * 100)
    with pytest.raises(BadInput) as err:
        open_slide(fake_svs)
    assert (
        str(err.value)
        == f"{fake_svs}: OpenSlide does not recognise this .svs file; it may be truncated, or re-export it"
    )

    nompp = write_synthetic_slide(tmp_path / "nompp.tif", 600, 500, mpp=None)
    with pytest.raises(BadInput) as err:
        open_slide(nompp)
    assert (
        str(err.value)
        == f"{nompp}: no µm/px in the metadata; pass mpp=... (--mpp) or a CSV with columns slide,mpp (--mpp-csv)"
    )
    with open_slide(nompp, mpp=0.5) as s:
        assert s.level_count == 2

    with pytest.raises(BadInput) as err:
        open_slide(synthetic_slide_path, mpp=-1)
    assert (
        str(err.value)
        == f"{synthetic_slide_path}: mpp=-1 is not a plausible µm/px (expected 0.05-30); pass the level-0 µm/px"
    )


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_truncated_images(tmp_path, suffix):
    if suffix == ".tif":
        full = write_synthetic_slide(tmp_path / f"full{suffix}", 1024, 1024, seed=1)
    else:
        full = write_synthetic_image(tmp_path / f"full{suffix}", 512, 512, seed=1)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        BadInput, match=r"^.*cut\.\w+: truncated or corrupt image \(.*\); copy or export the file again$"
    ):
        open_slide(cut, mpp=0.5)


def test_read_mpp_csv(tmp_path):
    good = tmp_path / "mpp.csv"
    good.write_text("slide,mpp\nA1.svs,0.25\nB1,0.5\n")
    table = read_mpp_csv(good)
    assert table == {"A1.svs": 0.25, "B1": 0.5}
    assert lookup_mpp(table, "/data/A1.svs") == 0.25
    assert lookup_mpp(table, "/data/B1.tif") == 0.5
    assert lookup_mpp(table, "/data/x.tif", slide_id="B1") == 0.5
    assert lookup_mpp(table, "/data/C1.tif") is None

    cols = tmp_path / "cols.csv"
    cols.write_text("name,um\nA1,0.25\n")
    with pytest.raises(BadInput) as err:
        read_mpp_csv(cols)
    assert str(err.value) == f"{cols}: columns are ['name', 'um']; the CSV needs columns slide,mpp"

    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\nA1,0.25\nB1,abc\n")
    with pytest.raises(BadInput) as err:
        read_mpp_csv(bad)
    assert (
        str(err.value) == f"{bad}: line 3 has slide='B1' mpp='abc'; give a slide name and a µm/px between 0.05 and 30"
    )


def test_tissue_mask_reads_a_coarse_level_only(tmp_path, monkeypatch):
    # what keeps a 100,000 px slide fast: the mask never touches full-resolution levels
    path = write_synthetic_slide(tmp_path / "big.tif", 2048, 2048, seed=2, min_level_size=128)
    calls = []
    with open_slide(path) as s:
        original = s.read_region_image

        def spy(x, y, level, w, h):
            calls.append((level, w, h))
            return original(x, y, level, w, h)

        monkeypatch.setattr(s, "read_region_image", spy)
        mask, ds = tissue_mask(s, target_size=512)
    assert calls == [(3, 256, 256)]  # the coarsest level at least target_size / 2 wide
    assert mask.shape == (256, 256)
    assert ds == 8.0
