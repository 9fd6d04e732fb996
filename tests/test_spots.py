"""Spatial-transcriptomics readers: real her2st / STUtility / Visium files and synthetic layouts."""

from __future__ import annotations

import json
import logging
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import sparse

from embedstore import spots
from embedstore.errors import BadInput
from embedstore.slides import open_slide

HER2ST_SPOTS = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
# Totals from the README of ../shared/data/her2st (computed there with pandas).
HER2ST_TOTALS = {"C2": 1_926_633, "C3": 2_033_498, "C4": 2_213_922, "C5": 2_014_132, "C6": 2_256_695}
MOB_SPOTS = {"MOB1": 379, "MOB2": 407, "MOB3": 438, "MOB4": 403}


# ------------------------------------------------------------------------------------- helpers


def write_tiff(path, width, height, mpp=None):
    """Small pyramidal TIFF in the page layout OpenSlide reads (it shows SubIFD pyramids as one level)."""
    img = np.full((height, width, 3), 235, np.uint8)
    kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(64, 64), photometric="rgb", compression="zlib", **kw)
        tw.write(img[::2, ::2], tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=1, **kw)
    return path


def write_legacy(folder, name="S1", nx=4, ny=3, px_step=100.0, genes=5, seed=0, image="jpg", mpp=None):
    """A legacy-ST section: counts (spots × genes), spot table, image; returns the paths and truth."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ax, ay = (a.ravel() for a in np.meshgrid(np.arange(1, nx + 1), np.arange(1, ny + 1)))
    ids = [f"{a}x{b}" for a, b in zip(ax, ay, strict=True)]
    counts = pd.DataFrame(rng.poisson(5, (len(ids), genes)), index=ids, columns=[f"G{g}" for g in range(genes)])
    counts_path = folder / f"{name}.tsv.gz"
    counts.to_csv(counts_path, sep="\t", compression="gzip")
    table = pd.DataFrame(
        {
            "x": ax,
            "y": ay,
            "new_x": ax,
            "new_y": ay,
            "pixel_x": 20 + (ax - 1) * px_step,
            "pixel_y": 30 + (ay - 1) * px_step,
        }
    )
    table["selected"] = 1
    spots_path = folder / f"{name}_selection.tsv"
    table.to_csv(spots_path, sep="\t", index=False)
    w, h = int(40 + nx * px_step), int(60 + ny * px_step)
    if image == "jpg":
        image_path = folder / f"{name}.jpg"
        Image.new("RGB", (w, h), (230, 230, 230)).save(image_path)
    else:
        image_path = write_tiff(folder / f"{name}.tif", w, h, mpp)
    return counts_path, spots_path, image_path, counts, table


def write_hest(root, sid="S1", n=6, meta=None, image=True):
    rng = np.random.default_rng(1)
    xy = np.column_stack([np.arange(n) * 20.0 + 10, np.full(n, 40.0)])
    obs = pd.DataFrame({"in_tissue": [1] * (n - 1) + [0], "array_row": 0, "array_col": np.arange(n)})
    obs.index = [f"BC{i:03d}-1" for i in range(n)]
    adata = ad.AnnData(X=rng.poisson(3, (n, 4)).astype(np.float32), obs=obs, var=pd.DataFrame(index=list("ABCD")))
    adata.obsm["spatial"] = xy
    (root / "st").mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(root / "st" / f"{sid}.h5ad")
    if image:
        write_tiff(root / "wsis" / f"{sid}.tif", 192, 128, mpp=0.8)
    if meta is not None:
        (root / "metadata").mkdir(exist_ok=True)
        (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta))
    return adata


# ------------------------------------------------------------------------------ real: her2st


@pytest.fixture(scope="module")
def her2st(shared_data):
    sections = spots.read_dataset(shared_data / "her2st", join=None)
    return {s.uns["embedstore"]["slide_id"]: s for s in sections}


def test_her2st_sections(her2st):
    assert list(her2st) == list(HER2ST_SPOTS)
    for sid, a in her2st.items():
        info = a.uns["embedstore"]
        assert a.n_obs == HER2ST_SPOTS[sid]
        assert 0.68 <= info["mpp"] <= 0.70
        assert info["mpp_source"] == "spot_pitch"
        assert info["technology"] == "legacy_st"
        assert info["spot_diameter_um"] == 100.0
        assert info["image_path"].endswith(".jpg")
        assert float(a.X.sum()) == HER2ST_TOTALS[sid]
        assert "ERBB2" in a.var_names
        assert set(a.obs["patient"]) == {"C"}
        assert set(a.obs["slide_id"]) == {sid}
        assert a.obs_names[0] == f"{sid}:{a.obs['spot_id'].iloc[0]}"
        assert isinstance(a.X, sparse.csr_matrix)
        assert a.obsm["spatial"].dtype == np.float64
    assert her2st["C2"].n_vars == 15_706
    assert her2st["C2"].X[:, her2st["C2"].var_names.get_loc("ERBB2")].mean() > 50


def test_her2st_matches_pandas_join(her2st, shared_data):
    # C3: the spot file has 2 rows without counts; reference = plain pandas inner join.
    root = shared_data / "her2st" / "data"
    counts = pd.read_csv(root / "ST-cnts" / "C3.tsv.gz", sep="\t", index_col=0)
    table = pd.read_csv(root / "ST-spotfiles" / "C3_selection.tsv", sep="\t")
    table.index = table["x"].astype(str) + "x" + table["y"].astype(str)
    joined = counts.join(table[["pixel_x", "pixel_y"]], how="inner")
    a = her2st["C3"]
    assert list(a.obs["spot_id"]) == list(joined.index)
    np.testing.assert_array_equal(a.X.toarray(), joined[counts.columns].to_numpy(np.float32))
    np.testing.assert_array_equal(a.obsm["spatial"], joined[["pixel_x", "pixel_y"]].to_numpy())
    # µm/px against separate 1-D least-squares slopes on each axis
    sx = np.polyfit(table["x"], table["pixel_x"], 1)[0]
    sy = np.polyfit(table["y"], table["pixel_y"], 1)[0]
    assert a.uns["embedstore"]["mpp"] == pytest.approx(200 / ((sx + sy) / 2), rel=5e-3)


def test_her2st_stack_inner_outer(her2st):
    sections = list(her2st.values())
    union = set().union(*(s.var_names for s in sections))
    common = set(sections[0].var_names).intersection(*(s.var_names for s in sections))
    inner = spots.stack_sections(sections, join="inner")
    outer = spots.stack_sections(sections, join="outer")
    assert inner.shape == (910, len(common))
    assert outer.shape == (910, len(union))
    assert float(outer.X.sum()) == sum(HER2ST_TOTALS.values())
    c2 = her2st["C2"]
    rows = outer.obs["slide_id"].to_numpy() == "C2"
    np.testing.assert_array_equal(outer[rows, c2.var_names].X.toarray(), c2.X.toarray())
    assert outer[rows].X.sum() == c2.X.sum()  # genes C2 lacks are 0
    np.testing.assert_array_equal(inner[rows, "ERBB2"].X.toarray(), c2[:, "ERBB2"].X.toarray())
    np.testing.assert_array_equal(outer.obsm["spatial"][rows], c2.obsm["spatial"])
    assert list(outer.uns["embedstore"]["slides"]) == list(HER2ST_SPOTS)
    assert outer.uns["embedstore"]["technology"] == "legacy_st"
    assert set(outer.obs["patient"]) == {"C"}


# ---------------------------------------------------------------------------- real: STUtility


def test_stutility_mob(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="embedstore.spots"):
        sections = spots.read_dataset(shared_data / "stutility-mob", join="inner")
    assert [s.uns["embedstore"]["slide_id"] for s in sections] == list(MOB_SPOTS)
    # A few counted positions are absent from the whole-array alignment tables: dropped, with a warning.
    assert "counted spots without a position in alignment_table_MOB1.tsv" in caplog.text
    folder = shared_data / "stutility-mob" / "inst" / "extdata" / "counts"
    ref = pd.read_csv(folder / "MOB1.tsv.gz", sep="\t", index_col=0)
    for s in sections:
        assert s.n_obs == MOB_SPOTS[s.uns["embedstore"]["slide_id"]]
        assert s.n_vars == 1000
        assert s.var_names.str.startswith("ENSMUSG").all()
        assert 4.0 <= s.uns["embedstore"]["mpp"] <= 4.6
        assert "patient" not in s.obs
    mob1 = sections[0]
    np.testing.assert_array_equal(mob1.X.toarray(), ref.loc[mob1.obs["spot_id"], mob1.var_names].to_numpy(np.float32))


# ------------------------------------------------------------------------------- real: Visium


def _visium_reference(folder):
    with h5py.File(folder / "filtered_feature_bc_matrix.h5") as f:
        barcodes = f["matrix/barcodes"][()].astype(str)
        dense = sparse.csc_matrix(
            (f["matrix/data"][()], f["matrix/indices"][()], f["matrix/indptr"][()]), shape=f["matrix/shape"][()]
        ).T.toarray()
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    pos.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    return barcodes, dense, pos


def test_visium_1x_and_2x(shared_data, tmp_path):
    folder = shared_data / "visium-scanpy-test"
    a = spots.read_visium(folder)
    barcodes, dense, pos = _visium_reference(folder)
    keep = pos.loc[barcodes, "in_tissue"].to_numpy() == 1
    assert a.shape == (int(keep.sum()), dense.shape[1])
    np.testing.assert_array_equal(a.X.toarray(), dense[keep].astype(np.float32))
    np.testing.assert_array_equal(
        a.obsm["spatial"], pos.loc[barcodes[keep], ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    )
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    assert a.uns["embedstore"]["mpp"] == pytest.approx(55.0 / sf["spot_diameter_fullres"])
    assert a.uns["embedstore"]["technology"] == "visium"
    assert a.uns["embedstore"]["spot_diameter_um"] == 55.0
    assert a.var["gene_ids"].iloc[0].startswith("ENS")

    # Space Ranger >= 2.0: tissue_positions.csv with a header row, in outs/ under the sample folder.
    outs = tmp_path / "sample9" / "outs"
    (outs / "spatial").mkdir(parents=True)
    shutil.copy(folder / "filtered_feature_bc_matrix.h5", outs)
    shutil.copy(folder / "spatial" / "scalefactors_json.json", outs / "spatial")
    pos.rename_axis("barcode").to_csv(outs / "spatial" / "tissue_positions.csv")
    b = spots.read_dataset(tmp_path / "sample9", join=None)[0]
    assert b.uns["embedstore"]["slide_id"] == "sample9"
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    assert list(b.obs["spot_id"]) == list(a.obs["spot_id"])


def test_visium_errors(shared_data, tmp_path):
    folder = shared_data / "visium-scanpy-test"
    with pytest.raises(BadInput, match="no spatial/ folder; give a Space Ranger outs/ folder"):
        spots.read_visium(tmp_path)
    (tmp_path / "spatial").mkdir()
    shutil.copy(folder / "filtered_feature_bc_matrix.h5", tmp_path)
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None)
    pos.iloc[pos.shape[0] // 2 :].to_csv(tmp_path / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.raises(BadInput, match=r"barcodes have no tissue position; give the outs/ folder of the same run"):
        spots.read_visium(tmp_path, mpp=0.5)
    pos.to_csv(tmp_path / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.raises(BadInput, match=r"µm/px is missing and cannot be derived \(no spot_diameter_fullres"):
        spots.read_visium(tmp_path)
    img = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(img)
    with pytest.raises(BadInput, match=r"spot centres lie outside the image small.png \(100 x 100 px\)"):
        spots.read_visium(tmp_path, image_path=img, mpp=0.5)


# ------------------------------------------------------------------------------------ legacy ST


def test_legacy_tiff_mpp_and_orientation(tmp_path):
    counts_path, spots_path, image, counts, _ = write_legacy(tmp_path / "a", image="tif", mpp=0.8)
    a = spots.read_legacy_st(counts_path, spots_path, image, patient="P")
    assert a.uns["embedstore"]["mpp"] == pytest.approx(0.8)  # TIFF tags beat the pitch estimate (2.0)
    assert a.uns["embedstore"]["mpp_source"] == "tiff_tags"
    assert a.uns["embedstore"]["slide_id"] == "S1"
    assert list(a.obs_names[:2]) == ["S1:1x1", "S1:2x1"]
    np.testing.assert_array_equal(a.X.toarray(), counts.to_numpy(np.float32))
    # genes × spots gives the same AnnData
    counts.T.to_csv(tmp_path / "T.tsv", sep="\t")
    b = spots.read_legacy_st(tmp_path / "T.tsv", spots_path, image, slide_id="S1", patient="P")
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    assert list(b.var_names) == list(a.var_names)
    assert list(b.obs_names) == list(a.obs_names)
    # no tags (JPEG): from the pitch (100 px per 200 µm); user mpp wins over both
    counts_path, spots_path, image, _, _ = write_legacy(tmp_path / "b")
    assert spots.read_legacy_st(counts_path, spots_path, image).uns["embedstore"]["mpp"] == pytest.approx(2.0)
    c = spots.read_legacy_st(counts_path, spots_path, image, mpp=0.3)
    assert (c.uns["embedstore"]["mpp"], c.uns["embedstore"]["mpp_source"]) == (0.3, "user")


def _legacy_with_strip_tiff(folder, **tiff_kw):
    """A legacy section (spot pitch 2 µm/px) whose image is a plain TIFF written with ``tiff_kw``."""
    counts_path, spots_path, image, _, _ = write_legacy(folder, image="tif")
    with Image.open(image) as im:
        w, h = im.size
    tifffile.imwrite(image, np.full((h, w, 3), 235, np.uint8), photometric="rgb", metadata=None, **tiff_kw)
    return counts_path, spots_path, image


@pytest.mark.parametrize(
    ("tags", "mpp"),
    [
        ({"resolution": (1e4 / 0.25, 1e4 / 0.25), "resolutionunit": "CENTIMETER"}, 0.25),
        ({"resolution": (25_400 / 0.5, 25_400 / 0.5), "resolutionunit": "INCH"}, 0.5),
        # a Space Ranger lowres image (0.045 × a 1 µm/px scan) saved with its true resolution
        ({"resolution": (25_400 / 22.0, 25_400 / 22.0), "resolutionunit": "INCH"}, 22.0),
        ({"description": "Aperio Image Library v12.0.5\r\n440x360 -> 440x360 |AppMag = 20|MPP = 0.4990"}, 0.499),
    ],
)
def test_tiff_mpp_same_through_slide_and_spot_reader(tmp_path, tags, mpp):
    counts_path, spots_path, image = _legacy_with_strip_tiff(tmp_path, **tags)
    with open_slide(image) as s:
        assert s.mpp == pytest.approx(mpp)
    info = spots.read_legacy_st(counts_path, spots_path, image).uns["embedstore"]
    assert (info["mpp"], info["mpp_source"]) == (pytest.approx(mpp), "tiff_tags")


@pytest.mark.parametrize(
    "tags",
    [
        {"resolution": (72, 72), "resolutionunit": "INCH"},  # an image editor's default: 352.8 µm/px
        {"resolution": (600 / 2.54, 600 / 2.54), "resolutionunit": "CENTIMETER"},  # 600 dpi: 42.3 µm/px
        {"resolution": (1e4 / 0.25, 1e4 / 0.25), "resolutionunit": "NONE"},  # no physical unit
        {"description": "Aperio Image Library v12.0.5\r\n440x360 |MPP = 352.8"},
    ],
)
def test_implausible_tiff_mpp_refused_by_slide_and_spot_reader(tmp_path, tags):
    counts_path, spots_path, image = _legacy_with_strip_tiff(tmp_path, **tags)
    with pytest.raises(BadInput, match="no µm/px in the metadata"):
        open_slide(image)
    info = spots.read_legacy_st(counts_path, spots_path, image).uns["embedstore"]
    assert (info["mpp"], info["mpp_source"]) == (pytest.approx(2.0), "spot_pitch")


@pytest.mark.parametrize("mpp", [0.01, 100.0])
def test_implausible_user_mpp_refused_by_slide_and_spot_reader(tmp_path, mpp):
    counts_path, spots_path, image = _legacy_with_strip_tiff(tmp_path)
    expected = f"mpp={mpp} is not a plausible µm/px (expected 0.05-30); pass the level-0 µm/px"
    with pytest.raises(BadInput) as err:
        open_slide(image, mpp=mpp)
    assert str(err.value) == f"{image}: {expected}"
    with pytest.raises(BadInput) as err:
        spots.read_legacy_st(counts_path, spots_path, image, mpp=mpp)
    assert str(err.value).endswith(f": {expected}")


def test_estimate_mpp_from_pitch_rotated_staggered():
    rng = np.random.default_rng(0)
    # staggered (checkerboard) array as on STUtility's 2k arrays: neighbours 2 units apart per axis
    ax, ay = (a.ravel() for a in np.meshgrid(np.arange(1, 30), np.arange(1, 30)))
    stag = (ax + ay) % 2 == 0
    arr = np.column_stack([ax, ay])[stag].astype(float)
    theta, px_per_unit = np.deg2rad(7.0), 24.0
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pix = 300 + arr @ rot.T * px_per_unit + rng.normal(0, 0.3, arr.shape)
    pix[:5] += 400  # misplaced spots must not bias the fit
    assert spots.estimate_mpp_from_pitch(arr, pix) == pytest.approx(200 / (2 * px_per_unit), rel=2e-3)
    with pytest.raises(BadInput, match="too few spots off one line to fit the spot pitch"):
        spots.estimate_mpp_from_pitch(arr[:, :1].repeat(2, 1), pix)


def test_read_dataset_her2st_layout_tiff_and_join(tmp_path):
    data = tmp_path / "data"
    for i, (sec, ngenes) in enumerate([("A1", 5), ("B1", 7)]):
        c, s, img, _, _ = write_legacy(tmp_path / sec, sec, genes=ngenes, seed=i, image="tif", mpp=0.5)
        (data / "ST-cnts").mkdir(parents=True, exist_ok=True)
        (data / "ST-spotfiles").mkdir(exist_ok=True)
        shutil.move(c, data / "ST-cnts" / c.name)
        shutil.move(s, data / "ST-spotfiles" / s.name)
        (data / "ST-imgs" / sec[0] / sec).mkdir(parents=True)
        shutil.move(img, data / "ST-imgs" / sec[0] / sec / "HE_slide.tif")
    inner = spots.read_dataset(tmp_path)
    outer = spots.read_dataset(tmp_path / "data", join="outer")
    assert [a.var_names.tolist() for a in inner] == [[f"G{g}" for g in range(5)]] * 2
    assert [a.n_vars for a in outer] == [7, 7]
    assert float(outer[0][:, ["G5", "G6"]].X.sum()) == 0.0
    assert [a.obs["patient"].iloc[0] for a in inner] == ["A", "B"]
    assert all(a.uns["embedstore"]["mpp"] == pytest.approx(0.5) for a in inner)
    stacked = spots.stack_sections(outer, join="outer")
    assert stacked.shape == (24, 7)


def test_read_dataset_synthetic_cohort(tmp_path):
    from embedstore.testing import make_synthetic_cohort

    cohort = make_synthetic_cohort(tmp_path, n_slides=2, n_spots=12, n_genes=6, width=1024, height=1024, mpp=[0.5, 1.0])
    sections = spots.read_dataset(cohort.root, join=None)
    for a, truth in zip(sections, cohort.sections, strict=True):
        assert a.uns["embedstore"]["slide_id"] == truth.section
        assert a.uns["embedstore"]["mpp"] == pytest.approx(truth.mpp, rel=1e-3)
        assert a.obs["patient"].iloc[0] == truth.patient
        assert list(a.obs["spot_id"]) == truth.spot_ids
        np.testing.assert_array_equal(a.X.toarray(), truth.counts)
        np.testing.assert_allclose(a.obsm["spatial"], truth.centers_xy)


# ------------------------------------------------------------------------------------------ HEST


def test_hest_sample(tmp_path):
    meta = {"pixel_size_um_estimated": 0.55, "pixel_size_um_embedded": 0.5, "spot_diameter": 55.0, "patient": "P7"}
    src = write_hest(tmp_path, meta=meta)
    for path in (tmp_path, tmp_path / "st" / "S1.h5ad"):
        a = spots.read_hest(path)
        assert a.shape == (5, 4)  # the in_tissue == 0 spot is dropped
        info = a.uns["embedstore"]
        assert (info["mpp"], info["mpp_source"], info["spot_diameter_um"]) == (0.55, "pixel_size_um_estimated", 55.0)
        assert info["technology"] == "hest"
        assert info["image_path"].endswith("wsis/S1.tif")
        assert list(a.obs["patient"].unique()) == ["P7"]
        np.testing.assert_array_equal(a.X.toarray(), src.X[:5])
        np.testing.assert_array_equal(a.obsm["spatial"], src.obsm["spatial"][:5])
        assert a.obs_names[0] == "S1:BC000-1"
    assert spots.read_dataset(tmp_path)[0].shape == (5, 4)
    # no pixel size in the JSON: the TIFF resolution tags
    write_hest(tmp_path / "t", meta={"spot_diameter": 55.0})
    assert spots.read_hest(tmp_path / "t").uns["embedstore"]["mpp"] == pytest.approx(0.8)


def test_hest_errors(tmp_path):
    write_hest(tmp_path, meta={}, image=False)
    with pytest.raises(BadInput, match=r"S1.json: µm/px is missing and cannot be derived .*; pass mpp="):
        spots.read_hest(tmp_path)
    assert spots.read_hest(tmp_path, mpp=0.25).uns["embedstore"]["mpp"] == 0.25
    write_hest(tmp_path, sid="S2", meta={})
    with pytest.raises(BadInput, match=r"which HEST sample .*\['S1', 'S2'\]\); pass sample_id="):
        spots.read_hest(tmp_path)


# ------------------------------------------------------------------------------------------ errors


def test_missing_files_and_unreadable_tables(tmp_path):
    counts_path, spots_path, image, counts, table = write_legacy(tmp_path)
    with pytest.raises(BadInput, match=r"nope.tsv.gz: count table not found; check the path"):
        spots.read_legacy_st(tmp_path / "nope.tsv.gz", spots_path, image)
    with pytest.raises(BadInput, match=r"nope.tsv: spot table not found; check the path"):
        spots.read_legacy_st(counts_path, tmp_path / "nope.tsv", image)
    with pytest.raises(BadInput, match=r"nope.jpg: image not found; check the path"):
        spots.read_legacy_st(counts_path, spots_path, tmp_path / "nope.jpg")
    with pytest.raises(BadInput, match=r"S1.jpg: not a text table .*; give a tab-separated"):
        spots.read_legacy_st(image, spots_path, image)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(BadInput, match=r"empty.tsv: not a readable count table \(EmptyDataError"):
        spots.read_legacy_st(tmp_path / "empty.tsv", spots_path, image)
    counts.rename(index=lambda s: "spot_" + s).to_csv(tmp_path / "ids.tsv", sep="\t")
    with pytest.raises(BadInput, match="neither rows nor columns are labelled with spot ids like '10x14'"):
        spots.read_legacy_st(tmp_path / "ids.tsv", spots_path, image)
    text = counts.astype(object)
    text.iloc[2, 3] = "many"
    text.to_csv(tmp_path / "text.tsv", sep="\t")
    with pytest.raises(BadInput, match=r"text\.tsv: count table holds non-numeric values"):
        spots.read_legacy_st(tmp_path / "text.tsv", spots_path, image)
    table.drop(columns="pixel_y").to_csv(tmp_path / "cols.tsv", sep="\t", index=False)
    with pytest.raises(BadInput, match=r"cols.tsv: spot table lacks columns \['pixel_y'\]"):
        spots.read_legacy_st(counts_path, tmp_path / "cols.tsv", image)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(BadInput, match=r"bad\.tif: not a readable image"):
        spots.read_legacy_st(counts_path, spots_path, tmp_path / "bad.tif")


def test_positions_outside_image_and_missing(tmp_path, caplog):
    counts_path, _, image, _, table = write_legacy(tmp_path)
    moved = table.copy()
    moved.loc[:1, "pixel_x"] = 5000.0
    moved.to_csv(tmp_path / "moved.tsv", sep="\t", index=False)
    with pytest.raises(
        BadInput, match=r"moved.tsv: 2 of 12 spot centres lie outside the image S1.jpg \(440 x 360 px\)"
    ):
        spots.read_legacy_st(counts_path, tmp_path / "moved.tsv", image)
    table.iloc[3:].to_csv(tmp_path / "part.tsv", sep="\t", index=False)
    with pytest.raises(BadInput, match=r"3 of 12 spots in the counts have no position in part.tsv; .*allow_missing"):
        spots.read_legacy_st(counts_path, tmp_path / "part.tsv", image)
    assert spots.read_legacy_st(counts_path, tmp_path / "part.tsv", image, allow_missing_positions=True).n_obs == 9
    # a whole-array table (it lists unselected spots) is the authority: unlisted counted spots are dropped
    whole = table.iloc[3:].copy()
    whole.loc[whole.index[:2], "selected"] = 0
    whole.to_csv(tmp_path / "whole.tsv", sep="\t", index=False)
    with caplog.at_level(logging.WARNING, logger="embedstore.spots"):
        assert spots.read_legacy_st(counts_path, tmp_path / "whole.tsv", image).n_obs == 7
    assert "dropped 3 counted spots without a position in whole.tsv" in caplog.text
    # extra spot-table rows without counts are normal
    extra = pd.concat([table, table.iloc[:1].assign(x=9, y=9)])
    extra.to_csv(tmp_path / "extra.tsv", sep="\t", index=False)
    assert spots.read_legacy_st(counts_path, tmp_path / "extra.tsv", image).n_obs == 12


def test_duplicates_bad_counts_and_missing_mpp(tmp_path):
    counts_path, spots_path, image, counts, table = write_legacy(tmp_path)
    counts.rename(index={"2x1": "1x1"}).to_csv(tmp_path / "dup.tsv", sep="\t")
    with pytest.raises(BadInput, match=r"dup.tsv: duplicate spot ids \['1x1'\]; each spot must appear once"):
        spots.read_legacy_st(tmp_path / "dup.tsv", spots_path, image)
    counts.rename(index={"2x1": "1x1"}).T.to_csv(tmp_path / "dupT.tsv", sep="\t")
    with pytest.raises(BadInput, match=r"dupT.tsv: duplicate spot ids \['1x1'\]"):
        spots.read_legacy_st(tmp_path / "dupT.tsv", spots_path, image)
    pd.concat([table, table.iloc[:1]]).to_csv(tmp_path / "dup_pos.tsv", sep="\t", index=False)
    with pytest.raises(BadInput, match=r"dup_pos.tsv: duplicate spot positions \(x, y\) \['1x1'\]"):
        spots.read_legacy_st(counts_path, tmp_path / "dup_pos.tsv", image)
    for name, value in (("neg", -1), ("nan", np.nan)):
        bad = counts.astype(float)
        bad.iloc[1, 1] = value
        bad.to_csv(tmp_path / f"{name}.tsv", sep="\t")
        with pytest.raises(BadInput, match=rf"{name}.tsv: 1 negative or NaN counts; give raw, non-negative UMI counts"):
            spots.read_legacy_st(tmp_path / f"{name}.tsv", spots_path, image)
    # one row of spots and a JPEG (no resolution tags): a line of spots cannot fix the pitch fit
    c1, s1, img1, _, _ = write_legacy(tmp_path / "line", ny=1)
    with pytest.raises(BadInput, match=r"S1_selection.tsv: µm/px is missing and cannot be derived .*; pass mpp="):
        spots.read_legacy_st(c1, s1, img1)
    assert spots.read_legacy_st(c1, s1, img1, mpp=1.5).uns["embedstore"]["mpp"] == 1.5


def test_dataset_and_stack_errors(tmp_path):
    with pytest.raises(BadInput, match=r"unknown dataset layout; give one of: her2st \(data/ST-cnts"):
        spots.read_dataset(tmp_path)
    with pytest.raises(BadInput, match="dataset folder not found"):
        spots.read_dataset(tmp_path / "missing")
    with pytest.raises(BadInput, match=r"join='left': unknown; use 'inner', 'outer' or None"):
        spots.read_dataset(tmp_path, join="left")
    c, s, img, _, _ = write_legacy(tmp_path / "a")
    a = spots.read_legacy_st(c, s, img)
    with pytest.raises(BadInput, match=r"slide_id \['S1'\] appears more than once; give each section its own slide_id"):
        spots.stack_sections([a, a])
    b = spots.read_legacy_st(c, s, img, slide_id="S2")
    b.var_names = [f"H{i}" for i in range(b.n_vars)]
    with pytest.raises(BadInput, match="no gene is shared by all sections; use join='outer'"):
        spots.stack_sections([a, b])
    with pytest.raises(BadInput, match="nothing to stack"):
        spots.stack_sections([])
    assert spots.stack_sections([a, b], join="outer").shape == (24, 10)
