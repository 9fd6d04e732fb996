"""Benchmark: whole-slide prediction (100,000 tiles) end to end after embedding.

A store gets one query slide of N tiles (seeded 1,536-d embeddings, the width of UNI2-h /
H-optimus, written through the store's own writer) and a reference of spots with measured
expression; an exemplar index (aligner + FAISS + softmax aggregation) is built from the
reference. Timed: ``embedstore.predict`` reading the slide from the store, projecting,
searching, aggregating and returning AnnData, plus writing the .h5ad. Peak memory is the
maximum resident set size of one such prediction run alone in a fresh process.

The baseline in the same process is the anchors' way: the same aligned query keys against
the same exemplar keys by a brute-force matmul + top-k in NumPy, in blocks, then the same
softmax aggregation; both alternate (A/B/A/B) and the median paired ratio is reported.

Usage::

    .venv/bin/python scripts/bench_predict.py              # 100,000 tiles, 20,000 exemplars
    .venv/bin/python scripts/bench_predict.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def _write_slide(store, slide_id: str, emb: np.ndarray, meta: dict) -> None:
    n = len(emb)
    side = int(np.ceil(np.sqrt(n)))
    x = (np.arange(n) % side) * 224 + 112
    y = (np.arange(n) // side) * 224 + 112
    tiles = pa.table(
        {
            "slide_id": pa.array([slide_id] * n),
            "tile_id": pa.array([f"{a}_{b}" for a, b in zip(x, y, strict=True)]),
            "spot_id": pa.array([None] * n, pa.string()),
            "x": pa.array(x, pa.int64()),
            "y": pa.array(y, pa.int64()),
            "mpp": pa.array([0.5] * n),
            "size_px": pa.array([224] * n, pa.int32()),
            "padded": pa.array([False] * n),
        }
    )
    writer = store.slide_writer(meta, "query", slide_id)
    for s in range(0, n, 8192):
        writer.append(tiles.slice(s, 8192), emb[s : s + 8192])
    writer.commit()


def _brute_force(keys: np.ndarray, ex_keys: np.ndarray, ex_expr: np.ndarray, k: int, tau: float) -> np.ndarray:
    """Blocked matmul + argpartition top-k + softmax aggregation, in NumPy."""
    out = np.empty((len(keys), ex_expr.shape[1]), dtype=np.float32)
    for s in range(0, len(keys), 2048):
        sims = keys[s : s + 2048] @ ex_keys.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        ts = np.take_along_axis(sims, top, axis=1)
        w = np.exp((ts - ts.max(axis=1, keepdims=True)) / tau)
        w /= w.sum(axis=1, keepdims=True)
        out[s : s + 2048] = np.einsum("nk,nkg->ng", w, ex_expr[top])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--exemplars", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tiles, args.exemplars, args.pairs = 10_000, 4_000, 2

    import faiss
    import torch

    from embedstore.expression import Panel
    from embedstore.index import build_exemplar_index
    from embedstore.index_folder import save_index
    from embedstore.prediction import predict, write_h5ad
    from embedstore.store import open_store

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, args.dim)).astype(np.float32)
    mix = lambda n: (centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, args.dim))).astype(np.float32)  # noqa: E731
    meta = {"name": "bench", "family": "bench", "cfg": {}, "fingerprint": "bench0000000000"}

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "store", read_only=False)
        t0 = time.perf_counter()
        _write_slide(store, "big", mix(args.tiles), meta)
        write_s = time.perf_counter() - t0
        ref_emb = mix(args.exemplars)
        expr = np.log1p(np.abs(ref_emb[:, : args.genes])).astype(np.float32)
        from embedstore.aligner import AlignerConfig, fit

        groups = np.repeat(np.arange(10), args.exemplars // 10).astype(str)
        t0 = time.perf_counter()
        aligner = fit(  # a few epochs: the benchmark times prediction, not training
            ref_emb,
            expr,
            groups,
            AlignerConfig(
                max_epochs=3, genes=tuple(f"g{i}" for i in range(args.genes)), encoder_fingerprint="bench0000000000"
            ),
            seed=0,
        )
        fit_s = time.perf_counter() - t0
        panel = Panel(tuple(f"g{i}" for i in range(args.genes)), "list", {})
        idx = build_exemplar_index(
            ref_emb, expr, panel, groups, np.arange(args.exemplars).astype(str), aligner=aligner,
            encoder=meta, aggregator="softmax",
        )  # fmt: skip
        idx.manifest["k"] = args.k
        save_index(idx, Path(tmp) / "index")
        store = open_store(Path(tmp) / "store")
        # Peak memory of one prediction alone, in a fresh process. VmHWM, not ru_maxrss: Linux
        # carries ru_maxrss across exec, so a child would report this (large) parent's peak.
        code = (
            "from embedstore.prediction import predict, write_h5ad; "
            f"a = predict({str(Path(tmp) / 'index')!r}, {str(Path(tmp) / 'store')!r}, slide_ids=['big'], k={args.k}); "
            f"write_h5ad(a, {str(Path(tmp) / 'child.h5ad')!r}); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print(int(hwm.split()[1]) / 1024)"
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rss_predict = float(child.stdout.strip().splitlines()[-1])

        _, q_emb = store.read_embeddings("bench")
        keys = idx.query_keys(q_emb)
        pipe, base, ratios = [], [], []
        for _ in range(args.pairs):
            t0 = time.perf_counter()
            adata = predict(Path(tmp) / "index", store, slide_ids=["big"], k=args.k)
            write_h5ad(adata, Path(tmp) / "big.h5ad")
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            _brute_force(keys, idx.key_vectors, idx.expression, args.k, 0.1)
            b = time.perf_counter() - t0
            pipe.append(a)
            base.append(b)
            ratios.append(b / a)
        print(
            f"store write of {args.tiles} x {args.dim} embeddings: {write_s:.1f} s; aligner (3 epochs): {fit_s:.1f} s"
        )
        print()
        print(
            "| tiles | exemplars | dim | genes | k | factory | predict + write .h5ad (s) | NumPy brute force + softmax (s) | speed-up (median paired) | peak RSS of one prediction in its own process (MiB) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| {args.tiles:,} | {args.exemplars:,} | {args.dim} | {args.genes} | {args.k} | {idx.manifest['factory']} | "
            f"{statistics.median(pipe):.1f} | {statistics.median(base):.1f} | {statistics.median(ratios):.2f}x | "
            f"{rss_predict:.0f} |"
        )


if __name__ == "__main__":
    main()
