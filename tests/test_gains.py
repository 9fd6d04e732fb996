"""Paired gains of an addition (method+addition vs method), slide by slide, against a hand computation."""

from __future__ import annotations

import math

import pytest

from embedstore.report import format_gains
from embedstore.scoring import paired_gains


def _method(per_slide: dict[str, float | None]) -> dict:
    return {"gene_sets": {"hvg50": {"per_slide": {s: {"pearson_mean": v} for s, v in per_slide.items()}}}}


def test_paired_gain_is_the_mean_and_standard_error_of_per_slide_differences():
    metrics = {
        "methods": {
            "ridge": _method({"A": 0.10, "B": 0.20, "C": 0.30, "D": None}),
            "ridge+smooth": _method({"A": 0.15, "B": 0.20, "C": 0.40, "D": 0.5}),
            "knn-raw": _method({"A": 0.1, "B": 0.1, "C": 0.1, "D": 0.1}),  # no variant: no gain reported
        }
    }
    gains = paired_gains(metrics, ["smooth", "context"])
    g = gains["smooth"]["ridge"]["hvg50"]
    diffs = [0.05, 0.0, 0.10]  # slide D is undefined without smoothing: left out of the pairing
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert g["n_slides"] == 3
    assert g["mean"] == pytest.approx(mean)
    assert g["se"] == pytest.approx(sd / math.sqrt(3))
    assert set(g["per_slide"]) == {"A", "B", "C"}
    assert set(gains) == {"smooth"}
    assert "knn-raw" not in gains["smooth"]
    (line,) = format_gains({"gains": gains})
    assert line.startswith("gain of +smooth for ridge (paired over 3 slides")
    assert f"hvg50 +{mean:.3f} ± {sd / math.sqrt(3):.3f}" in line


def test_report_maps_draw_the_methods_without_additions_and_the_best_one():
    from embedstore.report import _mapped

    preds = {m: object() for m in ("ridge", "knn-raw", "ridge+context", "learned", "learned+context", "learned+smooth")}
    assert list(_mapped(preds, "learned+context")) == ["ridge", "knn-raw", "learned", "learned+context"]
    assert list(_mapped(preds, "learned")) == ["ridge", "knn-raw", "learned"]
