"""FAISS build and search (arrays in, arrays out): exact and approximate kNN with group exclusion.

Re-exported by :mod:`embedstore.index`, which adds the exemplar index directory on top.
Vectors are L2-normalised and searched by inner product (= cosine similarity).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from embedstore._optional import import_optional
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

# bound on float entries held per batch (distances, ids, neighbour expression): ~64 MB each
BATCH_ENTRIES = 1 << 24


def import_faiss(purpose: str) -> Any:
    """The faiss module, or MissingDependency naming ``purpose``."""
    return import_optional("faiss", purpose)


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = import_faiss("index.gpu_available")
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_factory(n_exemplars: int, dim: int) -> str:
    """The FAISS factory string used when none is given.

    Exact ``Flat`` below 100,000 exemplars: a query then costs at most n*d = 25 M flops
    (about a millisecond), needs no training and has recall 1. Above, ``IVF{nlist},SQfp16``
    with nlist the power of two nearest ``4*sqrt(n)`` (4096 at 1 M). In
    ``scripts/bench_knn.py`` (1 M x 256, k=50) it reached recall@50 0.977 at nprobe 48 with
    the highest index throughput and half Flat's memory; SQ8 was as fast and 2x smaller but
    only just reached 0.95 there and missed it on tighter clusters, so it stays opt-in.
    ``dim`` is accepted so a future rule can depend on it (e.g. PQ for very wide vectors).
    """
    del dim
    if n_exemplars < 100_000:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n_exemplars)))
    return f"IVF{nlist},SQfp16"


def default_nprobe(nlist: int) -> int:
    """Default IVF nprobe: 1/64 of the lists, at least 8 (48 of 4096 gave recall@50 >= 0.95 in the benchmark)."""
    return max(8, nlist // 64)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


def build(
    vectors: np.ndarray,
    factory: str = "Flat",
    metric: str = "ip",
    device: str = "auto",
    *,
    seed: int = 0,
    nprobe: int | None = None,
    efSearch: int | None = None,
) -> Any:
    """Build a FAISS index over ``vectors`` (ids are the row numbers).

    Parameters
    ----------
    vectors
        (n, d) float32; L2-normalise them first for cosine similarity with ``metric="ip"``.
    factory
        Any FAISS factory string (``"Flat"``, ``"IVF1024,Flat"``, ``"IVF4096,SQ8"``, ``"HNSW32"``...).
    metric
        ``"ip"`` (inner product) or ``"l2"``.
    device
        ``"auto"`` (GPU when faiss has GPUs, else CPU), ``"cpu"`` or ``"cuda"``.
    seed
        Seeds the training subsample and k-means.
    nprobe, efSearch
        Search settings stored on the index (IVF lists probed, HNSW beam); IVF defaults to
        :func:`default_nprobe`.

    Returns
    -------
    The trained and filled faiss index (a GPU index when built on the GPU).
    """
    faiss = import_faiss("index.build")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        msg = f"index.build: vectors must be a non-empty (n, d) array, got shape {x.shape}"
        raise BadInput(msg)
    metrics = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
    if metric not in metrics:
        msg = f"metric {metric!r}: unknown; use 'ip' or 'l2'"
        raise BadInput(msg)
    if device not in ("auto", "cpu", "cuda"):
        msg = f"device {device!r}: unknown; use 'auto', 'cpu' or 'cuda'"
        raise BadInput(msg)
    try:
        index = faiss.index_factory(x.shape[1], factory, metrics[metric])
    except RuntimeError as e:
        msg = f"factory {factory!r}: faiss cannot build it ({str(e).strip().splitlines()[-1]}); see the faiss index_factory docs"
        raise BadInput(msg) from e
    if device == "cuda" and not gpu_available():
        msg = "device='cuda': faiss has no GPU here (install faiss-gpu on a CUDA machine); use device='auto' or 'cpu'"
        raise BadInput(msg)
    if device != "cpu" and gpu_available():
        try:
            res = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(res, 0, index)
            gpu.referenced_objects = [res]  # keep the resources alive as long as the index
            index = gpu
        except RuntimeError as e:  # e.g. HNSW has no GPU version
            LOG.info("index.build: %s not supported on the GPU (%s); building on the CPU", factory, e)
    if not index.is_trained:
        ivf = _ivf(faiss, index)
        # k-means needs ~40-256 points per list; more only slows training
        n_train = min(len(x), max(64 * ivf.nlist, 10_000) if ivf is not None else 100_000)
        sample = (
            x if n_train == len(x) else x[np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))]
        )
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(sample)
    index.add(x)
    set_search_params(index, nprobe=nprobe, efSearch=efSearch)
    return index


def _ivf(faiss: Any, index: Any) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_search_params(index: Any, nprobe: int | None = None, efSearch: int | None = None) -> None:
    """Set IVF ``nprobe`` (default :func:`default_nprobe` when never set) and HNSW ``efSearch``."""
    faiss = import_faiss("index.search")
    ivf = _ivf(faiss, index)
    if ivf is not None:
        if nprobe is None and ivf.nprobe == 1:
            nprobe = default_nprobe(ivf.nlist)
        if nprobe is not None:
            ivf.nprobe = int(nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            # an HNSW quantiser must look at least as far as the lists it returns
            quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 2 * ivf.nprobe)
    if efSearch is not None:
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
        if hnsw is None:
            msg = "efSearch: this index has no HNSW graph; set nprobe for IVF indexes instead"
            raise BadInput(msg)
        hnsw.efSearch = int(efSearch)


def _selector_params(faiss: Any, index: Any, sel: Any) -> Any:
    """SearchParameters carrying ``sel`` for the index types that honour it, else None."""
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=index.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=index.hnsw.efSearch)
    if isinstance(index, faiss.IndexFlat):
        return faiss.SearchParameters(sel=sel)
    return None


def search(
    index: Any,
    queries: np.ndarray,
    k: int,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    batch_size: int = 8192,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest exemplars of each query, optionally excluding the query's own group.

    Parameters
    ----------
    index
        A faiss index from :func:`build` (CPU or GPU).
    queries
        (N, d) float32 (L2-normalised for cosine similarity).
    k
        Neighbours per query.
    exclude
        ``(exemplar_groups, query_groups)``: exemplars whose group equals the query's group
        (same slide or patient) are never returned. Results equal a search of the index
        without those rows.
    batch_size
        Queries per faiss call; bounds memory.
    method
        How exclusion is done: ``"selector"`` (faiss IDSelectorBitmap per query group; CPU
        Flat/IVF/HNSW), ``"filter"`` (oversample, drop excluded rows, search again with a
        larger k for rows left short; any index, GPU too) or ``"auto"``.

    Returns
    -------
    sims (N, k) float32 and ids (N, k) int64, best first. Where an approximate index finds
    fewer than k neighbours, ids are -1 and sims -inf (as faiss).
    """
    faiss = import_faiss("index.search")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        msg = (
            f"queries: shape {q.shape}, but the index holds {index.d}-d vectors; project queries into the index's space"
        )
        raise BadInput(msg)
    if not 0 < k <= index.ntotal:
        msg = f"k={k}: must be between 1 and the number of exemplars ({index.ntotal})"
        raise BadInput(msg)
    if exclude is None:
        return _plain(index, q, k, batch_size)
    ex_groups, q_groups = (np.asarray(a) for a in exclude)
    if len(ex_groups) != index.ntotal or len(q_groups) != len(q):
        msg = f"exclude: needs one group per exemplar ({index.ntotal}) and per query ({len(q)}), got {len(ex_groups)} and {len(q_groups)}"
        raise BadInput(msg)
    if method not in ("auto", "selector", "filter"):
        msg = f"method {method!r}: unknown; use 'auto', 'selector' or 'filter'"
        raise BadInput(msg)
    sims = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    for g in np.unique(q_groups):
        rows = np.flatnonzero(q_groups == g)
        allowed = ex_groups != g
        if allowed.sum() < k:
            msg = (
                f"exclude: only {int(allowed.sum())} exemplars lie outside group {str(g)!r}, fewer than k={k}; lower k"
            )
            raise BadInput(msg)
        if allowed.all():
            sims[rows], ids[rows] = _plain(index, q[rows], k, batch_size)
            continue
        bitmap = np.packbits(allowed, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        params = _selector_params(faiss, index, sel) if method != "filter" else None
        if params is None and method == "selector":
            msg = f"method='selector': not supported for {type(index).__name__}; use method='filter'"
            raise BadInput(msg)
        if params is not None:
            for s in range(0, len(rows), batch_size):
                r = rows[s : s + batch_size]
                sims[r], ids[r] = index.search(q[r], k, params=params)
        else:
            sims[rows], ids[rows] = _filtered(index, q[rows], k, allowed, batch_size)
    return sims, ids


def _plain(index: Any, q: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty((len(q), k), dtype=np.float32)
    ids = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), batch_size):
        sims[s : s + batch_size], ids[s : s + batch_size] = index.search(q[s : s + batch_size], k)
    return sims, ids


def _filtered(index: Any, q: np.ndarray, k: int, allowed: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Oversample by the number of excluded rows, drop them, and double k where rows fall short."""
    sims = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    kk = min(index.ntotal, k + int((~allowed).sum()))
    todo = np.arange(len(q))
    while len(todo):
        rows_per_call = max(1, min(batch_size, BATCH_ENTRIES // kk))
        short = []
        for s in range(0, len(todo), rows_per_call):
            r = todo[s : s + rows_per_call]
            D, ids_r = index.search(q[r], kk)
            ok = (ids_r >= 0) & allowed[np.maximum(ids_r, 0)]
            # stable sort moves the valid hits to the front, keeping their similarity order
            order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
            sims[r] = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(D, order, 1), -np.inf)
            ids[r] = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(ids_r, order, 1), -1)
            short.append(r[ok.sum(1) < k])
        todo = np.concatenate(short)
        if kk >= index.ntotal:
            break  # nothing more to find (approximate index probing too few lists)
        kk = min(index.ntotal, 2 * kk)
    return sims, ids
