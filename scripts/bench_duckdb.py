"""DuckDB over the store: GROUP BY over tile metadata, and SQL top-10 cosine neighbours vs NumPy.

python scripts/bench_duckdb.py            # 10,000,000 tile rows; 100,000 x 1,024 embeddings
python scripts/bench_duckdb.py --quick    # 1,000,000 tile rows; 20,000 x 1,024
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._schema import Col, tile_schema
from embedstore.store import open_store


def paired(a, b, repeats):
    ta, tb = [], []
    for _ in range(repeats):
        for f, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.n = 1_000_000, 20_000
    work = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    # Tile metadata only (no vectors) for the GROUP BY: 1,000 slides in 10 cohorts, one file per slide.
    meta_dir = work / "tiles"
    n_slides = 1000
    per = args.rows // n_slides
    cohort_of = {f"S{i:04d}": f"c{i % 10}" for i in range(n_slides)}
    for s, c in cohort_of.items():
        t = pa.table(
            {
                Col.COHORT: [c] * per,
                Col.SLIDE_ID: [s] * per,
                Col.X: rng.integers(0, 100_000, per),
                Col.Y: rng.integers(0, 100_000, per),
                Col.MPP: np.full(per, 0.5),
                Col.PADDED: rng.random(per) < 0.05,
            }
        )
        d = meta_dir / f"cohort={c}" / f"slide_id={s}"
        d.mkdir(parents=True)
        pq.write_table(t, d / "tiles.parquet", compression="zstd")
    import duckdb

    con = duckdb.connect()
    glob = str(meta_dir / "*" / "*" / "*.parquet")
    q = f"SELECT cohort, count(*) n, avg(x) ax, sum(padded::INT) p FROM read_parquet('{glob}', hive_partitioning=false) GROUP BY cohort"
    tab = pq.ParquetDataset(meta_dir, partitioning=None).read(columns=[Col.COHORT, Col.X, Col.PADDED])
    coh = tab.column(Col.COHORT).combine_chunks().dictionary_encode()
    codes = coh.indices.to_numpy()
    xs = tab.column(Col.X).to_numpy()
    pad = tab.column(Col.PADDED).to_numpy(zero_copy_only=False)

    def numpy_groupby():
        return np.bincount(codes), np.bincount(codes, xs), np.bincount(codes, pad)

    res = con.execute(q).fetchall()
    n_np = numpy_groupby()[0]
    assert sorted(r[1] for r in res) == sorted(n_np.tolist())
    t_np, t_sql, r_gb = paired(numpy_groupby, lambda: con.execute(q).fetchall(), args.repeats)
    t0 = time.perf_counter()
    pq.ParquetDataset(meta_dir, partitioning=None).read(columns=[Col.COHORT, Col.X, Col.PADDED])
    t_load = time.perf_counter() - t0

    # Top-10 cosine neighbours among n embeddings through the store's SQL view.
    store = open_store(work / "store", read_only=False)
    writer_meta = {"name": "bench", "fingerprint": "0" * 16}
    n_sl = 10
    for i in range(n_sl):
        k = args.n // n_sl
        t = pa.table(
            {
                Col.SLIDE_ID: [f"E{i}"] * k,
                Col.TILE_ID: [f"{j}_{i}" for j in range(k)],
                Col.SPOT_ID: pa.nulls(k, pa.string()),
                Col.X: np.arange(k),
                Col.Y: np.full(k, i),
                Col.MPP: np.full(k, 0.5),
                Col.SIZE_PX: pa.array(np.full(k, 224, np.int32)),
                Col.PADDED: np.zeros(k, bool),
            },
            schema=tile_schema(),
        )
        w = store.slide_writer(writer_meta, "bench", f"E{i}")
        w.append(t, rng.standard_normal((k, args.dim), dtype=np.float32))
        w.commit()
    meta, X = store.read_embeddings("bench")
    qv = X[123]
    sql = f"SELECT tile_id, cosine(embedding, $q::FLOAT[{args.dim}]) AS s FROM embeddings ORDER BY s DESC LIMIT 10"
    ids = meta.column(Col.TILE_ID).to_numpy(zero_copy_only=False)
    norms = np.linalg.norm(X, axis=1)

    def numpy_topk():
        s = X @ qv / (norms * np.linalg.norm(qv))
        top = np.argpartition(-s, 10)[:10]
        return top[np.argsort(-s[top])]

    got = store.sql(sql, {"q": qv.tolist()})
    want = ids[numpy_topk()]
    match = got[Col.TILE_ID].tolist() == want.tolist()
    t_np2, t_sql2, r_knn = paired(numpy_topk, lambda: store.sql(sql, {"q": qv.tolist()}), args.repeats)
    lines = [
        "## DuckDB over the store",
        "",
        f"`python scripts/bench_duckdb.py{' --quick' if args.quick else ''}` — 2 cores, warm page cache, median of "
        f"{args.repeats} paired runs; other jobs shared the machine (±15 %).",
        "",
        "| query | DuckDB SQL | NumPy baseline | SQL / NumPy time |",
        "| --- | --- | --- | --- |",
        f"| GROUP BY cohort over {args.rows:,} tile rows (1,000 Parquet files) | {t_sql:.3f} s | {t_np:.3f} s "
        f"(in-memory arrays; loading them with pyarrow took {t_load:.2f} s more) | {r_gb:.1f} |",
        f"| top-10 cosine neighbours among {args.n:,} × {args.dim} (`embeddings` view, FLOAT[{args.dim}] cast) "
        f"| {t_sql2:.3f} s | {t_np2:.3f} s (matrix in memory) | {r_knn:.1f} |",
        "",
        f"SQL top-10 equals NumPy brute force: {match}.",
    ]
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
