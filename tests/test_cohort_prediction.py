"""Cohort prediction: one .h5ad per slide in a folder, resumable, never over a folder embedstore did not write."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run

import embedstore as es
from embedstore.cohort_prediction import predict_cohort, slide_file
from embedstore.errors import BadInput


def assert_same_as_predict(out, index, store, slides):
    """Each slide's file holds what `es.predict` of that slide alone returns."""
    for slide in slides:
        got = ad.read_h5ad(slide_file(out, "synthetic", slide))
        want = es.predict(index, store, slide_ids=[slide], cohort="synthetic")
        assert np.array_equal(got.X, want.X)
        assert got.obs.reset_index(drop=True).equals(want.obs.reset_index(drop=True))
        assert list(got.var_names) == list(want.var_names)


def test_one_file_per_slide_equal_to_predict_and_resumed(index, store, tmp_path):
    out = tmp_path / "pred"
    report = predict_cohort(index, store, out)
    assert report.ok
    slides = [r.slide_id for r in report.results]
    assert [r.status for r in report.results] == ["done"] * 3
    assert_same_as_predict(out, index, store, slides)
    slide_file(out, "synthetic", slides[1]).unlink()  # as if the run had died before this slide
    again = predict_cohort(index, store, out)
    assert [r.status for r in again.results] == ["skipped", "done", "skipped"]
    assert_same_as_predict(out, index, store, slides)


def test_other_settings_or_a_foreign_folder_are_refused(index, store, tmp_path):
    out = tmp_path / "pred"
    first = es.open_store(store).sql("SELECT min(slide_id) AS s FROM slides").s[0]
    assert predict_cohort(index, store, out, slide_ids=[first]).ok
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(BadInput, match=r"other settings \(k\)"):
        predict_cohort(index, store, out, k=3)
    assert sorted(p.name for p in out.rglob("*")) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(BadInput, match="not an embedstore predictions folder"):
        predict_cohort(index, store, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(BadInput, match="embedstore store"):
        predict_cohort(index, store, store)


def test_cli_folder_out_writes_per_slide_files(index, store, tmp_path):
    out = tmp_path / "pred"
    result = run("predict", "--index", index, "--store", store, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "3 done, 0 skipped, 0 failed" in result.stdout
    assert len(list(out.glob("synthetic/*.h5ad"))) == 3
    bad = run("predict", "--index", index, "--store", store, "--out", tmp_path / "p.h5ad", "--engine", "ray")
    assert_one_line_error(bad, "--engine ray writes one .h5ad per slide into a folder")
