"""Scoring and report: numbers recomputed independently (SciPy on h5ad files read back), the page parsed back."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from scipy.stats import pearsonr, spearmanr

from embedstore.errors import BadInput
from embedstore.report import format_table, plot_prediction_maps, write_report
from embedstore.scoring import metrics_table, score_predictions

GENES = [f"G{i}" for i in range(8)]
SLIDES = {"A": 30, "B": 24, "C": 18}  # unequal sizes: the overall mean must weight slides, not spots
SPACING = 100.0  # level-0 px between spot centres
SCALE = 0.05  # thumbnail px per level-0 px


def _truth(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs, xy, blocks = [], [], []
    for slide, n in SLIDES.items():
        side = int(np.ceil(np.sqrt(n)))
        for i in range(n):
            # Spot ids repeat across slides: only (slide_id, spot_id) identifies a spot.
            obs.append({"slide_id": slide, "spot_id": f"s{i}"})
            xy.append([200 + SPACING * (i % side), 300 + SPACING * (i // side)])
        blocks.append(np.log1p(rng.poisson(rng.uniform(0.5, 8, len(GENES)), size=(n, len(GENES)))))
    x = np.vstack(blocks)
    x[np.asarray([o["slide_id"] for o in obs]) == "B", 2] = 0.0  # G2 not expressed on slide B: undefined there
    obs = pd.DataFrame(obs, index=[f"{o['slide_id']}_{o['spot_id']}" for o in obs])
    a = ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=GENES))
    a.obsm["spatial"] = np.asarray(xy)
    return a


def _prediction(truth: ad.AnnData, noise: float, seed: int, drop_gene: str | None = None) -> ad.AnnData:
    """Noisy truth, rows shuffled, genes reordered, one extra spot, optionally one gene absent."""
    rng = np.random.default_rng(seed)
    x = truth.X.toarray() + rng.normal(0, noise, truth.shape)
    order = rng.permutation(truth.n_obs)
    genes = [g for g in reversed(GENES) if g != drop_gene]
    cols = [GENES.index(g) for g in genes]
    obs = truth.obs.iloc[order][["slide_id", "spot_id"]].reset_index(drop=True)
    extra = pd.DataFrame({"slide_id": ["A"], "spot_id": ["not-measured"]})
    obs = pd.concat([obs, extra], ignore_index=True)
    obs.index = obs.index.astype(str)
    xs = np.vstack([x[order][:, cols], rng.normal(size=(1, len(cols)))]).astype(np.float32)
    p = ad.AnnData(xs, obs=obs, var=pd.DataFrame(index=genes))
    p.obsm["spatial"] = np.vstack([truth.obsm["spatial"][order], [[0.0, 0.0]]])
    return p


def _data() -> tuple[ad.AnnData, dict[str, ad.AnnData]]:
    truth = _truth()
    good = _prediction(truth, 0.5, 1)
    bad = _prediction(truth, 3.0, 2, drop_gene="G7")
    bad.X[:, bad.var_names.get_loc("G1")] = 2.0  # constant prediction: undefined on every slide
    return truth, {"good": good, "bad": bad}


@pytest.fixture
def data():
    return _data()


GENE_SETS = {"panel": ["G0", "G1", "G2", "G3", "G7"], "rest": ["G4", "G5", "G6", "NOT_A_GENE"]}


def _independent(pred_path, truth_path, genes):
    """Per slide and gene: SciPy r / rho, MSE, MAE from the files, via a pandas join (NaN when constant)."""
    t, p = ad.read_h5ad(truth_path), ad.read_h5ad(pred_path)
    genes = [g for g in genes if g in t.var_names and g in p.var_names]
    tdf = pd.DataFrame(t[:, genes].X.toarray(), columns=genes).assign(**t.obs[["slide_id", "spot_id"]].to_dict("list"))
    pdf = pd.DataFrame(np.asarray(p[:, genes].X), columns=genes).assign(
        **p.obs[["slide_id", "spot_id"]].to_dict("list")
    )
    m = tdf.merge(pdf, on=["slide_id", "spot_id"], suffixes=("_t", "_p"), how="left", validate="one_to_one")
    out = {}
    for slide, df in m.groupby("slide_id", sort=False):
        rows = {}
        for g in genes:
            a, b = df[f"{g}_p"].to_numpy(float), df[f"{g}_t"].to_numpy(float)
            constant = np.ptp(a) == 0 or np.ptp(b) == 0
            rows[g] = (
                np.nan if constant else pearsonr(a, b).statistic,
                np.nan if constant else spearmanr(a, b).statistic,
                np.mean((a - b) ** 2),
                np.mean(np.abs(a - b)),
            )
        out[slide] = rows
    return out, genes


def test_scores_match_scipy_on_h5ad_round_trip(data, tmp_path):
    truth, preds = data
    truth.write_h5ad(tmp_path / "truth.h5ad")
    for m, p in preds.items():
        p.write_h5ad(tmp_path / f"predictions_{m}.h5ad")
    back = {m: ad.read_h5ad(tmp_path / f"predictions_{m}.h5ad") for m in preds}
    metrics = score_predictions(back, ad.read_h5ad(tmp_path / "truth.h5ad"), GENE_SETS)
    json.dumps(metrics, allow_nan=False)  # JSON-able, no NaN

    for m in preds:
        for gs, genes in GENE_SETS.items():
            # Every method is scored on the genes all methods predict ("bad" lacks G7).
            common = [g for g in genes if all(g in p.var_names for p in preds.values())]
            ref, used = _independent(tmp_path / f"predictions_{m}.h5ad", tmp_path / "truth.h5ad", common)
            got = metrics["methods"][m]["gene_sets"][gs]
            assert got["n_genes"] == len(used)
            assert got["n_missing"] == len(genes) - len(used)
            slide_means = {k: [] for k in range(4)}
            for slide, rows in ref.items():
                vals = np.array(list(rows.values()))  # (genes, 4)
                ps = got["per_slide"][slide]
                assert ps["n_spots"] == SLIDES[slide]
                assert ps["n_undefined"] == int(np.isnan(vals[:, 0]).sum())
                for k, key in enumerate(["pearson_mean", "spearman_mean", "mse_mean", "mae_mean"]):
                    want = np.nanmean(vals[:, k])
                    assert ps[key] == pytest.approx(want, abs=1e-6)
                    slide_means[k].append(want)
            assert got["n_undefined"] == sum(p["n_undefined"] for p in got["per_slide"].values())
            for k, stat in enumerate(["pearson", "spearman", "mse", "mae"]):
                v = np.array(slide_means[k])
                assert got[f"{stat}_mean"] == pytest.approx(v.mean(), abs=1e-6)
                assert got[f"{stat}_std_over_slides"] == pytest.approx(v.std(ddof=1), abs=1e-6)
                assert got[f"{stat}_min_over_slides"] == pytest.approx(v.min(), abs=1e-6)
                assert got[f"{stat}_max_over_slides"] == pytest.approx(v.max(), abs=1e-6)
            for g in used:
                r = np.array([ref[s][g][0] for s in ref])
                want = None if np.isnan(r).all() else np.nanmean(r)
                assert got["per_gene_pearson"][g] == (None if want is None else pytest.approx(want, abs=1e-6))


def test_constant_prediction_is_undefined_not_zero(data):
    truth, preds = data
    metrics = score_predictions(preds, truth, GENE_SETS)
    bad = metrics["methods"]["bad"]["gene_sets"]["panel"]
    good = metrics["methods"]["good"]["gene_sets"]["panel"]
    assert bad["per_gene_pearson"]["G1"] is None  # constant on every slide
    # G1 undefined on 3 slides, plus G2 whose truth is constant on slide B.
    assert bad["n_undefined"] == 4
    assert good["n_undefined"] == 1
    assert bad["per_slide"]["B"]["n_undefined"] == 2
    assert good["per_slide"]["B"]["n_undefined"] == 1
    assert good["per_gene_pearson"]["G2"] is not None  # defined on A and C: mean over those two


def test_undefined_excluded_from_mean_by_hand():
    truth = ad.AnnData(
        np.array([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0], [4.0, 5.0]]),
        obs=pd.DataFrame({"slide_id": ["s"] * 4, "spot_id": list("abcd")}, index=list("abcd")),
        var=pd.DataFrame(index=["const", "var"]),
    )
    pred = truth.copy()
    pred.X = np.array([[7.0, 1.0], [7.0, 2.0], [7.0, 3.0], [7.0, 4.0]])
    g = score_predictions({"m": pred}, truth, {"set": ["const", "var"]})["methods"]["m"]["gene_sets"]["set"]
    r = pearsonr([1, 2, 3, 4], [1, 3, 2, 5]).statistic
    assert g["per_slide"]["s"]["pearson_mean"] == pytest.approx(r)  # not (r + 0) / 2
    assert g["pearson_mean"] == pytest.approx(r)
    assert g["n_undefined"] == 1
    assert g["per_gene_pearson"] == {"const": None, "var": pytest.approx(r)}
    assert g["pearson_std_over_slides"] is None  # one slide: no spread


def test_aggregation_over_slides_by_hand():
    # Slide P: gene g1 r = 1, g2 r = -1 -> mean 0. Slide Q: both r = 1 -> mean 1.
    t = np.array([[1, 1], [2, 2], [3, 3], [4, 4], [1, 1], [2, 2], [3, 3]], dtype=float)
    p = np.array([[1, 4], [2, 3], [3, 2], [4, 1], [1, 1], [2, 2], [3, 3]], dtype=float)
    obs = pd.DataFrame({"slide_id": list("PPPPQQQ"), "spot_id": list("1234123")}, index=[str(i) for i in range(7)])
    var = pd.DataFrame(index=["g1", "g2"])
    m = score_predictions({"m": ad.AnnData(p, obs=obs, var=var)}, ad.AnnData(t, obs=obs, var=var), None)
    g = m["methods"]["m"]["gene_sets"]["all"]
    assert g["per_slide"]["P"]["pearson_mean"] == pytest.approx(0.0)
    assert g["per_slide"]["Q"]["pearson_mean"] == pytest.approx(1.0)
    assert g["pearson_mean"] == pytest.approx(0.5)  # slides weigh the same (4 vs 3 spots)
    assert g["pearson_std_over_slides"] == pytest.approx(np.sqrt(0.5))  # ddof=1
    assert (g["pearson_min_over_slides"], g["pearson_max_over_slides"]) == pytest.approx((0.0, 1.0))
    assert g["per_gene_pearson"] == {"g1": pytest.approx(1.0), "g2": pytest.approx(0.0)}
    assert g["mse_mean"] == pytest.approx((((9 + 1 + 1 + 9) / 4) / 2 + 0) / 2)


def test_missing_genes_counted(data):
    truth, preds = data
    metrics = score_predictions(preds, truth, GENE_SETS)
    bad, good = (metrics["methods"][m]["gene_sets"] for m in ("bad", "good"))
    assert (bad["panel"]["n_missing"], bad["panel"]["missing_genes"], bad["panel"]["n_genes"]) == (1, ["G7"], 4)
    # G7 is left out for every method, so that both are compared on the same four genes.
    assert (good["panel"]["n_missing"], good["panel"]["missing_genes"], good["panel"]["n_genes"]) == (1, ["G7"], 4)
    assert set(good["panel"]["per_gene_pearson"]) == set(bad["panel"]["per_gene_pearson"]) == {"G0", "G1", "G2", "G3"}
    assert metrics["gene_set_sizes"] == {
        "panel": {"n_genes": 4, "label": "panel (4 genes)"},
        "rest": {"n_genes": 3, "label": "rest (3 genes)"},
    }
    assert good["rest"]["missing_genes"] == ["NOT_A_GENE"]
    assert set(good["rest"]["per_gene_pearson"]) == {"G4", "G5", "G6"}
    assert metrics["gene_sets"] == GENE_SETS


def test_missing_spot_is_a_clear_error(data):
    truth, preds = data
    keep = ~((preds["good"].obs["slide_id"] == "B") & preds["good"].obs["spot_id"].isin(["s0", "s1"]))
    with pytest.raises(BadInput, match=r"prediction 'good': 2 of 72 measured spots have no prediction \(e\.g\. B/s"):
        score_predictions({"good": preds["good"][keep.to_numpy()].copy()}, truth, GENE_SETS)


def test_bad_inputs_named(data):
    truth, preds = data
    dup = ad.concat([preds["good"], preds["good"][:1]], index_unique="-")
    with pytest.raises(BadInput, match=r"prediction 'good': spot \S+ appears more than once"):
        score_predictions({"good": dup}, truth, GENE_SETS)
    no_slide = truth.copy()
    del no_slide.obs["slide_id"]
    with pytest.raises(BadInput, match="truth: obs has no 'slide_id' column"):
        score_predictions(preds, no_slide, GENE_SETS)
    nan = preds["good"].copy()
    nan.X[0, 0] = np.nan
    with pytest.raises(BadInput, match="prediction 'good': expression contains NaN"):
        score_predictions({"good": nan}, truth, GENE_SETS)


def test_tables(data):
    truth, preds = data
    metrics = score_predictions(preds, truth, GENE_SETS)
    t = metrics_table(metrics)
    assert list(t.index) == ["good", "bad"]
    assert t.loc["good", ("panel", "mean")] == pytest.approx(
        metrics["methods"]["good"]["gene_sets"]["panel"]["pearson_mean"]
    )
    assert t.loc["good", ("panel", "mean")] > t.loc["bad", ("panel", "mean")]
    text = format_table(metrics)
    good_line = next(line for line in text.splitlines() if line.startswith("good"))
    assert "±" in good_line
    assert good_line.rstrip().endswith("*")
    assert "bad / panel: 4 undefined gene-slide correlations excluded, 1 genes missing" in text


def _nontrivial_image(source) -> None:
    arr = np.asarray(Image.open(source).convert("RGB"))
    assert arr.shape[0] > 100
    assert arr.shape[1] > 100
    rgb = arr.reshape(-1, 3).astype(np.uint32)
    assert len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])) > 20  # distinct colours


def _thumbnail() -> Image.Image:
    yy, xx = np.mgrid[0:120, 0:160]
    rgb = np.stack([230 - xx // 4, 170 + yy // 4, 210 + 0 * xx], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text of the page, as a browser would read them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def images(self) -> list[str]:
        return [a["src"] for t, a in self.tags if t == "img"]

    def meta(self, name: str) -> str | None:
        return next((a["content"] for t, a in self.tags if t == "meta" and a.get("name") == name), None)


def _image_of(uri: str) -> io.BytesIO:
    """The bytes of an embedded figure: PNG for line art, JPEG for maps over the H&E."""
    head, _, payload = uri.partition(",")
    assert head in {"data:image/png;base64", "data:image/jpeg;base64"}
    return io.BytesIO(base64.b64decode(payload, validate=True))


NOTES = ["Section-level folds: one patient.", "The aligned methods did not beat raw kNN <here>."]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of two methods, with maps of two slides (A over its thumbnail, B without one)."""
    truth, preds = _data()
    metrics = score_predictions(preds, truth, GENE_SETS)
    out = tmp_path_factory.mktemp("report") / "out"
    thumbs = {"A": (_thumbnail(), SCALE)}
    path = write_report(out, metrics, preds, truth, thumbs, "Test & report", notes=NOTES, max_map_slides=2)
    return path, metrics, preds, truth


