"""Small helpers on embedding vectors and FAISS indexes, shared by the store's search and the index builders."""

from __future__ import annotations

from typing import Any

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C order); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


def ivf_of(faiss: Any, index: Any) -> Any:
    """The IVF layer of a faiss ``index`` (inside an id map or pre-transform too), or None when it has none."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
