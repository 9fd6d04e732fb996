"""Benchmark: the default tuned FAISS index vs what BLEEP really does (torch matmul + topk).

BLEEP and its successors retrieve by ``queries @ exemplars.T`` followed by ``torch.topk``.
This script compares that with embedstore's index on the same data, in one process:

- data: a 50-centre Gaussian mixture in d dimensions, L2-normalised (clustered, like
  aligned embeddings of a cohort; uniform random data would be unrealistically hard for IVF);
- reference: torch ``q @ k.T`` + ``torch.topk`` in query blocks, on the same threads as faiss;
  second line: the blocked NumPy matmul + argpartition loop of earlier versions;
- index: ``build_tuned(xb, k=k)`` with the DEFAULT settings (factory by size, codec and nprobe
  chosen at build time for recall@k >= 0.95 on held-out indexed vectors); its build (with the
  tuning) is timed apart; searches go through the public ``embedstore.index.search``;
- recall@k on new queries against the exact torch answer, beside the held-out recall the build
  measured on queries other than the ones that chose nprobe;
- speed-ups are medians of paired ratios over rounds that alternate reference and index.

Usage::

    .venv/bin/python scripts/bench_knn.py            # 1 M exemplars, d=256, k=50
    .venv/bin/python scripts/bench_knn.py --quick    # 100 k exemplars
    .venv/bin/python scripts/bench_knn.py --also "IVF{nlist},SQfp16@64"   # + a fixed factory@nprobe row
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# embedstore before torch and faiss: its OpenMP wait policy must be set before their runtimes load
from embedstore.index import build, build_tuned, l2_normalize, search


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """n points of the Gaussian mixture, L2-normalised, made in chunks to bound memory."""
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        lab = rng.integers(0, len(centres), m)
        out[s : s + m] = centres[lab] + spread * rng.standard_normal((m, d), dtype=np.float32)
    return l2_normalize(out)


def torch_topk(keys, xq: np.ndarray, k: int, block: int) -> np.ndarray:
    """BLEEP's retrieval: ``q @ k.T`` then ``torch.topk``, in query blocks (ids best first)."""
    import torch

    ids = np.empty((len(xq), k), dtype=np.int64)
    with torch.inference_mode():
        for s in range(0, len(xq), block):
            ids[s : s + block] = torch.topk(torch.from_numpy(xq[s : s + block]) @ keys.T, k, dim=1).indices.numpy()
    return ids


