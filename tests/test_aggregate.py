from __future__ import annotations

import math

import numpy as np
import pytest

from embedstore.aggregate import (
    AGGREGATORS,
    LearnedAggregatorConfig,
    create_aggregator,
    fit_learned_aggregator,
    idw,
    load_learned_aggregator,
    mean,
    softmax,
)
from embedstore.errors import BadInput


@pytest.fixture(autouse=True)
def one_torch_thread():
    # tiny models train fastest on one thread, and other jobs share this machine's cores
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SIMS = np.array([[0.9, 0.5], [0.2, 0.2]])
EXPR = np.array([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 10.0], [2.0, 0.0]]], dtype=np.float32)


def test_mean_by_hand():
    np.testing.assert_allclose(mean(SIMS, EXPR), [[2.0, 3.0], [1.0, 5.0]])


def test_softmax_by_hand():
    w1 = math.exp(0.9 / 0.1) / (math.exp(0.9 / 0.1) + math.exp(0.5 / 0.1))  # = 1/(1+e^-4)
    expected = [[w1 * 1 + (1 - w1) * 3, w1 * 2 + (1 - w1) * 4], [1.0, 5.0]]
    np.testing.assert_allclose(softmax(SIMS, EXPR, tau=0.1), expected, rtol=1e-6)
    # a huge temperature is the mean, a tiny one the top neighbour
    np.testing.assert_allclose(softmax(SIMS, EXPR, tau=1e6), mean(SIMS, EXPR), rtol=1e-5)
    np.testing.assert_allclose(softmax(SIMS, EXPR, tau=1e-4)[0], [1.0, 2.0])


def test_idw_by_hand():
    a, b = 1 / (0.1 + 1e-3), 1 / (0.5 + 1e-3)  # distances 1 - 0.9 and 1 - 0.5
    w1 = a / (a + b)
    expected = [[w1 * 1 + (1 - w1) * 3, w1 * 2 + (1 - w1) * 4], [1.0, 5.0]]
    np.testing.assert_allclose(idw(SIMS, EXPR, eps=1e-3), expected, rtol=1e-6)
    # an exact duplicate (sim 1) dominates but does not divide by zero
    assert np.isfinite(idw(np.array([[1.0, 0.0]]), EXPR[:1])).all()


def test_registry_and_errors():
    assert {"mean", "softmax", "idw", "learned"} <= set(AGGREGATORS.names())
    agg = create_aggregator("softmax", tau=0.5)
    np.testing.assert_allclose(agg(SIMS, EXPR), softmax(SIMS, EXPR, 0.5))
    assert agg.params == {"tau": 0.5}
    with pytest.raises(BadInput, match="aggregator 'softmx': not registered; did you mean softmax"):
        create_aggregator("softmx")
    with pytest.raises(BadInput, match=r"must be \(N, k\) and \(N, k, G\)"):
        mean(SIMS, EXPR[:, :1])
    with pytest.raises(BadInput, match="sims has NaN/inf"):
        mean(np.array([[0.9, -np.inf], [0.1, 0.1]]), EXPR)


def _neighbour_task(n=600, k=8, d=16, g=5, seed=0):
    """The target is the expression of the neighbour whose key is closest to the query,
    while the given similarities are uninformative: attention must learn to use the keys."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d)).astype(np.float32)
    keys = rng.standard_normal((n, k, d)).astype(np.float32)
    hit = rng.integers(0, k, n)
    keys[np.arange(n), hit] = q + 0.1 * rng.standard_normal((n, d))
    expr = rng.gamma(2.0, 1.0, (n, k, g)).astype(np.float32)
    sims = rng.uniform(0.4, 0.6, (n, k)).astype(np.float32)
    return q, keys, expr, sims, expr[np.arange(n), hit]


def test_learned_aggregator_beats_mean_and_round_trips(tmp_path):
    q, keys, expr, sims, target = _neighbour_task()
    cfg = LearnedAggregatorConfig(hidden=32, max_epochs=25, patience=25, lr=3e-3)
    agg = fit_learned_aggregator(q[:500], keys[:500], expr[:500], sims[:500], target[:500], cfg, seed=0)
    assert agg.history[-1]["train_loss"] < agg.history[0]["train_loss"]
    pred = agg(sims[500:], expr[500:], query_keys=q[500:], neighbour_keys=keys[500:])
    mse_learned = float(np.mean((pred - target[500:]) ** 2))
    mse_mean = float(np.mean((mean(sims[500:], expr[500:]) - target[500:]) ** 2))
    assert mse_learned < 0.5 * mse_mean
    agg.save(tmp_path / "agg")
    again = create_aggregator("learned", path=tmp_path / "agg")
    np.testing.assert_array_equal(again(sims, expr, q, keys), agg(sims, expr, q, keys))
    with pytest.raises(BadInput, match="needs query_keys"):
        agg(sims, expr)
    (tmp_path / "agg" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(BadInput, match=r"agg/model.safetensors: cannot be read as safetensors"):
        load_learned_aggregator(tmp_path / "agg")


def test_each_training_epoch_prints_a_progress_line(caplog):
    q, keys, expr, sims, target = _neighbour_task(n=60)
    cfg = LearnedAggregatorConfig(hidden=8, max_epochs=3, patience=3)
    with caplog.at_level("INFO", logger="embedstore.progress"):
        agg = fit_learned_aggregator(q, keys, expr, sims, target, cfg, seed=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "embedstore.progress"]
    assert [line.split(" (")[0] for line in lines] == [
        f"learned aggregator epoch {h['epoch'] + 1}/3: train {h['train_loss']:.4f} val {h['val_loss']:.4f}"
        for h in agg.history
    ]
