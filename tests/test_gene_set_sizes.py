"""One size per gene set, computed once and shown the same in the terminal table, report.html and the figures."""

from __future__ import annotations

import html
import json
import re

import pytest

from embedstore import _report_plots
from embedstore.evaluation import evaluate
from embedstore.scoring import gene_set_size
from embedstore.testing import make_synthetic_cohort


def test_label_says_per_fold_and_shared_sizes():
    assert gene_set_size("hvg50", [50], 50) == {"n_genes": 50, "label": "hvg50 (50 genes)"}
    assert gene_set_size("hvg50", [50, 50, 50], 48)["label"] == "hvg50 (50 genes per fold, 48 in every fold)"
    assert gene_set_size("hvg50", [49, 50], 47)["label"] == "hvg50 (49–50 genes per fold, 47 in every fold)"


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    """Cross-validation over 3 patients of a 70-gene cohort: each fold picks its own 50 HVG."""
    base = tmp_path_factory.mktemp("sizes")
    cohort = make_synthetic_cohort(
        base / "cohort", n_slides=3, n_patients=3, n_spots=40, n_genes=70, seed=0, width=1200, height=1200, mpp=1.0
    )
    texts: list[str] = []
    figure_bytes = _report_plots.figure_bytes

    def recording_figure_bytes(fig, fmt="png"):
        # What the figures say: titles, tick labels and any figure text, read off the figure drawn.
        texts.append(fig._suptitle.get_text() if fig._suptitle else "")
        for ax in fig.axes:
            texts.append(ax.get_title())
            texts.extend(t.get_text() for t in ax.get_xticklabels())
        texts.extend(t.get_text() for t in fig.texts)
        return figure_bytes(fig, fmt)

    mp = pytest.MonkeyPatch()
    mp.setattr(_report_plots, "figure_bytes", recording_figure_bytes)
    try:
        result = evaluate(
            cohort.root, base / "out", methods=("ridge", "knn-raw"), k=5, n_genes=20, workers=0, additions=()
        )
    finally:
        mp.undo()
    return result, texts


def test_table_report_and_figures_show_the_size_of_metrics_json(cross_validated):
    result, figure_texts = cross_validated
    metrics = json.loads((result.out / "metrics.json").read_text())
    sizes = metrics["gene_set_sizes"]
    assert set(sizes) == {"hvg50", "mean50", "panel"}
    hvg = sizes["hvg50"]
    # Each fold chose its own 50 HVG among 70 genes; fewer are shared by all three folds.
    assert hvg["n_genes_per_fold"] == {"A": 50, "B": 50, "C": 50}
    assert hvg["n_genes"] < 50
    assert hvg["label"] == f"hvg50 (50 genes per fold, {hvg['n_genes']} in every fold)"
    table = result.table()
    page = html.unescape((result.out / "report.html").read_text())
    figures = "\n".join(figure_texts)
    for gs, size in sizes.items():
        for where, text in (("table", table), ("report.html", page), ("figures", figures)):
            assert size["label"] in text, (where, size["label"])
            # No other size of this gene set anywhere.
            shown = set(re.findall(rf"\b{gs} \([^)]*genes[^)]*\)", text))
            assert shown == {size["label"]}, (where, shown)
        for method, res in metrics["methods"].items():
            entry = res["gene_sets"][gs]
            assert entry["n_genes"] == size["n_genes"], (method, gs)
            assert entry["n_genes_per_fold"] == size["n_genes_per_fold"]
            # The per-gene numbers (and the figure's points) cover exactly those genes.
            assert len(entry["per_gene_pearson"]) == size["n_genes"]
        for fold, fm in metrics["folds"].items():
            n = fm["gene_set_sizes"][gs]["n_genes"]
            assert n == size["n_genes_per_fold"][fold]
            assert all(r["gene_sets"][gs]["n_genes"] == n for r in fm["methods"].values())
    # The per-fold metrics.json files carry the same per-fold sizes.
    for fold in "ABC":
        fm = json.loads((result.out / f"fold-{fold}" / "metrics.json").read_text())
        assert fm["gene_set_sizes"]["hvg50"] == {"n_genes": 50, "label": "hvg50 (50 genes)"}
