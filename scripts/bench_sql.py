"""Benchmark: nearest tiles in SQL through the tile index vs DuckDB's full scan, batch joins, incremental update.

A store of ``--slides`` slides x ``--tiles`` tiles x ``--dim`` (a clustered Gaussian mixture,
like the embeddings of a cohort) is written once to ``--store`` (kept for reruns). Then:

1. the tile index is built (time, codec, nprobe and recall@10 chosen at build time);
2. top-10 nearest tiles of one vector per ``es.sql`` call (opening the store, a new DuckDB
   session, the query), through ``nearest_tiles`` vs the full scan
   ``ORDER BY array_cosine_similarity(...) DESC LIMIT 10``, alternated A/B, with recall@10
   of the index against the scan;
3. 1,000 queries in one SQL statement (a LATERAL join over stored tiles) vs the same 1,000
   vectors searched by calling the FAISS index directly from Python;
4. adding one slide of ``--tiles`` tiles by an incremental update vs the full build of step 1.

Usage::

    .venv/bin/python scripts/bench_sql.py                     # 100 slides x 10,000 tiles x 1,024 = 1M
    .venv/bin/python scripts/bench_sql.py --slides 10 --tiles 2000 --dim 256 --store /tmp/sqlq
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedstore as es
from embedstore._schema import Col, tile_id, tile_schema
from embedstore._vectors import l2_normalize
from embedstore.store import open_store
from embedstore.store._tile_search import load_tile_index
from embedstore.tile_index import build_tile_index, nearest_tiles

ENCODER = {"name": "bench", "family": "builtin", "cfg": {"dim": 0}, "fingerprint": "b" * 64}


def mixture(n: int, centres: np.ndarray, rng: np.random.Generator, spread: float = 0.6) -> np.ndarray:
    lab = rng.integers(0, len(centres), n)
    return (centres[lab] + spread * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)).astype(np.float32)


def tiles_of(slide: str, n: int) -> pa.Table:
    side = int(np.ceil(np.sqrt(n)))
    xs = (np.arange(n) % side) * 224 + 112
    ys = (np.arange(n) // side) * 224 + 112
    return pa.table(
        {
            Col.SLIDE_ID: [slide] * n,
            Col.TILE_ID: [tile_id(x, y) for x, y in zip(xs, ys, strict=True)],
            Col.SPOT_ID: pa.nulls(n, pa.string()),
            Col.X: xs,
            Col.Y: ys,
            Col.MPP: np.full(n, 0.5),
            Col.SIZE_PX: pa.array(np.full(n, 224), pa.int32()),
            Col.PADDED: np.zeros(n, dtype=bool),
        },
        schema=tile_schema(),
    )


def write_slide(store, slide: str, n: int, centres: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = store.slide_writer({**ENCODER, "cfg": {"dim": centres.shape[1]}}, f"c{seed % 4}", slide)
    tiles = tiles_of(slide, n)
    for s in range(0, n, 5000):
        part = tiles.slice(s, 5000)
        w.append(part, mixture(part.num_rows, centres, rng))
    w.commit()


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("/tmp/embedstore-bench-sql"))
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=5, help="A/B pairs of single-vector queries")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--recall-queries", type=int, default=200)
    args = ap.parse_args()
    print("command:", shlex.join([".venv/bin/python", "scripts/bench_sql.py", *sys.argv[1:]]))
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, args.dim)).astype(np.float32)
    store = open_store(args.store, read_only=False)
    have = {p.parent.name for p in args.store.glob("embeddings/encoder=bench/cohort=*/slide_id=*/tiles.parquet")}
    t0 = time.perf_counter()
    for i in range(args.slides):
        if f"slide_id=S{i:04d}" not in have:
            write_slide(store, f"S{i:04d}", args.tiles, centres, seed=i)
    extra = f"X{args.slides:04d}"
    for p in args.store.glob(f"embeddings/encoder=bench/cohort=*/slide_id={extra}"):
        import shutil

        shutil.rmtree(p)  # the slide step 4 adds, left by an earlier run
    n_total = args.slides * args.tiles
    print(f"store: {n_total:,} tiles x {args.dim} in {args.slides} slides ({time.perf_counter() - t0:.0f} s to write)")

    # 1. build
    t_build, report = timed(lambda: build_tile_index(args.store, "bench", rebuild=True))
    print(f"build: {t_build:.1f} s; {report.summary()}")

    # 2. single-vector queries through es.sql: index vs full scan (A/B alternated)
    queries = l2_normalize(mixture(args.pairs + 1, centres, np.random.default_rng(123)))
    via_index = "SELECT slide_id, tile_id, score FROM nearest_tiles($v, k := 10)"
    full_scan = (
        f"SELECT slide_id, tile_id, array_cosine_similarity(embedding, $v::FLOAT[{args.dim}]) AS score "
        "FROM embeddings ORDER BY score DESC LIMIT 10"
    )
    t_first, _ = timed(lambda: es.sql(args.store, via_index, params={"v": queries[-1].tolist()}))
    t_idx, t_scan, recalls = [], [], []
    for q in queries[:-1]:
        a, got = timed(lambda q=q: es.sql(args.store, via_index, params={"v": q.tolist()}))
        b, truth = timed(lambda q=q: es.sql(args.store, full_scan, params={"v": q.tolist()}))
        t_idx.append(a)
        t_scan.append(b)
        recalls.append(len(set(got.tile_id + got.slide_id) & set(truth.tile_id + truth.slide_id)) / 10)
    ratios = [b / a for a, b in zip(t_idx, t_scan, strict=True)]
    print(
        f"one query, es.sql end to end: index {statistics.median(t_idx):.3f} s (first call in the process "
        f"{t_first:.3f} s), full scan {statistics.median(t_scan):.3f} s; median paired speed-up "
        f"{statistics.median(ratios):.1f}x; recall@10 vs the scan {np.mean(recalls):.3f} ({len(recalls)} queries)"
    )

    # recall@10 of nearest_tiles on fresh vectors of the same mixture, against NumPy brute force
    fresh = l2_normalize(mixture(args.recall_queries, centres, np.random.default_rng(777)))
    meta, x = open_store(args.store).read_embeddings("bench", columns=[Col.SLIDE_ID, Col.TILE_ID])
    keys = np.char.add(np.array(meta.column(Col.SLIDE_ID).to_pylist()), np.array(meta.column(Col.TILE_ID).to_pylist()))
    truth = np.argsort(-(fresh @ l2_normalize(x).T), axis=1)[:, :10]
    del x
    hits = nearest_tiles(args.store, fresh, 10, encoder="bench").to_pandas()
    found = (hits.slide_id + hits.tile_id).to_numpy().reshape(len(fresh), 10)
    recall = np.mean([len(set(f) & set(keys[t])) / 10 for f, t in zip(found, truth, strict=True)])
    print(f"recall@10 of nearest_tiles on {len(fresh)} fresh queries vs NumPy brute force: {recall:.3f}")

    # 3. a batch of queries in one statement vs FAISS called directly
    rows_up_to = int(np.ceil(args.batch / np.ceil(np.sqrt(args.tiles)))) * 224  # the first tiles of the grid
    batch_sql = (
        "SELECT e.tile_id AS query_tile, h.slide_id, h.tile_id, h.score FROM "
        f"(SELECT tile_id, embedding FROM embeddings WHERE slide_id = 'S0001' AND y < {rows_up_to}) e, "
        "LATERAL nearest_tiles(e.embedding, k := 10) h"
    )
    meta, x = open_store(args.store).read_embeddings("bench", slide_ids=["S0001"], columns=[Col.Y])
    qb = l2_normalize(x[meta.column(Col.Y).to_numpy() < rows_up_to])
    index = load_tile_index(args.store, "bench").index

    def python_end_to_end():
        m, v = open_store(args.store).read_embeddings("bench", slide_ids=["S0001"], columns=[Col.Y])
        return nearest_tiles(args.store, v[m.column(Col.Y).to_numpy() < rows_up_to], 10, encoder="bench")

    held = open_store(args.store)  # an analyst's open store: its files listed once, a session per query
    held.sql(batch_sql)
    t_sql, t_held, t_faiss, t_py = [], [], [], []
    for _ in range(args.pairs):
        a, df = timed(lambda: es.sql(args.store, batch_sql))
        h, _ = timed(lambda: held.sql(batch_sql))
        b, _ = timed(lambda: index.search(qb, 10))
        c, _ = timed(python_end_to_end)
        for acc, t in ((t_sql, a), (t_held, h), (t_faiss, b), (t_py, c)):
            acc.append(t)
    assert len(df) == 10 * len(qb), len(df)

    def ratio(num, den):
        return statistics.median([n / d for n, d in zip(num, den, strict=True)])

    print(
        f"{len(qb)} queries in one statement (reading the query vectors from the store included): es.sql "
        f"{statistics.median(t_sql):.3f} s, open_store(...).sql {statistics.median(t_held):.3f} s; FAISS "
        f"index.search from Python {statistics.median(t_faiss):.3f} s; Python end to end (read_embeddings + "
        f"nearest_tiles) {statistics.median(t_py):.3f} s. Throughput vs FAISS direct: es.sql "
        f"{ratio(t_faiss, t_sql):.2f}x, open store {ratio(t_faiss, t_held):.2f}x; vs Python end to end: es.sql "
        f"{ratio(t_py, t_sql):.2f}x, open store {ratio(t_py, t_held):.2f}x"
    )

    # 4. incremental update: one more slide
    write_slide(store, extra, args.tiles, centres, seed=args.slides)
    t_update, rep = timed(lambda: build_tile_index(args.store, "bench"))
    print(
        f"update adding 1 slide of {args.tiles:,} tiles to {n_total:,}: {t_update:.1f} s vs full build {t_build:.1f} s "
        f"({t_build / t_update:.0f}x faster); {rep.summary()}"
    )


if __name__ == "__main__":
    main()
