from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from embedstore.errors import BadInput
from embedstore.expression import Panel, apply_panel, normalize_log1p, select_panel


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    X = rng.poisson(rng.gamma(1.0, 3.0, size=(40, 12)), size=(40, 12)).astype(np.float32)
    X[3] = 0  # an empty spot
    return X, [f"g{i}" for i in range(12)]


def test_normalize_matches_manual_reference(counts):
    X, _ = counts
    tot = X.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.log1p(np.nan_to_num(X / tot) * 1e4)
    np.testing.assert_allclose(normalize_log1p(X), ref, rtol=1e-5)
    out = normalize_log1p(sp.csr_matrix(X))
    assert sp.issparse(out)
    assert out.nnz == sp.csr_matrix(X).nnz  # zeros stay zeros
    np.testing.assert_allclose(out.toarray(), ref, rtol=1e-5)
    assert np.all(out.toarray()[3] == 0)


def test_normalize_rejects_logged_data(counts):
    with pytest.raises(BadInput, match="negative or non-finite values; pass raw counts"):
        normalize_log1p(counts[0] - 1)


def test_hvg_and_mean_panels_rank_log_normalised_genes(counts):
    X, genes = counts
    L = normalize_log1p(X)
    hvg = select_panel(X, genes, "hvg", n=4)
    assert list(hvg.genes) == [genes[i] for i in np.argsort(-L.var(0), kind="stable")[:4]]
    assert hvg.method == "hvg"
    assert hvg.params["score"] == "variance of log1p(normalised counts)"
    top = select_panel(sp.csr_matrix(X), genes, "mean", n=3)
    assert list(top.genes) == [genes[i] for i in np.argsort(-L.mean(0), kind="stable")[:3]]
    given = select_panel(X, genes, ["g5", "g1"])
    assert given.genes == ("g5", "g1")
    assert given.method == "list"


def test_panel_is_chosen_on_the_reference_only(counts):
    X, genes = counts
    panel = select_panel(X, genes, "hvg", n=5)
    # a query with wildly different values and an extra gene gets the reference's columns
    rng = np.random.default_rng(1)
    q_genes = [*reversed(genes), "extra"]
    Q = rng.poisson(50, size=(7, len(q_genes))).astype(np.float32)
    out = apply_panel(Q, q_genes, panel)
    assert out.shape == (7, 5)
    np.testing.assert_array_equal(out, Q[:, [q_genes.index(g) for g in panel.genes]])
    assert select_panel(X, genes, "hvg", n=5) == panel


def test_missing_genes_error_or_zero_fill(counts, caplog):
    X, genes = counts
    panel = Panel(("g0", "nope1", "g2", "nope2"), "list")
    with pytest.raises(BadInput, match=r"2 of 4 panel genes are missing: \['nope1', 'nope2'\]; pass missing='zero'"):
        apply_panel(X, genes, panel)
    with caplog.at_level(logging.WARNING):
        out = apply_panel(sp.csr_matrix(X), genes, panel, missing="zero")
    assert "2 of 4 panel genes missing" in caplog.text
    np.testing.assert_array_equal(out[:, [1, 3]], 0)
    np.testing.assert_array_equal(out[:, [0, 2]], X[:, [0, 2]])
    with pytest.raises(BadInput, match="2 genes not in the reference"):
        select_panel(X, genes, ["g0", "x", "y"])


def test_panel_json_round_trip_and_validation():
    p = Panel(("A", "B"), "hvg", {"n": 2})
    assert Panel.from_json(p.to_json()) == p
    with pytest.raises(BadInput, match=r"duplicate genes \['A'\]"):
        Panel(("A", "A"), "list")
    with pytest.raises(BadInput, match=r"panel\.json: not valid JSON"):
        Panel.from_json("{oops")