def test_write_report(report, tmp_path):
    path, metrics, preds, truth = report
    assert path.name == "report.html"
    text = path.read_text()
    assert "<title>Test &amp; report</title>" in text
    assert "did not beat raw kNN &lt;here&gt;." in text
    assert "<script" not in text
    assert re.search(r"<td><b>\d\.\d{3} ± \d\.\d{3}</b></td>", text)
    page = _Page(text)
    assert page.meta("embedstore.kind") == "report"
    alts = [a["alt"] for t, a in page.tags if t == "img"]
    assert alts == ["per-gene Pearson r", "maps of slide A", "maps of slide B"]
    for src in page.images():
        _nontrivial_image(_image_of(src))
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no figure files beside it
    # A folder holding this page takes the next report: the page carries embedstore's stamp.
    shutil.copy(path, tmp_path / "report.html")
    again = write_report(tmp_path, metrics, preds, truth, None, "Again", max_map_slides=0)
    assert "<title>Again</title>" in again.read_text()


_LINKING_ATTRS = {"src", "href", "srcset", "poster", "data", "action", "background", "xlink:href", "formaction"}


def test_report_is_one_self_contained_file(report, tmp_path):
    alone = tmp_path / "inbox" / "report.html"  # as mailed: the page without the folder it was written in
    alone.parent.mkdir()
    shutil.copy(report[0], alone)
    text = alone.read_text()
    page = _Page(text)
    links = [(t, k, v) for t, a in page.tags for k, v in a.items() if k in _LINKING_ATTRS]
    external = [(t, k, v) for t, k, v in links if not (v or "").startswith(("data:", "#"))]
    assert external == []
    assert not [t for t, _ in page.tags if t in {"link", "script", "iframe", "object", "embed", "base"}]
    assert not re.search(r"url\(|@import", text)  # the inline stylesheet pulls in nothing either
    images = page.images()
    assert len(images) == 3  # the distribution, then the maps of slides A and B
    for src in images:
        _nontrivial_image(_image_of(src))


