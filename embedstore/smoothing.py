"""Spatial smoothing of predictions: each tile's prediction pulled towards its neighbours' mean.

Expression varies smoothly over tissue while per-tile prediction errors are largely
independent, so averaging a prediction with those of the tiles around it removes part of the
error (the graph step of Hist2ST and STFlow, without training). Arrays in, arrays out:

- :func:`neighbour_graph`: the row-normalised mean over the other tiles within a radius (µm);
- :func:`smooth`: ``(1 - alpha) * pred + alpha * graph @ pred``;
- :func:`choose_alpha`: the ``alpha`` that maximises the mean per-gene Pearson of held-out
  predictions *of the reference* (leave-slide-out), never chosen on the query.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedstore.errors import BadInput
from embedstore.metrics import pearson_columns

__all__ = ["DEFAULT_ALPHAS", "choose_alpha", "neighbour_graph", "smooth"]

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _xy(xy_um: Any, where: str) -> np.ndarray:
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        msg = f"{where}: xy_um has shape {xy.shape} or non-finite values; pass (N, 2) finite tile centres in µm"
        raise BadInput(msg)
    return xy


def _radius(radius_um: Any, where: str) -> float:
    try:
        r = float(radius_um)
    except (TypeError, ValueError):
        r = math.nan
    if not math.isfinite(r) or r <= 0:
        msg = f"{where}: radius_um={radius_um!r}: must be a positive distance in µm"
        raise BadInput(msg)
    return r


def neighbour_graph(xy_um: np.ndarray, radius_um: float) -> Any:
    """The mean over each tile's neighbours within ``radius_um``, itself excluded, as a sparse matrix.

    Parameters
    ----------
    xy_um
        ``(N, 2)`` tile centres in µm of one slide (build one graph per slide, so tiles of
        different slides are never neighbours).
    radius_um
        Neighbours are the other tiles at most this far (centre to centre).

    Returns
    -------
    ``(N, N)`` float32 ``scipy.sparse.csr_matrix``, each row summing to 1 over the tile's
    neighbours; rows of tiles without a neighbour are all zero.
    """
    from scipy import sparse
    from scipy.spatial import cKDTree

    xy = _xy(xy_um, "neighbour_graph")
    r = _radius(radius_um, "neighbour_graph")
    n = len(xy)
    if n == 0:
        return sparse.csr_matrix((0, 0), dtype=np.float32)
    tree = cKDTree(xy)
    pairs = tree.sparse_distance_matrix(tree, r, output_type="ndarray")
    pairs = pairs[pairs["i"] != pairs["j"]]
    i, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    counts = np.bincount(i, minlength=n)
    weights = (1.0 / counts[i]).astype(np.float32)
    graph = sparse.csr_matrix((weights, (i, j)), shape=(n, n), dtype=np.float32)
    graph.sum_duplicates()
    graph.sort_indices()
    return graph


def _alpha(alpha: Any, where: str) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = math.nan
    if not 0.0 <= a <= 1.0:
        msg = f"{where}: alpha={alpha!r}: must be in [0, 1] (0: no smoothing, 1: the neighbours' mean only)"
        raise BadInput(msg)
    return a


def smooth(pred: np.ndarray, graph: Any, alpha: float) -> np.ndarray:
    """``(1 - alpha) * pred + alpha * (graph @ pred)``, float32; tiles without a neighbour keep their prediction.

    Parameters
    ----------
    pred
        ``(N, G)`` predictions, rows aligned with the graph.
    graph
        :func:`neighbour_graph` of the same tiles.
    alpha
        In ``[0, 1]``: 0 leaves ``pred`` as it is, 1 replaces each prediction by its neighbours' mean.
    """
    a = _alpha(alpha, "smooth")
    p = np.asarray(pred, dtype=np.float32)
    if p.ndim != 2 or graph.shape != (len(p), len(p)):
        msg = f"smooth: pred has shape {p.shape}, graph {graph.shape}; pass (N, G) predictions and the (N, N) graph of their tiles"
        raise BadInput(msg)
    if a == 0.0:
        return p.copy()
    mean = np.asarray(graph @ p, dtype=np.float32)
    out = ((1.0 - a) * p + a * mean).astype(np.float32)
    alone = np.diff(graph.indptr) == 0  # no neighbour: the prediction stays its own
    out[alone] = p[alone]
    return out


def choose_alpha(
    pred: np.ndarray,
    truth: np.ndarray,
    xy_um: np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    radius_um: float,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> tuple[float, dict[float, float]]:
    """The smoothing strength that best recovers ``truth`` from ``pred``, and the score of each.

    Call it on leave-slide-out predictions of the *reference* (their truth is known), never on
    the query. The graph is built per group (slide), so tiles of different slides are never
    neighbours.

    Parameters
    ----------
    pred, truth
        ``(N, G)`` predicted and measured (log-normalised) expression.
    xy_um
        ``(N, 2)`` tile centres in µm.
    groups
        ``(N,)`` slide of each row.
    radius_um
        Neighbour radius of :func:`neighbour_graph`.
    alphas
        Candidates in ``[0, 1]``.

    Returns
    -------
    ``(alpha, scores)``: ``scores[alpha]`` is the mean over slides of the slide's mean per-gene
    Pearson (:func:`embedstore.metrics.pearson_columns`; genes constant on a slide are skipped,
    a slide with no defined gene too). The best alpha wins; ties go to the smaller alpha.

    Raises
    ------
    BadInput
        Mismatched shapes, bad alphas or radius, or no slide with a gene that varies.
    """
    p = np.asarray(pred, dtype=np.float32)
    t = np.asarray(truth, dtype=np.float64)
    xy = _xy(xy_um, "choose_alpha")
    g = np.asarray(groups)
    if p.ndim != 2 or p.shape != t.shape or len(xy) != len(p) or g.shape != (len(p),):
        msg = (
            f"choose_alpha: pred {p.shape}, truth {t.shape}, xy_um {xy.shape}, groups {g.shape}; "
            "pass (N, G) predictions and truth, (N, 2) centres and (N,) slides"
        )
        raise BadInput(msg)
    candidates = sorted({_alpha(a, "choose_alpha") for a in alphas})
    if not candidates:
        msg = "choose_alpha: alphas is empty; pass candidates in [0, 1], e.g. (0, 0.25, 0.5, 0.75, 1)"
        raise BadInput(msg)
    r = _radius(radius_um, "choose_alpha")
    per_alpha: dict[float, list[float]] = {a: [] for a in candidates}
    for slide in dict.fromkeys(g.tolist()):
        rows = np.flatnonzero(g == slide)
        graph = neighbour_graph(xy[rows], r)
        for a in candidates:
            score = pearson_columns(smooth(p[rows], graph, a), t[rows])
            if np.isfinite(score).any():
                per_alpha[a].append(float(np.nanmean(score)))
    scores = {a: float(np.mean(v)) if v else math.nan for a, v in per_alpha.items()}
    finite = [a for a in candidates if math.isfinite(scores[a])]
    if not finite:
        msg = "choose_alpha: no slide has a gene that varies in both truth and prediction; nothing to score alpha on"
        raise BadInput(msg)
    best = finite[0]
    for a in finite[1:]:
        if scores[a] > scores[best]:  # strictly better: ties keep the smaller alpha
            best = a
    return best, scores
