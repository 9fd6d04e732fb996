"""Benchmark: FAISS index vs the anchors' brute-force kNN (matmul + top-k in NumPy).

BLEEP and its successors retrieve by ``queries @ exemplars.T`` and a top-k. This script
compares that with embedstore's FAISS indexes on the same data, in one process:

- data: a 50-centre Gaussian mixture in d dimensions, L2-normalised (clustered, like
  aligned embeddings of a cohort; uniform random data would be unrealistically hard for IVF);
- brute force: blocked NumPy matmul + argpartition, timed on a subsample of queries and
  reported as queries/s (NumPy's BLAS uses every core, as faiss does);
- ground truth for recall@k: faiss ``IndexFlatIP`` on a subsample of queries;
- per factory: build time, index size, the smallest nprobe reaching recall@k >= target,
  and the speed-up at that nprobe as the median of paired ratios (A/B/A/B rounds).

Usage::

    .venv/bin/python scripts/bench_knn.py            # 1 M exemplars, 100 k queries, d=256, k=50
    .venv/bin/python scripts/bench_knn.py --quick    # 100 k exemplars, 10 k queries
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedstore.index import build, default_factory, l2_normalize, search, set_search_params

NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """n points of the Gaussian mixture, L2-normalised, made in chunks to bound memory."""
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        lab = rng.integers(0, len(centres), m)
        out[s : s + m] = centres[lab] + spread * rng.standard_normal((m, d), dtype=np.float32)
    return l2_normalize(out)


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """The anchors' retrieval: matmul + top-k, in query blocks (ids sorted by similarity)."""
    ids = np.empty((len(xq), k), dtype=np.int64)
    for s in range(0, len(xq), block):
        sim = xq[s : s + block] @ xb.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, top, 1), axis=1)
        ids[s : s + block] = np.take_along_axis(top, order, 1)
    return ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true k neighbours found (recall@k)."""
    k = truth.shape[1]
    return float(
        np.mean([len(np.intersect1d(f, t, assume_unique=True)) / k for f, t in zip(found, truth, strict=True)])
    )


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-exemplars", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--n-brute", type=int, default=1000, help="queries timed per brute-force round")
    ap.add_argument("--n-gt", type=int, default=2000, help="queries with exact ground truth for recall")
    ap.add_argument("--n-timed", type=int, default=20_000, help="queries timed per index round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--spread", type=float, default=0.5, help="cluster std relative to unit-variance centres")
    ap.add_argument("--factories", default="IVF{nlist},Flat;IVF{nlist},SQ8;IVF{nlist},SQfp16;IVF{nlist}_HNSW32,SQ8")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="100 k exemplars, 10 k queries, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.n_exemplars, a.n_queries, a.n_brute, a.n_gt, a.n_timed, a.rounds = 100_000, 10_000, 500, 1000, 10_000, 1
    faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, a.dim), dtype=np.float32) / np.sqrt(a.dim) * 4
    t_data, xb = timed(lambda: clustered(a.n_exemplars, a.dim, centres, rng, a.spread / np.sqrt(a.dim) * 4))
    xq = clustered(a.n_queries, a.dim, centres, rng, a.spread / np.sqrt(a.dim) * 4)
    gt_q = xq[: a.n_gt]
    flat = faiss.IndexFlatIP(a.dim)
    flat.add(xb)
    t_gt, (_, gt) = timed(lambda: flat.search(gt_q, a.k))
    flat.reset()  # free the 1 GB copy
    # the brute force must agree with faiss Flat (same exact search, other code)
    bf_ids = brute_force(xb, gt_q[:200], a.k)
    bf_recall = recall(bf_ids, gt[:200])
    nlist = 2 ** round(np.log2(4 * np.sqrt(a.n_exemplars)))
    lines = [
        "## kNN retrieval: FAISS index vs brute force (scripts/bench_knn.py)",
        "",
        f"Command: `.venv/bin/python scripts/bench_knn.py{' --quick' if a.quick else ''}`",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; faiss {faiss.__version__} "
        f"with `faiss.omp_set_num_threads({a.threads})`; NumPy brute force uses the same cores through BLAS.",
        "- **Caveat:** other jobs shared these cores during the run, so absolute rates are noisy; the ratios are "
        f"medians of {a.rounds} paired A/B rounds (brute force, then index, alternating).",
        f"- Data: {a.n_exemplars:,} exemplars and {a.n_queries:,} queries, d={a.dim}, k={a.k}; a 50-centre Gaussian "
        f"mixture (spread {a.spread}), L2-normalised, inner product. Made in {t_data:.1f} s.",
        f"- Ground truth: faiss IndexFlatIP on {a.n_gt:,} queries ({a.n_gt / t_gt:,.0f} queries/s); NumPy brute force "
        f"agrees with it at recall {bf_recall:.4f}.",
        f"- Brute force timed on {a.n_brute:,} queries per round; each index timed on {a.n_timed:,} queries per round.",
        "",
        "| factory | build s | index MB | nprobe | recall@k | brute q/s | index q/s | speed-up (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    best = None
    for f in a.factories.split(";"):
        factory = f.format(nlist=nlist)
        t_build, index = timed(lambda factory=factory: build(xb, factory, "ip", "cpu"))
        size_mb = faiss.serialize_index(index).nbytes / 2**20
        chosen, rec = None, 0.0
        for nprobe in NPROBES:
            if nprobe > nlist:
                break
            set_search_params(index, nprobe=nprobe)
            rec = recall(search(index, gt_q, a.k)[1], gt)
            if rec >= a.target:
                chosen = nprobe
                break
        if chosen is None:
            lines.append(
                f"| {factory} | {t_build:.1f} | {size_mb:.0f} | - | {rec:.3f} (< target at nprobe {nprobe}) | | | |"
            )
            continue
        ratios, bq, iq = [], [], []
        for r in range(a.rounds):
            sub = xq[(r * a.n_brute) % a.n_queries :][: a.n_brute]
            tb, _ = timed(lambda sub=sub: brute_force(xb, sub, a.k))
            ti, _ = timed(lambda index=index: search(index, xq[: a.n_timed], a.k))
            bq.append(len(sub) / tb)
            iq.append(a.n_timed / ti)
            ratios.append(iq[-1] / bq[-1])
        ratio = statistics.median(ratios)
        lines.append(
            f"| {factory} | {t_build:.1f} | {size_mb:.0f} | {chosen} | {rec:.3f} | {statistics.median(bq):.0f} | "
            f"{statistics.median(iq):.0f} | {ratio:.1f}x |"
        )
        if best is None or ratio > best[1]:
            best = (factory, ratio, chosen, index)
        print(lines[-1], file=sys.stderr, flush=True)  # progress while the rest runs
    if best is not None:
        factory, ratio, nprobe, index = best
        t_all, _ = timed(lambda: search(index, xq, a.k))
        lines += [
            "",
            f"Best: `{factory}` at nprobe {nprobe}: {ratio:.1f}x the brute force at recall@{a.k} >= {a.target}; "
            f"all {a.n_queries:,} queries searched in {t_all:.1f} s ({a.n_queries / t_all:,.0f} queries/s).",
            f"`default_factory({a.n_exemplars:,}, {a.dim})` = `{default_factory(a.n_exemplars, a.dim)}`.",
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
