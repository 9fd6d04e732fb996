"""Tile retrieval with ``es.search``: by a stored tile or a picture, checked against a NumPy brute force."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import embedstore as es
from embedstore.errors import BadInput, FingerprintMismatch
from embedstore.retrieval import MOSAIC_KIND, mosaic_shape
from embedstore.store import open_store
from embedstore.testing import write_synthetic_slide
from embedstore.tile_table import make_tile_table
from embedstore.tiling import TileReader

KEY = ("cohort", "slide_id", "tile_id")


def brute_force(store, query, k, keep=None):
    """The k best (cohort, slide_id, tile_id) by cosine over every stored tile, and their scores."""
    table, vectors = open_store(store).read_embeddings("builtin")
    rows = table.to_pylist()
    if keep is not None:
        chosen = np.array([keep(r) for r in rows])
        rows, vectors = [r for r, c in zip(rows, chosen, strict=True) if c], vectors[chosen]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ (query / np.linalg.norm(query))
    order = np.argsort(-sims, kind="stable")[:k]
    return [tuple(rows[i][c] for c in KEY) for i in order], sims[order]


def keys(hits):
    return list(zip(*(hits[c].to_pylist() for c in KEY), strict=True))


def stored(store, row=7):
    """(cohort, slide_id, tile_id, x, y) and the stored vector of one tile."""
    table, vectors = open_store(store).read_embeddings("builtin")
    r = table.slice(row, 1).to_pylist()[0]
    return r, vectors[row]


def read_tile(store, r):
    """A stored tile's pixels, read from the slide it was embedded from at the stored geometry."""
    st = open_store(store)
    src = st.slide_source("builtin", r["cohort"], r["slide_id"])
    geom = st.encoder_metadata("builtin")["geometry"]
    table = make_tile_table(
        r["slide_id"], np.array([r["x"]]), np.array([r["y"]]), None, geom["mpp"], geom["size_px"], np.zeros(1, bool)
    )
    return TileReader(src["image"], table, mpp=src["mpp"])[0]


def test_search_by_tile_finds_itself_first_and_equals_brute_force(store):
    r, vector = stored(store)
    want, scores = brute_force(store, vector, 10)
    for searched in ("by an exact scan", "through the tile index"):
        if searched == "through the tile index":
            es.build_tile_index(store)  # exact at this size: the same hits
        hits = es.search(store, slide=r["slide_id"], tile=r["tile_id"], k=10)
        assert keys(hits)[0] == (r["cohort"], r["slide_id"], r["tile_id"])
        assert hits["score"][0].as_py() == pytest.approx(1.0, abs=1e-5)
        assert keys(hits) == want
        np.testing.assert_allclose(hits["score"].to_numpy(), scores, atol=1e-5)
        assert hits["rank"].to_pylist() == list(range(1, 11))


def test_filters_equal_brute_force_without_the_left_out_tiles(store):
    r, vector = stored(store)
    hits = es.search(store, slide=r["slide_id"], tile=r["tile_id"], k=15, exclude_slides=[r["slide_id"]])
    want, scores = brute_force(store, vector, 15, keep=lambda row: row["slide_id"] != r["slide_id"])
    assert keys(hits) == want
    np.testing.assert_allclose(hits["score"].to_numpy(), scores, atol=1e-5)
    only = es.search(store, slide=r["slide_id"], tile=r["tile_id"], k=5, slides=["B1", "C1"])
    assert set(only["slide_id"].to_pylist()) <= {"B1", "C1"}


def test_search_by_image_of_a_stored_tile_finds_that_tile(store, tmp_path):
    r, vector = stored(store, row=11)
    png = tmp_path / "patch.png"
    Image.fromarray(read_tile(store, r)).save(png)
    hits = es.search(store, image=png, k=5)
    assert keys(hits)[0] == (r["cohort"], r["slide_id"], r["tile_id"])
    assert hits["score"][0].as_py() == pytest.approx(1.0, abs=1e-5)
    want, scores = brute_force(store, vector, 5)
    assert keys(hits) == want
    np.testing.assert_allclose(hits["score"].to_numpy(), scores, atol=1e-5)


def test_a_picture_of_another_size_is_resized_and_says_so(store, tmp_path, capsys):
    r, _ = stored(store, row=11)
    png = tmp_path / "big.png"
    Image.fromarray(read_tile(store, r)).resize((300, 260)).save(png)
    hits = es.search(store, image=png, k=3)
    assert hits.num_rows == 3
    err = capsys.readouterr().err
    assert "big.png: 300x260 px resized to the store's 224x224 px tile, centre 260x260 px crop" in err
    assert "0.5 µm/px" in err


def test_hits_and_mosaic_files(store, tmp_path):
    r, _ = stored(store)
    out, plot = tmp_path / "hits.parquet", tmp_path / "hits.png"
    hits = es.search(store, slide=r["slide_id"], tile=r["tile_id"], k=8, out=out, plot=plot)
    assert pq.read_table(out).equals(hits)
    assert pq.read_schema(out).metadata[b"embedstore.kind"] == b"search_hits"
    with Image.open(plot) as im:
        assert im.format == "PNG"
        assert im.size == mosaic_shape(8) == (6 * 200, 2 * 240)  # 9 cells: 6 a row, 2 rows
        assert im.info["embedstore.kind"] == MOSAIC_KIND
        red, green, blue = im.convert("RGB").getpixel((8, 8))  # the query's frame
        assert (red, green, blue) == pytest.approx((220, 20, 60), abs=25)  # crimson
    # a rerun replaces what embedstore wrote
    es.search(store, slide=r["slide_id"], tile=r["tile_id"], k=3, out=out, plot=plot)
    assert pq.read_table(out).num_rows == 3
    assert Image.open(plot).size == mosaic_shape(3)


