"""Loki's expression prediction rule, exact: every reference spot weighted by its image-text similarity.

Loki (``predex``) predicts a tile's expression as ``S @ E / S.sum(1)``, where ``S`` holds the
cosine similarities of the tile's image embedding to the text embeddings of *every* reference
spot's gene sentence and ``E`` their expression. This module computes that rule in bounded
memory (queries in batches), as the reference the scalable path is tested against: an exemplar
index whose keys are the text embeddings (``keys = "text"``), queried for the top k and
aggregated by the ``loki`` aggregator, gives the same numbers when k is the whole reference.
Arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np

from embedstore._vectors import l2_normalize
from embedstore.errors import BadInput

__all__ = ["predict_exact"]


def predict_exact(
    image_emb: np.ndarray, text_emb: np.ndarray, expression: np.ndarray, batch_size: int = 1024
) -> np.ndarray:
    """Loki's rule over all reference spots: ``(N, G)`` float32.

    Parameters
    ----------
    image_emb
        ``(N, D)`` image embeddings of the query tiles (L2-normalised here).
    text_emb
        ``(n, D)`` text embeddings of the reference spots' gene sentences (L2-normalised here).
    expression
        ``(n, G)`` the reference spots' expression (log-normalised over the panel).
    batch_size
        Queries per step; memory is ``batch_size x n`` similarities.
    """
    q = np.asarray(image_emb, dtype=np.float32)
    t = np.asarray(text_emb, dtype=np.float32)
    e = np.asarray(expression, dtype=np.float32)
    if q.ndim != 2 or t.ndim != 2 or e.ndim != 2 or q.shape[1] != t.shape[1] or len(t) != len(e) or not len(t):
        msg = (
            f"loki.predict_exact: image {q.shape}, text {t.shape} and expression {e.shape} must be (N, D), "
            "(n, D) and (n, G) with n > 0; pass text embeddings and expression of the same reference spots"
        )
        raise BadInput(msg)
    q, t = l2_normalize(q), l2_normalize(t)
    out = np.empty((len(q), e.shape[1]), dtype=np.float32)
    for s in range(0, len(q), batch_size):
        sims = (q[s : s + batch_size] @ t.T).astype(np.float64)
        total = sims.sum(axis=1, keepdims=True)
        flat = np.abs(total) < 1e-12  # no meaningful weights: the plain mean, as the loki aggregator does
        w = np.where(flat, 1.0, sims) / np.where(flat, len(t), total)
        out[s : s + batch_size] = w @ e
    return out
