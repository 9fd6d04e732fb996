"""Prediction metrics on arrays: per-gene Pearson and Spearman within a slide, MSE, MAE.

Pure functions over ``(spots, genes)`` arrays. A gene whose prediction or truth is
constant over a slide has no correlation: it is counted and reported as undefined,
never turned into 0 and never dropped silently.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gene_metrics", "pearson_columns", "spearman_columns"]


def pearson_columns(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``pred`` with the same column of ``truth``.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays.

    Returns
    -------
    ``(n_genes,)`` float64; NaN where either column is constant.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    p = p - p.mean(axis=0)
    t = t - t.mean(axis=0)
    num = (p * t).sum(axis=0)
    den = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
    # Relative threshold: a column is constant when its spread is at rounding level.
    scale = np.maximum(np.abs(pred).max(axis=0, initial=0), np.abs(truth).max(axis=0, initial=0)) + 1e-30
    constant = (p.std(axis=0) <= 1e-9 * scale) | (t.std(axis=0) <= 1e-9 * scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[constant] = np.nan
    return r


def _rank_columns(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0, method="average")


def spearman_columns(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation per column (Pearson of average ranks); NaN where constant."""
    return pearson_columns(_rank_columns(pred), _rank_columns(truth))


def gene_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene metrics over the spots of one slide.

    Returns
    -------
    A dict of ``(n_genes,)`` arrays: ``pearson``, ``spearman`` (NaN where undefined),
    ``mse`` and ``mae``.
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape:
        msg = f"prediction shape {pred.shape} differs from truth shape {truth.shape}"
        raise ValueError(msg)
    err = pred - truth
    return {
        "pearson": pearson_columns(pred, truth),
        "spearman": spearman_columns(pred, truth),
        "mse": (err**2).mean(axis=0),
        "mae": np.abs(err).mean(axis=0),
    }