@pytest.mark.parametrize("name", ["hits.parquet", "hits.png"])
def test_a_file_embedstore_did_not_write_is_left_alone(store, tmp_path, name):
    r, _ = stored(store)
    foreign = tmp_path / name
    foreign.write_bytes(b"the user's own file")
    option = {"out": foreign} if name.endswith(".parquet") else {"plot": foreign}
    with pytest.raises(BadInput, match="is not an embedstore search") as e:
        es.search(store, slide=r["slide_id"], tile=r["tile_id"], k=3, **option)
    assert str(foreign) in str(e.value)
    assert foreign.read_bytes() == b"the user's own file"
    with pytest.raises(BadInput) as e:
        es.search(store, slide=r["slide_id"], tile=r["tile_id"], k=3, out=store / "hits.parquet")
    assert "write the search hits (.parquet) outside the store (--out)" in str(e.value)


@pytest.fixture
def two_slides(tmp_path):
    """Two small slides embedded as a tissue grid, in a folder of their own (so one can be removed)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    write_synthetic_slide(folder / "kept.tif", 1024, 1024, mpp=0.5, seed=11)
    write_synthetic_slide(folder / "gone.tif", 1024, 1024, mpp=0.5, seed=12)
    store = tmp_path / "store"
    assert es.embed(folder, store, workers=0, progress=False).ok
    return folder, store


@pytest.mark.parametrize("fate", ["deleted", "overwritten"])
def test_a_hit_whose_slide_is_gone_is_a_grey_box(two_slides, tmp_path, capsys, fate):
    folder, store = two_slides
    table, _ = open_store(store).read_embeddings("builtin", slide_ids=["kept"])
    if fate == "deleted":
        (folder / "gone.tif").unlink()
    else:
        (folder / "gone.tif").write_bytes(b"no longer a slide")
    k = min(11, len(open_store(store).read_embeddings("builtin")[0]))
    plot = tmp_path / "hits.png"
    hits = es.search(store, slide="kept", tile=table["tile_id"][0].as_py(), k=k, plot=plot)
    gone = [i for i, s in enumerate(hits["slide_id"].to_pylist()) if s == "gone"]
    assert 0 < len(gone) < k  # hits on both slides
    assert "drawn as grey boxes" in capsys.readouterr().err
    with Image.open(plot) as im:
        rgb = im.convert("RGB")
        for i in range(1, k + 1):  # cell 0 is the query
            row, col = divmod(i, 6)
            corner = rgb.getpixel((col * 200 + 20, row * 240 + 20))
            assert (corner == (190, 190, 190)) == (i - 1 in gone), (i, corner)
    es.search(store, slide="gone", tile=hits["tile_id"][gone[0]].as_py(), k=2, plot=plot)
    assert "query tile drawn as a grey box: slide gone missing" in capsys.readouterr().err
    assert Image.open(plot).convert("RGB").getpixel((20, 20)) == (190, 190, 190)


def test_bad_queries_are_one_line(store, tmp_path):
    r, _ = stored(store)
    one = "give one query: a stored tile (slide and tile, --slide --tile), a picture (image, --image) or gene symbols (text, --text)"
    (tmp_path / "patch.png").write_bytes(b"")
    for kwargs in (
        {}, {"slide": "A1"}, {"tile": r["tile_id"]}, {"slide": "A1", "tile": "1_2", "image": "x.png"},
        {"image": "x.png", "text": "ERBB2"},
    ):  # fmt: skip
        with pytest.raises(BadInput, match=r"give one query") as e:
            es.search(store, **kwargs)
        assert one in str(e.value)
    cases = [
        ({"slide": r["slide_id"], "tile": "5_5"}, "tile 5_5: not a tile of slide"),
        ({"slide": "Z9", "tile": r["tile_id"]}, "slide Z9: no builtin embeddings"),
        ({"image": tmp_path / "patch.png"}, "patch.png: not a readable image"),
        ({"image": tmp_path / "none.png"}, "none.png: no such file"),
        ({"slide": r["slide_id"], "tile": r["tile_id"], "encoder": "uni"}, "encoder uni: no embeddings"),
        ({"slide": r["slide_id"], "tile": r["tile_id"], "k": 0}, "search: k=0 (--k): must be an integer >= 1"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(BadInput) as e:
            es.search(store, **kwargs)
        assert needle in str(e.value)
        assert "\n" not in str(e.value)


def test_an_encoder_of_another_fingerprint_is_refused(store, tmp_path, monkeypatch):
    from embedstore.encoders import builtin

    r, _ = stored(store)
    png = tmp_path / "patch.png"
    Image.fromarray(read_tile(store, r)).save(png)
    monkeypatch.setitem(builtin.PARAMS, "blob_min", 0.05)  # another version of the built-in features
    with pytest.raises(FingerprintMismatch, match="was embedded with") as e:
        es.search(store, image=png)
    assert "patch.png" in str(e.value)
    assert "\n" not in str(e.value)


def test_search_is_the_function_after_its_module_is_imported():
    import embedstore.retrieval  # noqa: F401 - the module must not shadow the public function

    assert callable(es.search)
    assert es.search.__module__ == "embedstore.retrieval"
