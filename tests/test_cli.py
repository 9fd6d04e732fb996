"""The command line: info and tile on real files, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import gzip
import subprocess

import pyarrow.parquet as pq
import pytest
from cli_helpers import CLI, assert_one_line_error, run
from PIL import Image

from embedstore.testing import write_synthetic_image, write_synthetic_slide


def test_info_reports_levels_mpp_tissue_and_tiles(synthetic_slide_path):
    result = run("info", synthetic_slide_path)
    assert result.returncode == 0, result.stderr
    assert "0.5 µm/px" in result.stdout
    assert "2048x1536" in result.stdout
    assert "tissue_fraction" in result.stdout
    assert "tiles" in result.stdout


def test_tile_writes_table_and_preview(synthetic_slide_path, tmp_path):
    out, preview = tmp_path / "tiles.parquet", tmp_path / "grid.png"
    result = run("tile", synthetic_slide_path, "--out", out, "--preview", preview, "--size", "112")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    assert table.num_rows > 0
    assert set(table.column("size_px").to_pylist()) == {112}
    assert f"{table.num_rows} tiles" in result.stdout
    assert Image.open(preview).size[0] > 0


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.tif").write_text("this is not an image")
    good = write_synthetic_slide(d / "good.tif", 1024, 1024, mpp=0.5, seed=2)
    (d / "truncated.png").write_bytes(b"")
    write_synthetic_image(d / "cut.png", 800, 600, seed=1, blank=False, mpp=None)
    data = (d / "cut.png").read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 3])
    write_synthetic_slide(d / "nompp.tif", 1024, 1024, mpp=None, seed=3)
    write_synthetic_slide(d / "blank.tif", 1024, 1024, mpp=0.5, seed=4, blank=True)
    return d, good


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("missing.tif", ["missing.tif", "no such file"]),
        ("notes.tif", ["notes.tif"]),
        ("cut.png", ["cut.png"]),
        ("nompp.tif", ["nompp.tif", "µm/px", "--mpp"]),
        ("blank.tif", ["blank.tif", "tissue"]),
    ],
)
def test_bad_slide_is_one_line_exit_2(bad_slides, name, needles):
    folder, _ = bad_slides
    path = folder / name
    result = subprocess.run([*CLI, "info", str(path)], capture_output=True, text=True, check=False)
    assert_one_line_error(result, *needles)


def test_bad_spot_table_is_one_line_exit_2(synthetic_cohort, tmp_path):
    import shutil

    root = tmp_path / "cohort"
    shutil.copytree(synthetic_cohort.root, root)
    section = synthetic_cohort.sections[0].section
    counts = root / "data" / "ST-cnts" / f"{section}.tsv.gz"
    lines = gzip.decompress(counts.read_bytes()).decode().splitlines()
    lines.append(lines[1])  # the same spot id twice
    counts.write_bytes(gzip.compress("\n".join(lines).encode()))
    result = run("embed", root, "--store", tmp_path / "store", "--workers", "0")
    assert_one_line_error(result, f"{section}.tsv.gz", "duplicate")
    assert not (tmp_path / "store" / "embeddings").exists()


def test_index_tiles_builds_then_updates(store):
    built = run("index", "tiles", "--store", store)
    assert built.returncode == 0, built.stderr
    assert "tile index built" in built.stdout
    assert f"index -> {store / 'tile_indexes' / 'encoder=builtin'}" in built.stdout
    again = run("index", "tiles", "--store", store)
    assert again.returncode == 0, again.stderr
    assert "tile index up to date" in again.stdout


def test_search_round_trip(store, tmp_path):
    import embedstore as es

    first = es.sql(store, "SELECT slide_id, tile_id FROM embeddings ORDER BY slide_id, tile_id LIMIT 1")
    slide, tile = first.slide_id[0], first.tile_id[0]
    out, plot = tmp_path / "hits.parquet", tmp_path / "hits.png"
    result = run("search", "--store", store, "--slide", slide, "--tile", tile, "-k", 5, "--out", out, "--plot", plot)
    assert result.returncode == 0, result.stderr
    assert pq.read_table(out).equals(es.search(store, slide=slide, tile=tile, k=5))
    assert f"5 hits -> {out}" in result.stdout
    assert f"mosaic -> {plot}" in result.stdout
    assert tile in result.stdout.splitlines()[1]  # the first hit, printed under the header
    assert Image.open(plot).size == (6 * 200, 240)


def test_search_bad_input_is_one_line_exit_2(store, tmp_path):
    assert_one_line_error(run("search", "--store", store), "search: give one query")
    both = run("search", "--store", store, "--slide", "A1", "--tile", "1_1", "--image", tmp_path / "x.png")
    assert_one_line_error(both, "search: give one query")
    assert_one_line_error(run("search", "--store", store, "--image", tmp_path / "none.png"), "none.png", "no such file")
    assert_one_line_error(run("search", "--store", store, "--slide", "A1", "--tile", "1_1"), "tile 1_1", "slide A1")
