"""evaluate(): every method's predictions on disk, and metrics.json equal to an independent computation."""

from __future__ import annotations

import json
import re
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

import embedstore as es
from embedstore.evaluation import METHODS as ALL_METHODS
from embedstore.evaluation import TEXT_METHODS, evaluate
from embedstore.index_folder import load_index
from embedstore.testing import make_synthetic_cohort

# The built-in encoder has no text tower: evaluate runs every method but Loki's.
METHODS = [m for m in ALL_METHODS if m not in TEXT_METHODS]


def _split_cohort(root, query_patients, dest):
    """Two her2st-layout folders from one cohort: sections of ``query_patients`` go to the query."""
    ref, qry = dest / "reference", dest / "query"
    for part in (ref, qry):
        for sub in ("ST-cnts", "ST-spotfiles", "ST-imgs"):
            (part / "data" / sub).mkdir(parents=True)
    for patient_dir in (root / "data" / "ST-imgs").iterdir():
        target = qry if patient_dir.name in query_patients else ref
        shutil.copytree(patient_dir, target / "data" / "ST-imgs" / patient_dir.name)
        for section in (p.name for p in patient_dir.iterdir()):
            shutil.copy(root / "data" / "ST-cnts" / f"{section}.tsv.gz", target / "data" / "ST-cnts")
            shutil.copy(root / "data" / "ST-spotfiles" / f"{section}_selection.tsv", target / "data" / "ST-spotfiles")
    return ref, qry


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    cohort = make_synthetic_cohort(
        base / "cohort", n_slides=4, n_patients=2, n_genes=40, seed=5, width=2400, height=2400
    )
    ref, qry = _split_cohort(cohort.root, {"B"}, base)
    result = evaluate(
        ref, base / "out", query=qry, k=10, n_genes=30, aligner={"max_epochs": 30, "proj_dim": 64}, workers=0,
        additions=(),  # tests/test_spatial_predict.py and the README's evaluate line run them
    )  # fmt: skip
    return result, qry


def test_every_method_writes_predictions_for_every_query_spot(evaluated):
    result, qry = evaluated
    spots = set()
    for p in (qry / "data" / "ST-spotfiles").iterdir():
        table = pd.read_csv(p, sep="\t")
        spots |= {(p.name.split("_")[0], f"{x}x{y}") for x, y in zip(table.x, table.y, strict=True)}
    for method in METHODS:
        adata = ad.read_h5ad(result.out / f"predictions_{method}.h5ad")
        assert set(zip(adata.obs.slide_id, adata.obs.spot_id, strict=True)) == spots
        assert np.isfinite(adata.X).all()
        np.testing.assert_array_equal(adata.obsm["spatial"], adata.obs[["x", "y"]].to_numpy(dtype=float))
    assert (result.out / "report.html").is_file()


def test_every_methods_file_draws_over_the_query_he(evaluated):
    """Evaluation predictions carry the same contract as predict's: obs columns and uns['spatial'] per slide."""
    result, qry = evaluated
    slides = sorted(p.name for p in (qry / "data" / "ST-imgs").glob("*/*"))
    columns = None
    for method in METHODS:
        adata = ad.read_h5ad(result.out / f"predictions_{method}.h5ad")
        columns = columns or list(adata.obs.columns)
        assert list(adata.obs.columns) == columns  # ridge included: one obs contract
        assert sorted(adata.uns["spatial"]) == slides
        for lib in adata.uns["spatial"].values():
            image, scale = lib["images"]["lowres"], lib["scalefactors"]["tissue_lowres_scalef"]
            assert image.dtype == np.uint8
            assert max(image.shape[:2]) <= 600
            # every spot lands inside the image, as scanpy places it
            xy = adata.obsm["spatial"] * scale
            assert (xy >= 0).all()
            assert (xy[:, 0] < image.shape[1]).all()
            assert (xy[:, 1] < image.shape[0]).all()


def test_predictions_are_what_predict_gives_from_the_written_indexes(evaluated):
    """The kNN methods are measured through the public stages: index folders read back by predict()."""
    result, _ = evaluated
    aggregators = {"knn-raw": None, "bleep": "mean", "softmax": "softmax", "idw": "idw", "learned": None}
    for method, aggregator in aggregators.items():
        written = ad.read_h5ad(result.out / f"predictions_{method}.h5ad")
        folder = result.out / written.uns["embedstore"]["index"]
        index = load_index(folder)
        assert set(index.exemplars.column("slide_id").to_pylist()) == {"A1", "A2"}  # the reference only
        assert index.manifest["aggregator"]["name"] == ("mean" if method == "knn-raw" else "learned")
        again = es.predict(folder, result.out / "store", cohort="query", aggregator=aggregator, images=False)
        assert list(again.obs_names) == list(written.obs_names)
        np.testing.assert_array_equal(again.X, written.X)


