"""embedstore: predict spatial gene expression from H&E through an embedding store.

The public API, re-exported lazily so that ``import embedstore`` stays cheap and offline
(torch, faiss, openslide and anndata load only when a function that needs them is used).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Idle OpenMP threads sleep at once instead of spinning (one policy for the whole process), so
# torch, faiss and BLAS threads do not steal cores from one another or from other jobs: with one
# core of two taken by another job, aligner training ran 1.7x and predict up to 1.15x faster; on
# an idle machine training was 14% slower and predict unchanged (BENCHMARKS.md). An OpenMP
# runtime reads this only when it loads: faiss's own copy of libgomp at ``import faiss``
# (always after this line), torch's copy at ``import torch``, so torch
# follows it when embedstore is imported first, as the command line does. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "open_slide": "embedstore.slides",
    "tile": "embedstore.tiling",
    "embed": "embedstore.embedding",
    "check_store": "embedstore.embedding",
    "sql": "embedstore.store",
    "open_store": "embedstore.store",
    "train_aligner": "embedstore.build",
    "build_index": "embedstore.build",
    "build_tile_index": "embedstore.tile_index",
    "search": "embedstore.retrieval",
    "load_index": "embedstore.index_folder",
    "predict": "embedstore.prediction",
    "evaluate": "embedstore.evaluation",
    "create_encoder": "embedstore.encoders",
    "create_text_encoder": "embedstore.encoders",
    "list_encoders": "embedstore.encoders",
    "register_encoder": "embedstore.encoders",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'embedstore' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
