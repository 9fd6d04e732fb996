"""FAISS build, search and build-time tuning (arrays in, arrays out): exact and approximate kNN.

Re-exported by :mod:`embedstore.index`, which adds the exemplar index directory on top, and
used by the tile index of a store. Vectors are L2-normalised and searched by inner product
(= cosine similarity). :func:`build_tuned` builds an index and chooses its search settings
(IVF codec and nprobe) for a target recall, measured on held-out indexed vectors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

from embedstore._optional import import_optional
from embedstore._progress import stage, step
from embedstore._vectors import ivf_of
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

# bound on float entries held per batch (distances, ids, neighbour expression): ~64 MB each
BATCH_ENTRIES = 1 << 24
# held-out indexed vectors that choose and check the search settings (half each)
TUNE_QUERIES = 1000


def import_faiss(purpose: str) -> Any:
    """The faiss module, or MissingDependency naming ``purpose``."""
    return import_optional("faiss", purpose)


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = import_faiss("index.gpu_available")
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_factory(n_exemplars: int, dim: int) -> str:
    """The FAISS factory string used when none is given.

    Exact ``Flat`` below 100,000 vectors: a query then costs at most n*d = 25 M flops
    (about a millisecond), needs no training and has recall 1. Above, ``IVF{nlist},SQ8``
    with nlist the power of two nearest ``4*sqrt(n)`` (4096 at 1 M). SQ8 is the first codec
    tried: in ``scripts/bench_knn.py`` (1 M x 256, k=50) it was the fastest at recall@50 >= 0.95
    and half the size of SQfp16; where its 8-bit codes cannot reach the target recall (tight
    clusters), :func:`build_tuned` rebuilds the lists as ``SQfp16`` on the same coarse quantiser.
    ``dim`` is accepted so a future rule can depend on it (e.g. PQ for very wide vectors).
    """
    del dim
    if n_exemplars < 100_000:
        return "Flat"
    return f"IVF{ivf_nlist(n_exemplars)},SQ8"


def ivf_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest ``4*sqrt(n)`` (4096 at 1 M)."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def default_nprobe(nlist: int) -> int:
    """nprobe of an IVF index whose settings were never tuned: 1/64 of the lists, at least 8."""
    return max(8, nlist // 64)


def nprobe_ladder(nlist: int) -> list[int]:
    """IVF nprobe values :func:`tune_search` tries, smallest first: 1, 2, 4, 8, 12, 16, 24, ..., nlist."""
    ladder, p = [1, 2, 4], 8
    while p < nlist:
        ladder += [p, p + p // 2]
        p *= 2
    return sorted({v for v in ladder if v < nlist} | {nlist})


def _matrix(vectors: np.ndarray, where: str) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        msg = f"{where}: vectors must be a non-empty (n, d) array, got shape {x.shape}"
        raise BadInput(msg)
    return x


def _new_index(faiss: Any, d: int, factory: str, metric: str) -> Any:
    metrics = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
    if metric not in metrics:
        msg = f"metric {metric!r}: unknown; use 'ip' or 'l2'"
        raise BadInput(msg)
    try:
        return faiss.index_factory(d, factory, metrics[metric])
    except RuntimeError as e:
        msg = f"factory {factory!r}: faiss cannot build it ({str(e).strip().splitlines()[-1]}); see the faiss index_factory docs"
        raise BadInput(msg) from e


def _on_device(faiss: Any, index: Any, device: str, factory: str) -> Any:
    """``index`` moved to GPU 0 when ``device`` allows and faiss has a GPU version of it."""
    if device not in ("auto", "cpu", "cuda"):
        msg = f"device {device!r}: unknown; use 'auto', 'cpu' or 'cuda'"
        raise BadInput(msg)
    if device == "cuda" and not gpu_available():
        msg = "device='cuda': faiss has no GPU here (install faiss-gpu on a CUDA machine); use device='auto' or 'cpu'"
        raise BadInput(msg)
    if device == "cpu" or not gpu_available():
        return index
    try:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, index)
        gpu.referenced_objects = [res]  # keep the resources alive as long as the index
        return gpu
    except RuntimeError as e:  # e.g. HNSW has no GPU version
        LOG.info("index.build: %s not supported on the GPU (%s); building on the CPU", factory, e)
        return index


def _trained(faiss: Any, x: np.ndarray, factory: str, metric: str, device: str, seed: int) -> Any:
    """An empty index of ``factory``, trained on (a sample of) ``x``."""
    index = _on_device(faiss, _new_index(faiss, x.shape[1], factory, metric), device, factory)
    if not index.is_trained:
        ivf = ivf_of(faiss, index)
        # k-means needs ~40-256 points per list; more only slows training
        n_train = min(len(x), max(64 * ivf.nlist, 10_000) if ivf is not None else 100_000)
        sample = (
            x if n_train == len(x) else x[np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))]
        )
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(sample)
    return index


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
    """Build a FAISS index over ``vectors`` (ids are the row numbers), with given search settings.

    :func:`build_tuned` also chooses the settings for a target recall.

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
    x = _matrix(vectors, "index.build")
    index = _trained(faiss, x, factory, metric, device, seed)
    index.add(x)
    set_search_params(index, nprobe=nprobe, efSearch=efSearch)
    return index