def test_report_escapes_every_value(data, tmp_path):
    truth, preds = data
    hostile = "<script>alert('x')</script>"
    preds = {f"m{hostile}": preds["good"], "bad": preds["bad"]}
    gene_sets = {f"set{hostile}": GENE_SETS["panel"], "rest": GENE_SETS["rest"]}
    metrics = score_predictions(preds, truth, gene_sets)
    run = "r1' onload='alert(1)"
    note = f"note {hostile} & more"
    path = write_report(
        tmp_path / "out", metrics, preds, truth, None, f"title {hostile}", [note], run=run, max_map_slides=0
    )
    text = path.read_text()
    page = _Page(text)
    assert not [t for t, _ in page.tags if t == "script"]
    assert "<script" not in text
    shown = "".join(page.text)
    for value in (note, f"title {hostile}", f"m{hostile}", f"set{hostile} (4 genes)"):
        assert value in shown, value  # shown as text, not read as markup
    assert page.meta("embedstore.run") == run
    assert not [a for _, a in page.tags if "onload" in a]


def test_plot_prediction_maps(data, tmp_path):
    _, preds = data
    one = preds["good"][preds["good"].obs["slide_id"] == "A"].copy()
    out = plot_prediction_maps(one, _thumbnail(), SCALE, ["G0", "G3", "G5"], tmp_path / "maps.png")
    _nontrivial_image(out)
    with pytest.raises(BadInput, match="prediction: genes not predicted: NOPE"):
        plot_prediction_maps(one, _thumbnail(), SCALE, ["G0", "NOPE"], tmp_path / "x.png")
    with pytest.raises(BadInput, match="prediction: spots of several slides"):
        plot_prediction_maps(preds["good"], _thumbnail(), SCALE, ["G0"], tmp_path / "x.png")
