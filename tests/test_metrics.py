"""Per-gene metrics against SciPy, column by column."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from embedstore.metrics import gene_metrics, pearson_columns, spearman_columns


def test_pearson_and_spearman_match_scipy():
    rng = np.random.default_rng(0)
    truth = rng.poisson(2.0, (40, 6)).astype(float)  # many ties: exercises average ranks
    pred = truth + rng.normal(0, 1.5, truth.shape)
    pred[:, 5] = np.round(pred[:, 5])
    r, rho = pearson_columns(pred, truth), spearman_columns(pred, truth)
    for j in range(truth.shape[1]):
        assert r[j] == pytest.approx(pearsonr(pred[:, j], truth[:, j]).statistic, abs=1e-12)
        assert rho[j] == pytest.approx(spearmanr(pred[:, j], truth[:, j]).statistic, abs=1e-12)


def test_constant_columns_are_nan():
    truth = np.array([[1.0, 5.0, 1.0], [2.0, 5.0, 3.0], [3.0, 5.0, 2.0]])
    pred = np.array([[4.0, 1.0, 1e6], [4.0, 2.0, 1e6], [4.0, 3.0, 1e6]])
    m = gene_metrics(pred, truth)
    assert np.isnan(m["pearson"]).all()
    assert np.isnan(m["spearman"]).all()
    assert np.isfinite(m["mse"]).all()
    assert m["mae"][0] == pytest.approx(2.0)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) differs from truth shape \(2, 2\)"):
        gene_metrics(np.zeros((2, 3)), np.zeros((2, 2)))