def set_search_params(index: Any, nprobe: int | None = None, efSearch: int | None = None) -> None:
    """Set IVF ``nprobe`` (default :func:`default_nprobe` when never set) and HNSW ``efSearch``."""
    faiss = import_faiss("index.search")
    ivf = ivf_of(faiss, index)
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


# ---------------------------------------------------------------- build-time tuning


def _ids(ids: np.ndarray | None, n: int, where: str) -> np.ndarray:
    """The ids of ``n`` vectors as int64 (row numbers when None); unique and >= 0, as faiss needs."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    a = np.asarray(ids)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        msg = (
            f"{where}: ids must be ({n},) integers, one per vector, got {a.dtype} {a.shape}; pass one int64 id per row"
        )
        raise BadInput(msg)
    a = a.astype(np.int64, copy=False)
    if n and a.min() < 0:
        msg = f"{where}: ids must be >= 0 (faiss marks a missing neighbour with -1), got {int(a.min())}; renumber them"
        raise BadInput(msg)
    if len(np.unique(a)) != n:
        msg = f"{where}: ids must be unique, {n - len(np.unique(a))} repeat; give each vector its own id"
        raise BadInput(msg)
    return a


def _check_tuning(k: int, target_recall: float, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        msg = f"{where}: k={k!r} must be an integer >= 1 (the neighbours the recall is measured at)"
        raise BadInput(msg)
    if isinstance(target_recall, bool) or not isinstance(target_recall, float | int) or not 0 < target_recall <= 1:
        msg = f"{where}: target_recall={target_recall!r} must be a number in (0, 1], e.g. 0.95"
        raise BadInput(msg)


def _is_exact(faiss: Any, index: Any) -> bool:
    """True for a flat (brute-force) index, bare or inside an id map."""
    inner = faiss.downcast_index(index)
    if hasattr(inner, "id_map"):
        inner = faiss.downcast_index(inner.index)
    return isinstance(inner, faiss.IndexFlat) or type(inner).__name__.startswith("GpuIndexFlat")


@dataclasses.dataclass(frozen=True)
class _HeldOut:
    """Indexed vectors used as queries (tuning half first), with their exact neighbours other than themselves."""

    queries: np.ndarray  # (m, d)
    own: np.ndarray  # (m,) the queries' own ids
    truth: np.ndarray  # (m, k) ids of their exact k nearest other vectors
    n_tune: int


def _held_out(x: np.ndarray, ids: np.ndarray, k: int, n_queries: int, seed: int) -> _HeldOut:
    """A random sample of ``x`` as queries, split in halves, with exact ground truth."""
    rows = np.random.default_rng(seed).choice(len(x), min(n_queries, len(x)), replace=False)
    with stage("exact recall@%d ground truth of %d held-out vectors (NumPy matmul over %d)", k, len(rows), len(x)):
        truth = ids[_exact_neighbours(x, rows, k)]
    return _HeldOut(x[rows], ids[rows], truth, len(rows) // 2)


def _exact_neighbours(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` vectors of ``x`` most similar to each ``x[rows]``, the query's own row excluded.

    Blocked matmul (BLAS) over ``x`` with a running top-k, so memory stays at about
    :data:`BATCH_ENTRIES` similarities whatever ``len(x)``.
    """
    q = x[rows]
    best_s = np.full((len(rows), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(rows), k), -1, dtype=np.int64)
    block = max(k + 1, BATCH_ENTRIES // max(1, len(rows)))
    hit = np.arange(len(rows))
    for s in range(0, len(x), block):
        sims = q @ x[s : s + block].T
        own = rows - s
        inside = (own >= 0) & (own < sims.shape[1])
        sims[hit[inside], own[inside]] = -np.inf
        kk = min(k, sims.shape[1])
        top = np.argpartition(sims, sims.shape[1] - kk, axis=1)[:, -kk:]  # (not of -sims: a copy, 2x slower)
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + s], axis=1)
        keep = np.argpartition(cand_s, cand_s.shape[1] - k, axis=1)[:, -k:]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def _recall(index: Any, held: _HeldOut, part: slice, k: int) -> float:
    """recall@k of ``index`` on ``held[part]``: its own id removed from what the index returns."""
    queries, own, truth = held.queries[part], held.own[part], held.truth[part]
    _, found = search(index, queries, min(k + 1, index.ntotal))  # the query itself is indexed too
    others = found != own[:, None]
    # stable sort keeps the first k hits that are not the query, in similarity order
    found = np.take_along_axis(found, np.argsort(~others, axis=1, kind="stable")[:, :k], 1)
    hits = sum(np.intersect1d(f, t).size for f, t in zip(found, truth, strict=True))
    return hits / truth.size if truth.size else 1.0