def _independent_truth(qry, slide):
    counts = pd.read_csv(qry / "data" / "ST-cnts" / f"{slide}.tsv.gz", sep="\t", index_col=0)
    norm = np.log1p(counts.to_numpy(float) / counts.to_numpy(float).sum(axis=1, keepdims=True) * 1e4)
    return pd.DataFrame(norm, index=counts.index.astype(str), columns=counts.columns)


def test_metrics_json_agrees_with_scipy_from_the_files(evaluated):
    result, qry = evaluated
    metrics = json.loads((result.out / "metrics.json").read_text())
    for method in METHODS:
        adata = ad.read_h5ad(result.out / f"predictions_{method}.h5ad")
        for gene_set, genes in metrics["gene_sets"].items():
            per_slide = []
            for slide in sorted(set(adata.obs.slide_id)):
                sub = adata[adata.obs.slide_id == slide]
                truth = _independent_truth(qry, slide).loc[sub.obs.spot_id.astype(str), genes]
                pred = sub[:, genes].X
                rs = [pearsonr(pred[:, j], truth.iloc[:, j].to_numpy())[0] for j in range(len(genes))]
                per_slide.append(np.nanmean(rs))
            want = metrics["methods"][method]["gene_sets"][gene_set]["pearson_mean"]
            assert want == pytest.approx(float(np.mean(per_slide)), abs=1e-5), (method, gene_set)


def test_image_signal_is_recovered(evaluated):
    result, _ = evaluated
    scores = {m: result.metrics["methods"][m]["gene_sets"]["hvg50"]["pearson_mean"] for m in METHODS}
    assert max(scores.values()) > 0.4, scores
    # the table marks the best method of each gene set, and only it
    rows = [re.split(r"\s{2,}", line.strip()) for line in result.table().splitlines()]
    header = next(r for r in rows if r[0] == "method")
    body = {r[0]: r[1:] for r in rows if r[0] in METHODS}
    for col, gene_set in enumerate(header[1:]):
        name = gene_set.split(" ")[0]
        means = {m: result.metrics["methods"][m]["gene_sets"][name]["pearson_mean"] for m in METHODS}
        starred = [m for m, cells in body.items() if cells[col].endswith("*")]
        assert starred == [max(means, key=means.get)], (gene_set, starred, means)


def test_cross_validation_holds_out_each_patient(tmp_path, capsys):
    cohort = make_synthetic_cohort(
        tmp_path / "cv", n_slides=3, n_patients=3, n_genes=30, seed=2, width=2000, height=2000
    )
    result = evaluate(
        cohort.root, tmp_path / "out", methods=("ridge", "knn-raw"), k=5, n_genes=20, workers=0, additions=()
    )
    assert result.metrics["split"] == {"mode": "cross-validation", "unit": "patient", "folds": ["A", "B", "C"]}
    for fold in "ABC":
        fold_pred = ad.read_h5ad(tmp_path / "out" / f"fold-{fold}" / "predictions_ridge.h5ad")
        assert set(fold_pred.obs.slide_id) == {f"{fold}1"}
        # the fold's index is built from the other patients' slides only
        index = load_index(tmp_path / "out" / f"fold-{fold}" / "indexes" / "knn-raw")
        assert set(index.exemplars.column("slide_id").to_pylist()) == {f"{p}1" for p in "ABC" if p != fold}
    per_slide = result.metrics["methods"]["ridge"]["gene_sets"]["hvg50"]["per_slide"]
    assert sorted(per_slide) == ["A1", "B1", "C1"]
    # one progress line per step, with its duration, on stderr
    err = capsys.readouterr().err
    for line in (
        "embedstore: embedding the reference cohort",
        "embedstore: fold 1/3: patient A held out (1 slides), 2 training slides",
        "embedstore: fold 3/3: patient C held out",
        "embedstore: fold B: fitting the ridge probe done (",
        "embedstore: fold B: building the knn-raw index from 2 slides done (",
        "embedstore: fold B: predicting knn-raw done (",
        "embedstore: fold C: scoring done (",
        "embedstore: writing the report done (",
    ):
        assert line in err, (line, err)