def numpy_topk(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """The NumPy loop of earlier versions: matmul + argpartition + sort of the top k, in query blocks."""
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-exemplars", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=10_000, help="new queries (not indexed) timed per index round")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--n-ref", type=int, default=1024, help="queries timed per torch round")
    ap.add_argument("--n-numpy", type=int, default=256, help="queries timed per NumPy round")
    ap.add_argument("--ref-block", type=int, default=512, help="queries per torch matmul (block x n floats)")
    ap.add_argument("--n-gt", type=int, default=2000, help="new queries with exact ground truth for recall")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--spread", type=float, default=0.5, help="cluster std relative to unit-variance centres")
    ap.add_argument(
        "--also", default="", help="';'-separated FACTORY@NPROBE rows beside the default, e.g. the old default"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="100 k exemplars, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.n_exemplars, a.n_queries, a.n_ref, a.n_numpy, a.n_gt, a.rounds = 100_000, 10_000, 1024, 256, 1000, 1
    import faiss
    import torch

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, a.dim), dtype=np.float32) / np.sqrt(a.dim) * 4
    spread = a.spread / np.sqrt(a.dim) * 4
    t_data, xb = timed(lambda: clustered(a.n_exemplars, a.dim, centres, rng, spread))
    xq = clustered(max(a.n_queries, a.n_gt), a.dim, centres, rng, spread)
    keys = torch.from_numpy(xb)
    t_gt, gt = timed(lambda: torch_topk(keys, xq[: a.n_gt], a.k, a.ref_block))
    np_recall = recall(numpy_topk(xb, xq[:200], a.k), gt[:200])  # two exact searches, other code

    t_build, (index, settings) = timed(lambda: build_tuned(xb, k=a.k))
    rows = [("default: " + settings["factory"], index, settings["nprobe"], t_build)]
    nlist = faiss.extract_index_ivf(index).nlist if settings["nprobe"] else 0
    for spec in filter(None, a.also.split(";")):
        factory, nprobe = spec.format(nlist=nlist).split("@")
        t, idx = timed(lambda f=factory, p=nprobe: build(xb, f, "ip", "cpu", nprobe=int(p)))
        rows.append((factory, idx, int(nprobe), t))
    recalls = {name: recall(search(idx, xq[: a.n_gt], a.k)[1], gt) for name, idx, *_ in rows}
    print(f"built {settings}; recall on new queries {recalls}", file=sys.stderr, flush=True)

    ref_q, np_q, idx_q = [], [], {name: [] for name, *_ in rows}
    ratios = {name: [] for name, *_ in rows}
    np_ratios = []
    for r in range(a.rounds):  # A/B/B/A: torch, NumPy, the indexes; the other way round in odd rounds
        sub = xq[(r * a.n_ref) % len(xq) :][: a.n_ref]
        steps = [("torch", lambda sub=sub: torch_topk(keys, sub, a.k, a.ref_block), len(sub))]
        steps.append(("numpy", lambda: numpy_topk(xb, xq[: a.n_numpy], a.k), a.n_numpy))
        steps += [(name, lambda idx=idx: search(idx, xq[: a.n_queries], a.k), a.n_queries) for name, idx, *_ in rows]
        rate = {}
        for name, fn, n in steps if r % 2 == 0 else steps[::-1]:
            rate[name] = n / timed(fn)[0]
        ref_q.append(rate["torch"])
        np_q.append(rate["numpy"])
        np_ratios.append(rate["numpy"] / rate["torch"])
        for name, *_ in rows:
            idx_q[name].append(rate[name])
            ratios[name].append(rate[name] / rate["torch"])
        print(f"round {r + 1}: " + ", ".join(f"{n} {v:.0f} q/s" for n, v in rate.items()), file=sys.stderr, flush=True)

    med = statistics.median
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    s = settings
    lines = [
        "```",
        command,
        "```",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; faiss {faiss.__version__} "
        f"({faiss.get_compile_options().strip()}) and torch {torch.__version__}, both on {a.threads} threads; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (set by embedstore, imported first).",
        f"- Data: {a.n_exemplars:,} exemplars, d={a.dim}, k={a.k}; a 50-centre Gaussian mixture (spread {a.spread}), "
        f"L2-normalised, inner product; new queries from the same mixture. Made in {t_data:.1f} s.",
        f"- Reference: torch `q @ k.T` + `torch.topk` in blocks of {a.ref_block} queries, {a.n_ref:,} queries per round; "
        f"it is the exact ground truth ({a.n_gt:,} new queries, {a.n_gt / t_gt:,.0f} q/s); the NumPy loop agrees with "
        f"it at recall {np_recall:.4f}.",
        f"- Index: `build_tuned(xb, k={a.k})`, default settings: **{s['factory']}**"
        + (f" ({s.get('codec_reason', '')})" if s.get("codec") else "")
        + f", nprobe **{s['nprobe']}** chosen as the smallest reaching recall@{a.k} >= {s['target_recall']} on "
        f"{s['n_tune']} held-out indexed vectors; recall@{a.k} on {s['n_check']} other held-out vectors "
        f"**{s['recall']:.3f}**. Build + tuning {t_build:.1f} s (not in the search times). Searched through "
        f"`embedstore.index.search`, {a.n_queries:,} new queries per round.",
        f"- {a.rounds} rounds, each: torch, NumPy, then every index (the reverse order in every other round); "
        "speed-ups are medians of the per-round ratios.",
        "",
        f"| method | build s | nprobe | recall@{a.k} (new queries) | q/s (median) | speed-up vs torch (median of paired) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| torch matmul + topk (reference) | - | - | 1 | {med(ref_q):,.0f} | 1 |",
        f"| NumPy matmul + argpartition (earlier baseline) | - | - | {np_recall:.3f} | {med(np_q):,.0f} | "
        f"{med(np_ratios):.2f}x |",
    ]
    for name, _, nprobe, t in rows:
        lines.append(
            f"| {name} | {t:.1f} | {nprobe} | {recalls[name]:.3f} | {med(idx_q[name]):,.0f} | "
            f"**{med(ratios[name]):.1f}x** |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