def _tune(index: Any, held: _HeldOut, k: int, target: float, nprobe: int | None, max_nprobe: int | None) -> dict:
    """Search settings chosen on the tuning half, recall measured on the check half."""
    faiss = import_faiss("index.tune_search")
    ivf = ivf_of(faiss, index)
    tune, check = slice(0, held.n_tune), slice(held.n_tune, None)
    sweep: list[list[float]] = []
    if ivf is not None and nprobe is None:
        top = min(ivf.nlist, max_nprobe or ivf.nlist)
        with stage("choosing nprobe: recall@%d >= %.3g on %d held-out vectors, nprobe up to %d", k, target, held.n_tune, top):  # fmt: skip
            for p in nprobe_ladder(top):
                set_search_params(index, nprobe=p)
                sweep.append([p, round(_recall(index, held, tune, k), 4)])
                if sweep[-1][1] >= target:
                    break
        # the first nprobe reaching the target; else the one with the best recall (the smallest of equals)
        nprobe = int(max(sweep, key=lambda pr: (pr[1] >= target, pr[1], -pr[0]))[0])
    if ivf is not None:
        set_search_params(index, nprobe=nprobe)
    recall_tune = dict(sweep)[nprobe] if sweep else _recall(index, held, tune, k)
    recall = _recall(index, held, check, k)
    step(
        "recall@%d %.3f on %d held-out vectors not used to choose the settings (nprobe %s; %.3f on the %d that chose it)",
        k, recall, len(held.own) - held.n_tune, nprobe if ivf is not None else "-", recall_tune, held.n_tune,
    )  # fmt: skip
    return {
        "k": k,
        "target_recall": target,
        "exact": False,
        "nprobe": nprobe if ivf is not None else None,
        "recall": round(recall, 4),
        "recall_tune": round(recall_tune, 4),
        "reached": recall_tune >= target,
        "n_tune": held.n_tune,
        "n_check": len(held.own) - held.n_tune,
        "sweep": sweep,
    }


