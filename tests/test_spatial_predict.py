"""Spatial smoothing of predictions (strength chosen on the reference, never the query) and evaluate's additions."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run

import embedstore as es
from embedstore.build import build_index, load_reference
from embedstore.expression import apply_panel, normalize_log1p
from embedstore.index_folder import load_index
from embedstore.recipes import AggregatorSpec, IndexSpec, PanelSpec, Recipe
from embedstore.smoothing import choose_alpha

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe() -> Recipe:
    return Recipe(
        name="raw", encoder="builtin", cohort="synthetic", aligner=None, panel=PanelSpec(n_genes=12),
        index=IndexSpec(factory="Flat", keys="image"), aggregator=AggregatorSpec(name="mean", k=5),
    )  # fmt: skip


@pytest.fixture(scope="module")
def raw_index(store, tmp_path_factory):
    return build_index(_recipe(), store, tmp_path_factory.mktemp("smooth") / "raw.index")


def _brute_smooth(pred: np.ndarray, xy_um: np.ndarray, radius: float, alpha: float) -> np.ndarray:
    out = pred.copy()
    for i in range(len(pred)):
        near = [j for j in range(len(pred)) if j != i and np.hypot(*(xy_um[i] - xy_um[j])) <= radius]
        if near:
            out[i] = (1 - alpha) * pred[i] + alpha * pred[near].mean(0)
    return out


def test_the_strength_is_chosen_on_the_reference_by_leaving_each_patient_out(store, raw_index):
    idx = load_index(raw_index)
    chosen = idx.manifest["smoothing"]
    assert chosen["radius_um"] == 250.0
    assert chosen["chosen_on"] == "reference, leave one patient out"  # one section per patient here
    # recomputed here: each reference spot predicted without its own patient, then scored per alpha
    ref = load_reference(store, "builtin", cohort="synthetic")
    slides = ref.column("slide_id").astype(str)
    pred = idx.predict(ref.embeddings, k=5, query_groups=ref.column("patient").astype(str), group_by="patient")
    truth = apply_panel(normalize_log1p(ref.counts), ref.genes, idx.panel)
    xy = np.column_stack([ref.obs.column("x").to_numpy(), ref.obs.column("y").to_numpy()]) * 1.0  # 1 µm/px
    alpha, scores = choose_alpha(pred, truth, xy, slides, 250.0)
    assert chosen["alpha"] == alpha
    assert chosen["scores"] == pytest.approx({f"{a:g}": v for a, v in scores.items()})


def test_predict_smooth_is_the_brute_force_neighbour_mean_of_each_slide(store, raw_index):
    idx = load_index(raw_index)
    idx.manifest["smoothing"]["alpha"] = 0.5  # a strength that changes the numbers, whatever was chosen
    plain = es.predict(idx, store, cohort="synthetic", images=False)
    smoothed = es.predict(idx, store, cohort="synthetic", images=False, smooth=True)
    assert smoothed.uns["embedstore"]["smoothing"] == {"radius_um": 250.0, "alpha": 0.5}
    for slide in plain.obs["slide_id"].unique():
        rows = (plain.obs["slide_id"] == slide).to_numpy()
        xy = plain.obsm["spatial"][rows].astype(float) * 1.0
        want = _brute_smooth(np.asarray(plain.X[rows]), xy, 250.0, 0.5)
        np.testing.assert_allclose(smoothed.X[rows], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(smoothed.X, plain.X)


def test_smooth_without_a_chosen_strength_is_one_line(cohort, store, tmp_path):
    one_slide = build_index(_recipe(), store, tmp_path / "one.index", slide_ids=[cohort.sections[0].section])
    assert "smoothing" not in load_index(one_slide).manifest  # one slide: nothing to leave out
    result = run("predict", "--index", one_slide, "--store", store, "--out", tmp_path / "p.h5ad", "--smooth")
    assert_one_line_error(result, "--smooth", "no smoothing chosen on its reference")
    assert not (tmp_path / "p.h5ad").exists()


def test_evaluate_reports_the_paired_gain_of_context_and_smoothing(cohort, tmp_path):
    result = es.evaluate(
        cohort.root, tmp_path / "eval", k=5, n_genes=12, workers=0, methods=["ridge", "knn-raw"],
        additions=["context", "smooth"],
    )  # fmt: skip
    methods = result.metrics["methods"]
    assert set(methods) == {"ridge", "knn-raw", "ridge+context", "knn-raw+context", "knn-raw+smooth"}
    gains = result.metrics["gains"]
    for addition, method in (("context", "ridge"), ("context", "knn-raw"), ("smooth", "knn-raw")):
        g = gains[addition][method]["hvg50"]
        with_, without = methods[f"{method}+{addition}"], methods[method]
        diffs = [
            with_["gene_sets"]["hvg50"]["per_slide"][s]["pearson_mean"] - v["pearson_mean"]
            for s, v in without["gene_sets"]["hvg50"]["per_slide"].items()
        ]
        assert g["n_slides"] == len(diffs) == 3
        assert g["mean"] == pytest.approx(np.mean(diffs))
        assert g["se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3))
    assert "gain of +context for ridge" in result.table()
