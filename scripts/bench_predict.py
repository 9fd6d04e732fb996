"""Benchmark: whole-slide prediction (100,000 tiles) end to end, and ``ExemplarIndex.predict`` batching.

Part 1 (``--part e2e``). A store gets one query slide of N tiles (seeded 1,536-d embeddings,
the width of UNI2-h / H-optimus, written through the store's own writer) and a reference of
spots with measured expression; an exemplar index (aligner + FAISS + softmax aggregation) is
built from the reference. Timed: ``embedstore.predict`` reading the slide from the store,
projecting, searching, aggregating and returning AnnData, plus writing the .h5ad. Peak memory
is the maximum resident set size of one such prediction run alone in a fresh process. The
baseline in the same process is the anchors' way: the same aligned query keys against the
same exemplar keys by a brute-force matmul + top-k in NumPy, in blocks, then the same softmax
aggregation; both alternate (A/B/A/B) and the median paired ratio is reported.

Part 2 (``--part batching``). The public ``ExemplarIndex.predict`` at 250 and 2,000 genes:
this version (FAISS searches whole batches of 4,096 queries, only the gather + aggregation is
split by the memory budget) against the batching of the code before it (re-implemented here:
every FAISS call sized by the aggregation budget, 167 queries at 2,000 genes), alternated in
one process; and the thread policy (``OMP_WAIT_POLICY=PASSIVE``, set by embedstore) against
OpenMP's default, in fresh processes alternated round by round. The default-policy process
imports torch and faiss before embedstore, so their OpenMP runtimes start without it.

Usage::

    .venv/bin/python scripts/bench_predict.py              # both parts: 100,000 tiles, 20,000 exemplars
    .venv/bin/python scripts/bench_predict.py --part batching --tiles 20000
    .venv/bin/python scripts/bench_predict.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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


def _mixture(dim: int, seed: int = 0):
    """Seeded draws from a 50-centre Gaussian mixture in ``dim`` dimensions (clustered like embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim)).astype(np.float32)
    return lambda n: (centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def _end_to_end(args: argparse.Namespace) -> None:
    """Part 1: ``embedstore.predict`` + .h5ad vs a NumPy brute force, and peak memory."""
    import faiss
    import torch

    from embedstore.expression import Panel
    from embedstore.index import build_exemplar_index
    from embedstore.index_folder import save_index
    from embedstore.prediction import predict, write_h5ad
    from embedstore.store import open_store

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    mix = _mixture(args.dim)
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


GENE_COUNTS = (250, 2000)


def predict_at_head(idx, image_emb: np.ndarray, k: int, batch_size: int = 4096) -> np.ndarray:
    """``ExemplarIndex.predict`` as the code before this version batched it (no exclusion):
    each FAISS call sized by the aggregation memory budget."""
    from embedstore._knn import BATCH_ENTRIES, search

    agg = idx.resolve_aggregator(None)
    emb = np.asarray(image_emb, dtype=np.float32)
    idx.check_query(emb)
    width = max(len(idx.genes), idx.key_vectors.shape[1] if agg.needs_keys else 1)
    step = max(1, min(batch_size, BATCH_ENTRIES // (k * width)))
    out = np.empty((len(emb), len(idx.genes)), dtype=np.float32)
    for s in range(0, len(emb), step):
        sl = slice(s, s + step)
        keys = idx.query_keys(emb[sl])
        sims, ids = search(idx.index, keys, k)
        nk = idx.key_vectors[ids] if agg.needs_keys else None
        out[sl] = agg(sims, idx.expression[ids], query_keys=keys, neighbour_keys=nk)
    return out


def _build_indexes(args: argparse.Namespace, folder: Path) -> None:
    """One aligned exemplar index per gene count (softmax aggregation), and the query embeddings."""
    from embedstore.aligner import AlignerConfig, fit
    from embedstore.expression import Panel
    from embedstore.index import build_exemplar_index
    from embedstore.index_folder import save_index

    mix = _mixture(args.dim)
    ref_emb = mix(args.exemplars)
    np.save(folder / "queries.npy", mix(args.tiles))
    groups = np.repeat(np.arange(10), args.exemplars // 10).astype(str)
    meta = {"name": "bench", "family": "bench", "cfg": {}, "fingerprint": "bench0000000000"}
    for n_genes in GENE_COUNTS:
        # expression: the embedding's absolute values, repeated to the panel width, log-transformed
        expr = np.log1p(np.abs(np.resize(ref_emb, (args.exemplars, n_genes)))).astype(np.float32)
        genes = tuple(f"g{i}" for i in range(n_genes))
        cfg = AlignerConfig(max_epochs=3, genes=genes, encoder_fingerprint="bench0000000000")
        aligner = fit(ref_emb, expr, groups, cfg, seed=0)  # a few epochs: prediction is timed, not training
        idx = build_exemplar_index(
            ref_emb, expr, Panel(genes, "list", {}), groups, np.arange(args.exemplars).astype(str),
            aligner=aligner, encoder=meta, aggregator="softmax", k=args.k,
        )  # fmt: skip
        save_index(idx, folder / f"index{n_genes}")


def _child(args: argparse.Namespace) -> None:
    """One process of part 2: time both batchings at each gene count; print JSON seconds."""
    import importlib

    order = ["faiss", "torch", "embedstore.index_folder"]
    if args.policy == "passive":  # embedstore first: its policy is in the environment when the runtimes start
        order = order[2:] + order[:2]
    mods, policy_at_start = {}, None
    for name in order:
        if name == "faiss":  # what faiss's OpenMP runtime (and torch's, imported next) will read
            policy_at_start = os.environ.get("OMP_WAIT_POLICY")
        mods[name] = importlib.import_module(name)
    faiss, torch, load_index = mods["faiss"], mods["torch"], mods["embedstore.index_folder"].load_index
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    folder = Path(args.child)
    emb = np.load(folder / "queries.npy")
    out: dict[str, dict[str, float]] = {}
    for n_genes in GENE_COUNTS:
        idx = load_index(folder / f"index{n_genes}")
        runs = {
            "new": lambda idx=idx: idx.predict(emb, k=args.k),
            "old": lambda idx=idx: predict_at_head(idx, emb, args.k),
        }
        order = ["new", "old"] if args.round % 2 == 0 else ["old", "new"]
        times, results = {}, {}
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = runs[name]()
            times[name] = time.perf_counter() - t0
            times[name + "_cpu"] = time.process_time() - c0
        # same outputs but where FAISS's BLAS and direct kernels (1e-7 apart) break a tie at the k-th neighbour
        times["rows_differing"] = int((np.abs(results["new"] - results["old"]).max(axis=1) > 1e-5).sum())
        out[str(n_genes)] = times
    # the build stage under the same policy: many small torch parallel regions
    from embedstore.aligner import AlignerConfig, fit

    x = emb[:20_000]
    expr = np.log1p(np.abs(x[:, :250])).astype(np.float32)
    groups = np.repeat(np.arange(10), len(x) // 10 + 1)[: len(x)].astype(str)
    t0 = time.perf_counter()
    fit(x, expr, groups, AlignerConfig(max_epochs=3, genes=tuple(f"g{i}" for i in range(250))), seed=0)
    out["fit"] = time.perf_counter() - t0
    out["policy"] = policy_at_start
    print(json.dumps(out))


def _batching(args: argparse.Namespace) -> None:
    """Part 2: new vs old batching in one process; PASSIVE vs OpenMP's default wait policy across processes."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    rounds: list[dict[str, dict]] = []
    # other jobs on the machine: busy loops, one core each, for the whole part
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        _batching_rounds(args, env, rounds)
    finally:
        for proc in busy:
            proc.kill()
    _batching_tables(args, rounds)


def _batching_rounds(args: argparse.Namespace, env: dict[str, str], rounds: list[dict[str, dict]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _build_indexes(args, Path(tmp))
        build_s = time.perf_counter() - t0
        for r in range(args.pairs):  # policies alternate: P/D, D/P, ...
            got = {}
            for policy in ("passive", "default") if r % 2 == 0 else ("default", "passive"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    tmp,
                    "--policy",
                    policy,
                    "--round",
                    str(r),
                    "--k",
                    str(args.k),
                ]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if res.returncode:
                    msg = f"{shlex.join(cmd)} failed:\n{res.stderr}"
                    raise SystemExit(msg)
                got[policy] = json.loads(res.stdout.strip().splitlines()[-1])
            rounds.append(got)
            print(f"round {r + 1}: {json.dumps(got)}", file=sys.stderr, flush=True)
    print(f"indexes and queries made in {build_s:.0f} s", file=sys.stderr)


def _batching_tables(args: argparse.Namespace, rounds: list[dict[str, dict]]) -> None:
    med = statistics.median
    seen = {p: sorted({str(r[p]["policy"]) for r in rounds}) for p in ("passive", "default")}
    print(f"OMP_WAIT_POLICY when the OpenMP runtimes started: {seen}; busy-loop processes beside: {args.busy}")
    differing = {g: max(r[p][g]["rows_differing"] for r in rounds for p in r) for g in map(str, GENE_COUNTS)}
    print(f"rows of {args.tiles:,} whose prediction differs between the two batchings (> 1e-5), by genes: {differing}")
    print()
    print(
        "| genes | policy | predict s, this version (CPU s) | predict s, batching before (CPU s) | "
        "this vs before (median paired) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for n_genes in map(str, GENE_COUNTS):
        for policy in ("passive", "default"):
            t = [r[policy][n_genes] for r in rounds]
            print(
                f"| {int(n_genes):,} | {'PASSIVE' if policy == 'passive' else 'OpenMP default'} | "
                f"{med(x['new'] for x in t):.2f} ({med(x['new_cpu'] for x in t):.1f}) | "
                f"{med(x['old'] for x in t):.2f} ({med(x['old_cpu'] for x in t):.1f}) | "
                f"**{med(x['old'] / x['new'] for x in t):.2f}x** |"
            )
    print()
    print("| genes | PASSIVE vs OpenMP default, this version (median paired) | the same, batching before |")
    print("| --- | --- | --- |")
    for n_genes in map(str, GENE_COUNTS):
        new = med(r["default"][n_genes]["new"] / r["passive"][n_genes]["new"] for r in rounds)
        old = med(r["default"][n_genes]["old"] / r["passive"][n_genes]["old"] for r in rounds)
        both = med(r["default"][n_genes]["old"] / r["passive"][n_genes]["new"] for r in rounds)
        print(f"| {int(n_genes):,} | **{new:.2f}x** | {old:.2f}x (both changes together: **{both:.2f}x**) |")
    fit_ratio = med(r["default"]["fit"] / r["passive"]["fit"] for r in rounds)
    print(
        f"| aligner fit, 3 epochs on {min(args.tiles, 20_000):,} x {args.dim} | **{fit_ratio:.2f}x** "
        f"({med(r['passive']['fit'] for r in rounds):.1f} s vs {med(r['default']['fit'] for r in rounds):.1f} s) | |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "e2e", "batching"), default="all")
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--exemplars", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--genes", type=int, default=250, help="panel size of part 1")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="part 2 beside N busy-loop processes (other jobs)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--policy", choices=("passive", "default"), help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.quick:
        args.tiles, args.exemplars, args.pairs = 10_000, 4_000, 2
    print("```")
    print(shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print("```")
    print()
    if args.part in ("all", "e2e"):
        _end_to_end(args)
        print()
    if args.part in ("all", "batching"):
        _batching(args)


if __name__ == "__main__":
    main()