def tune_held_out(
    index: Any,
    queries: np.ndarray,
    own: np.ndarray,
    truth: np.ndarray,
    k: int,
    target_recall: float,
    nprobe: int | None = None,
    max_nprobe: int | None = None,
) -> dict[str, Any]:
    """Search settings of ``index`` for ``target_recall`` at ``k``, from held-out queries whose truth is known.

    For indexes built from streamed vectors (:mod:`embedstore._ondisk`), whose exact neighbours
    were found batch by batch. ``queries`` (m, d) are indexed vectors with ids ``own`` (m,),
    ``truth`` (m, k) the ids of their exact ``k`` nearest other vectors; the first half chooses
    nprobe (up to ``max_nprobe``), the second half measures the recall, as in :func:`tune_search`.
    """
    _check_tuning(k, target_recall, "tune_held_out")
    held = _HeldOut(np.ascontiguousarray(queries, dtype=np.float32), np.asarray(own), np.asarray(truth), len(own) // 2)
    return _tune(index, held, k, target_recall, nprobe, max_nprobe)


def _exact_settings(factory: str, k: int, target: float) -> dict[str, Any]:
    return {"factory": factory, "k": k, "target_recall": target, "exact": True, "nprobe": None, "recall": 1.0,
            "n_tune": 0, "n_check": 0}  # fmt: skip


def tune_search(
    index: Any,
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    n_queries: int = 1000,
    nprobe: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Choose IVF nprobe for ``target_recall`` at ``k`` on half of a held-out sample of the indexed
    vectors, set it on ``index``, and measure recall@k on the other half (queries not used to choose).

    Parameters
    ----------
    index
        A filled faiss index over ``vectors`` (searched by inner product).
    vectors
        (n, d) float32, L2-normalised: the vectors the index holds.
    ids
        (n,) int64 ids they were added with; None: row numbers.
    k
        Neighbours the recall is measured at (at most n - 1: a query's own id never counts).
    target_recall
        recall@k to reach on the tuning half; nprobe is the smallest of :func:`nprobe_ladder`
        reaching it (the best one when none does, and ``"reached"`` is False).
    n_queries
        Indexed vectors sampled as queries (half choose, half check); exact ground truth by
        blocked NumPy matmul, each query's own id excluded from both sides.
    nprobe
        Use this nprobe instead of choosing one; its recall is still measured.
    seed
        Seeds the sample.

    Returns
    -------
    The search settings, JSON-able: ``factory`` (the index type), ``k``, ``target_recall``,
    ``exact``, ``nprobe`` (None unless IVF), ``recall`` (check half), ``recall_tune``,
    ``reached``, ``n_tune``, ``n_check`` and ``sweep`` ([nprobe, recall on the tuning half]
    as tried). An exact (flat) index is not searched: recall 1.0, ``"exact": True``.
    """
    faiss = import_faiss("index.tune_search")
    x = _matrix(vectors, "tune_search")
    _check_tuning(k, target_recall, "tune_search")
    ivf = ivf_of(faiss, index)
    kind = type(faiss.downcast_index(index)).__name__ + (f"(nlist={ivf.nlist})" if ivf is not None else "")
    k = min(k, len(x) - 1)
    if _is_exact(faiss, index) or k < 1:
        return _exact_settings(kind, max(k, 1), target_recall)
    if index.ntotal != len(x) or index.d != x.shape[1]:
        msg = f"tune_search: the index holds {index.ntotal} x {index.d} vectors but {x.shape} were given; pass the indexed vectors"
        raise BadInput(msg)
    held = _held_out(x, _ids(ids, len(x), "tune_search"), k, max(2, n_queries), seed)
    return {"factory": kind, **_tune(index, held, k, target_recall, nprobe, None)}


def build_tuned(
    vectors: np.ndarray,
    factory: str | None = None,
    *,
    ids: np.ndarray | None = None,
    k: int = 10,
    target_recall: float = 0.95,
    nprobe: int | None = None,
    device: str = "auto",
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Build and tune: returns (faiss index, search settings for the manifest).

    Parameters
    ----------
    vectors
        (n, d) float32, L2-normalised; searched by inner product.
    factory
        FAISS factory string, or None / ``"auto"``: :func:`default_factory`, i.e. ``Flat``
        below 100,000 vectors, else ``IVF{nlist},SQ8``, rebuilt as ``IVF{nlist},SQfp16`` on
        the same trained coarse quantiser (no second k-means) when SQ8 cannot reach
        ``target_recall`` at any nprobe up to nlist/4 (its 8-bit codes limit the recall).
    ids
        (n,) int64 ids to add the vectors with (None: row numbers). A non-IVF index is then
        wrapped in ``IDMap2`` so that ``add_with_ids`` and ``remove_ids`` work on it later.
    k, target_recall, nprobe
        As in :func:`tune_search` (at most :data:`TUNE_QUERIES` held-out vectors).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``, as in :func:`build`.
    seed
        Seeds the training sample, k-means and the held-out sample.

    Returns
    -------
    The filled index with its search settings set, and the settings of :func:`tune_search`
    with ``factory`` the factory string built; with the automatic IVF choice also ``codec``
    and ``codec_reason`` (which codec won, and why).
    """
    faiss = import_faiss("index.build_tuned")
    x = _matrix(vectors, "build_tuned")
    all_ids = _ids(ids, len(x), "build_tuned")
    _check_tuning(k, target_recall, "build_tuned")
    auto = factory in (None, "auto")
    factory = default_factory(*x.shape) if auto else str(factory)
    plain = _new_index(faiss, x.shape[1], factory, "ip")
    if ids is not None and ivf_of(faiss, plain) is None and not hasattr(faiss.downcast_index(plain), "id_map"):
        factory = "IDMap2," + factory  # only IVF indexes take ids (and removals) by themselves
    index = _trained(faiss, x, factory, "ip", device, seed)
    if ids is None:
        index.add(x)
    else:
        index.add_with_ids(x, all_ids)
    k = min(k, len(x) - 1)
    if _is_exact(faiss, index) or k < 1:
        step("%s index: exact search, recall 1", factory)
        return index, _exact_settings(factory, max(k, 1), target_recall)
    held = _held_out(x, all_ids, k, TUNE_QUERIES, seed)
    ivf = ivf_of(faiss, index)
    codec_choice = auto and ivf is not None
    nlist = ivf.nlist if ivf is not None else 0  # read now: ``ivf`` points into ``index``, replaced below
    settings = _tune(index, held, k, target_recall, nprobe, nlist // 4 if codec_choice else None)
    if not codec_choice:
        if not settings["reached"]:
            LOG.warning(
                "%s: recall@%d %.3f at best, below the target %.3g; use a finer codec or more lists",
                factory, k, settings["recall_tune"], target_recall,
            )  # fmt: skip
        return index, {"factory": factory, **settings}
    if settings["reached"]:
        why = f"SQ8 reached recall@{k} {settings['recall_tune']:.3f} at nprobe {settings['nprobe']}"
    else:
        best = max((r for _, r in settings["sweep"]), default=settings["recall_tune"])
        why = (
            f"SQ8 reached recall@{k} {best:.3f} at most (nprobe up to {nlist // 4} = nlist/4), below the target "
            f"{target_recall:.3g}: its 8-bit codes limit the recall"
        )
        step("%s; SQfp16 lists on the same coarse quantiser", why)
        index = _as_fp16(faiss, index, x, all_ids, device)
        factory = f"IVF{nlist},SQfp16"
        settings = _tune(index, held, k, target_recall, nprobe, None)
    return index, {"factory": factory, **settings, "codec": factory.split(",")[-1], "codec_reason": why}


def _as_fp16(faiss: Any, index: Any, x: np.ndarray, ids: np.ndarray, device: str) -> Any:
    """The IVF-SQ8 ``index`` rebuilt with SQfp16 codes: same trained coarse quantiser, same list of each vector."""
    cpu = faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index
    ivf = faiss.extract_index_ivf(cpu)
    # each vector's list, read back from the SQ8 lists: no k-means and no second assignment pass
    row_of_id = np.argsort(ids)
    assign = np.empty(len(x), dtype=np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            list_ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size)
            assign[row_of_id[np.searchsorted(ids, list_ids, sorter=row_of_id)]] = lst
    quantizer = faiss.clone_index(ivf.quantizer)
    fp16 = faiss.IndexIVFScalarQuantizer(
        quantizer, ivf.d, ivf.nlist, faiss.ScalarQuantizer.QT_fp16, ivf.metric_type, ivf.by_residual
    )
    fp16.own_fields = True
    quantizer.this.disown()  # the index owns and frees its quantiser
    fp16.is_trained = True  # fp16 codes need no training, and the quantiser is trained
    fp16.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
    return _on_device(faiss, fp16, device, "IVF,SQfp16")
