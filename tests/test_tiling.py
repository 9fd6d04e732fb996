"""Tiling: grid over tissue, spot-centred tiles, resampling from the pyramid, padding, parallel reads."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from embedstore._schema import META_KIND, Col, tile_id, tile_schema
from embedstore.errors import BadInput
from embedstore.preview import draw_tile_preview
from embedstore.slides import open_slide
from embedstore.testing import _texture, write_synthetic_slide
from embedstore.tile_table import read_tile_table, write_tile_table
from embedstore.tiling import TileReader, grid_tiles, iter_tile_batches, spot_tiles


@pytest.fixture(scope="module")
def level0(synthetic_slide_path):
    return tifffile.imread(synthetic_slide_path, key=0)


@pytest.fixture(scope="module")
def slide(synthetic_slide_path):
    with open_slide(synthetic_slide_path) as s:
        yield s


def _box_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f, a.shape[1] // f
    return a[: h * f, : w * f].reshape(h, f, w, f, 3).astype(np.float64).mean(axis=(1, 3))


def test_grid_covers_tissue_only(slide):
    table = grid_tiles(slide, target_mpp=0.5, size_px=128, min_tissue=0.5)
    assert table.schema.equals(tile_schema())
    side = 128
    # reference: tissue fraction of each tile footprint from the blob the generator drew
    tex = _texture(2048, 1536, 0.5, 7, False)
    xs = np.arange(0, 2048, 4) + 2.0
    ys = np.arange(0, 1536, 4) + 2.0
    truth = tex.tissue(xs, ys)
    step = side // 4
    frac = {}
    for gy in range(0, 1536 // side):
        for gx in range(0, 2048 // side):
            frac[(gx * side + side // 2, gy * side + side // 2)] = truth[
                gy * step : (gy + 1) * step, gx * step : (gx + 1) * step
            ].mean()
    got = set(zip(table[Col.X].to_pylist(), table[Col.Y].to_pylist(), strict=True))
    assert got <= set(frac)
    for key, f in frac.items():
        if f > 0.7:
            assert key in got, f"tile {key} is {f:.0%} tissue but was not kept"
        if f < 0.3:
            assert key not in got, f"tile {key} is {f:.0%} tissue but was kept"
    assert table[Col.TILE_ID].to_pylist() == [
        tile_id(x, y) for x, y in zip(table[Col.X].to_pylist(), table[Col.Y].to_pylist(), strict=True)
    ]
    assert set(table[Col.SPOT_ID].to_pylist()) == {None}
    assert not any(table[Col.PADDED].to_pylist())


def test_tile_ids_stable_over_two_runs(synthetic_slide_path):
    runs = []
    for _ in range(2):
        with open_slide(synthetic_slide_path) as s:
            runs.append(grid_tiles(s))
    assert runs[0].equals(runs[1])
    assert runs[0].num_rows > 20
    assert len(set(runs[0][Col.TILE_ID].to_pylist())) == runs[0].num_rows


def test_spot_tiles_are_centred(slide, level0):
    centers = np.array([[1000.4, 700.6], [513.0, 800.0], [1500.0, 999.5]])
    table = spot_tiles(slide, centers, ["a", "b", "c"], target_mpp=0.5, size_px=64)
    assert table[Col.SPOT_ID].to_pylist() == ["a", "b", "c"]
    assert table[Col.TILE_ID].to_pylist() == ["1000_701", "513_800", "1500_1000"]
    reader = TileReader.from_slide(slide, table)
    for i, (x, y) in enumerate(zip(table[Col.X].to_pylist(), table[Col.Y].to_pylist(), strict=True)):
        tile = reader[i]
        assert tile.shape == (64, 64, 3)
        np.testing.assert_array_equal(tile[32, 32], level0[y, x])
        np.testing.assert_array_equal(tile, level0[y - 32 : y + 32, x - 32 : x + 32])


def test_tile_from_existing_level_equals_downscaled_level0(slide, level0):
    # 1.0 and 2.0 µm/px exist as levels 1 and 2 (2x2 box pyramids): no resize, equals a box mean
    for target, f in ((1.0, 2), (2.0, 4)):
        table = spot_tiles(slide, np.array([[1024.0, 768.0]]), ["s"], target_mpp=target, size_px=96)
        tile = TileReader.from_slide(slide, table)[0].astype(np.float64)
        half = 96 * f // 2
        ref = _box_mean(level0[768 - half : 768 + half, 1024 - half : 1024 + half], f)
        assert np.abs(tile - ref).max() <= 1.5


def test_resize_from_finer_level(tmp_path, slide, level0):
    # a slide with level 0 only: a 1.0 µm/px tile is read at 0.5 µm/px (448 px) and resized
    flat = write_synthetic_slide(tmp_path / "flat.tif", 2048, 1536, mpp=0.5, seed=7, min_level_size=4096)
    with open_slide(flat) as s:
        assert s.level_count == 1
        table = spot_tiles(s, np.array([[1024.0, 768.0]]), ["s"], target_mpp=1.0, size_px=224)
        tile = TileReader.from_slide(s, table)[0].astype(np.float64)
    ref = _box_mean(level0[768 - 224 : 768 + 224, 1024 - 224 : 1024 + 224], 2)
    diff = np.abs(tile - ref)
    assert diff.mean() < 3.0
    assert np.percentile(diff, 99) < 40
    # 0.75 µm/px is between levels 0 and 1: read from level 0 (the finer one), 336 px -> 224 px
    table = spot_tiles(slide, np.array([[1024.0, 768.0]]), ["s"], target_mpp=0.75, size_px=224)
    tile = TileReader.from_slide(slide, table)[0]
    ref = np.asarray(
        Image.fromarray(level0[768 - 168 : 768 + 168, 1024 - 168 : 1024 + 168]).resize(
            (224, 224), Image.Resampling.BILINEAR
        )
    )
    np.testing.assert_array_equal(tile, ref)


def test_padding_at_the_border(slide, level0, caplog):
    table = spot_tiles(
        slide, np.array([[10.0, 10.0], [1024.0, 768.0], [2040.0, 1530.0]]), ["edge", "mid", "corner"], size_px=64
    )
    assert table[Col.PADDED].to_pylist() == [True, False, True]
    tile = TileReader.from_slide(slide, table)[0]
    assert (tile[:22] == 255).all()
    assert (tile[:, :22] == 255).all()
    np.testing.assert_array_equal(tile[22:, 22:], level0[:42, :42])
    # a full mask keeps every grid tile: the last column and row cross the border
    with caplog.at_level(logging.INFO, logger="embedstore.tiling"):
        grid = grid_tiles(slide, size_px=300, mask=np.ones((96, 128), bool))
    nx, ny = -(-2048 // 300), -(-1536 // 300)
    assert grid.num_rows == nx * ny
    assert sum(grid[Col.PADDED].to_pylist()) == nx + ny - 1
    assert f"{nx * ny} grid tiles over tissue ({nx + ny - 1} padded at the border)" in caplog.text


def test_parallel_equals_serial(slide):
    table = grid_tiles(slide, target_mpp=0.75, size_px=96)
    reader = TileReader.from_slide(slide, table)
    serial = np.stack([reader[i] for i in range(len(reader))])
    for workers in (0, 1, 2):
        rows, tiles = zip(*iter_tile_batches(reader, batch_size=7, workers=workers), strict=True)
        np.testing.assert_array_equal(np.concatenate(rows), np.arange(len(reader)))
        np.testing.assert_array_equal(np.concatenate(tiles), serial)
    subset = np.array([5, 3, 11])
    ((rows, tiles),) = list(iter_tile_batches(reader, batch_size=10, workers=2, indices=subset))
    np.testing.assert_array_equal(rows, subset)
    np.testing.assert_array_equal(tiles, serial[subset])


class _CountingReader(TileReader):
    reads = 0

    def _read_image(self, *args: object) -> Image.Image:
        type(self).reads += 1
        return super()._read_image(*args)


def test_reading_streams_with_bounded_prefetch(slide):
    table = grid_tiles(slide, target_mpp=0.5, size_px=32, min_tissue=0.9)
    reader = _CountingReader(slide.path, table)
    assert len(reader) > 200
    batches = iter_tile_batches(reader, batch_size=4, workers=2)
    next(batches)
    batches.close()  # consumer stops: no further reads are started
    # at most 2 * workers batches were ever in flight
    assert 4 <= _CountingReader.reads <= 4 * 4 + 4


def _read_in_child(blob: bytes) -> tuple[bool, np.ndarray]:
    reader = pickle.loads(blob)
    fresh = reader._slide is None
    return fresh, np.stack([reader[i] for i in range(len(reader))])


def test_tile_reader_is_picklable_across_processes(slide):
    table = spot_tiles(slide, np.array([[800.0, 600.0], [1200.0, 900.0]]), ["a", "b"], target_mpp=0.6, size_px=48)
    reader = TileReader.from_slide(slide, table)
    local = np.stack([reader[0], reader[1]])
    assert reader._slide is not None
    blob = pickle.dumps(reader)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        fresh, remote = pool.submit(_read_in_child, blob).result()
    assert fresh
    np.testing.assert_array_equal(remote, local)


def test_tiling_bad_input(tmp_path, slide):
    glass = write_synthetic_slide(tmp_path / "glass.tif", 1024, 768, blank=True)
    with open_slide(glass) as s, pytest.raises(BadInput) as err:
        grid_tiles(s)
    assert (
        str(err.value)
        == f"{glass}: no tissue found (the slide looks blank); check the file, or give spot or tile coordinates instead of tissue detection"
    )
    with pytest.raises(BadInput) as err:
        spot_tiles(slide, np.array([[10.0, 10.0], [5000.0, 10.0]]), ["in", "out"])
    assert (
        str(err.value)
        == f"{slide.path}: 1 of 2 spot centres (first: out) lie outside the 2048x1536 px slide; check that the spots belong to this image and are in level-0 pixels"
    )
    with pytest.raises(BadInput) as err:
        spot_tiles(slide, np.zeros((3, 2)), ["a", "b"])
    assert (
        str(err.value)
        == f"{slide.path}: centers_xy has shape (3, 2) for 2 spot ids; give an (n, 2) array of x, y per spot"
    )
    with pytest.raises(BadInput) as err:
        grid_tiles(slide, size_px=64, mask=np.zeros((10, 10), bool))
    assert (
        str(err.value) == f"{slide.path}: no 64 px tile at 0.5 µm/px has 25% tissue; lower min_tissue or the tile size"
    )


def test_write_and_read_tile_table(tmp_path, slide):
    table = grid_tiles(slide)
    path = write_tile_table(table, tmp_path / "tiles" / "s.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.parquet"]  # no temporary left
    back = read_tile_table(path)
    assert back.cast(tile_schema()).equals(table)
    assert pq.read_schema(path).metadata[META_KIND.encode()] == b"tiles"
    other = tmp_path / "other.parquet"
    pq.write_table(table, other)
    with pytest.raises(BadInput) as err:
        read_tile_table(other)
    assert (
        str(err.value)
        == f"{other}: not an embedstore tile table of schema version 1 (kind='', version=''); tile the slide again"
    )


def test_draw_tile_preview(tmp_path, slide):
    table = grid_tiles(slide, size_px=128)
    png = draw_tile_preview(slide, table, tmp_path / "preview.png", max_size=512)
    img = np.asarray(Image.open(png))
    assert img.shape == (384, 512, 3)
    green = (img[..., 0] == 0) & (img[..., 1] == 160) & (img[..., 2] == 0)
    assert green.sum() > 100


def test_her2st_spot_tiles(shared_data):
    root = shared_data / "her2st" / "data"
    rows = np.loadtxt(root / "ST-spotfiles" / "C2_selection.tsv", skiprows=1, usecols=(0, 1, 4, 5), max_rows=8)
    ids = [f"{int(x)}x{int(y)}" for x, y in rows[:, :2]]
    with open_slide(root / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg", mpp=0.69) as s:
        table = spot_tiles(s, rows[:, 2:], ids, target_mpp=0.5, size_px=224)
        batches = list(iter_tile_batches(TileReader.from_slide(s, table), batch_size=4, workers=2))
        glass = s.read_region(0, 0, 0, 224, 224)
    tiles = np.concatenate([b for _, b in batches])
    assert tiles.shape == (8, 224, 224, 3)
    assert (tiles.reshape(8, -1).mean(axis=1) < glass.mean() - 20).all()  # spots sit on tissue


_INHERITED: list[TileReader] = []


def _read_inherited() -> tuple[bool, np.ndarray]:
    reader = _INHERITED[0]  # inherited through fork, not pickled: it still holds the parent's handle
    inherited_open = reader._slide is not None
    return inherited_open, np.stack([reader[i] for i in range(len(reader))])


def test_tile_reader_reopens_in_forked_worker(slide):
    # the DataLoader default on Linux: workers are forked with the parent's (already open) reader
    table = spot_tiles(slide, np.array([[700.0, 500.0], [1300.0, 1000.0]]), ["a", "b"], target_mpp=0.9, size_px=40)
    reader = TileReader.from_slide(slide, table)
    local = np.stack([reader[0], reader[1]])
    _INHERITED[:] = [reader]
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            inherited_open, remote = pool.submit(_read_inherited).result()
    finally:
        _INHERITED.clear()
    assert inherited_open
    np.testing.assert_array_equal(remote, local)
