"""Storage benchmark: embedding Parquet store vs one HDF5 file per slide (TRIDENT/HEST layout).

Prints a markdown section. Ratios are medians of paired A/B runs in this process.

    python scripts/bench_storage.py            # 1,000,000 x 1,024 in 100 slides (appends of 32 tiles)
    python scripts/bench_storage.py --quick    # 100,000 x 1,024 in 20 slides
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from embedstore._schema import Col, tile_id, tile_schema
from embedstore.store import open_store
from embedstore.store._files import vectors_from_arrow, write_options

LOG = logging.getLogger("bench_storage")


def tiles_for(slide: str, n: int) -> pa.Table:
    xs = (np.arange(n) % 200) * 224 + 112
    ys = (np.arange(n) // 200) * 224 + 112
    return pa.table(
        {
            Col.SLIDE_ID: [slide] * n,
            Col.TILE_ID: [tile_id(x, y) for x, y in zip(xs, ys, strict=True)],
            Col.SPOT_ID: pa.nulls(n, pa.string()),
            Col.X: xs,
            Col.Y: ys,
            Col.MPP: np.full(n, 0.5),
            Col.SIZE_PX: pa.array(np.full(n, 224, np.int32)),
            Col.PADDED: np.zeros(n, bool),
        },
        schema=tile_schema(),
    )


def paired(a, b, repeats: int) -> tuple[float, float, float]:
    """Median time of a, of b, and median of paired ratios time(b)/time(a) (alternating a, b)."""
    ta, tb = [], []
    for _ in range(repeats):
        for f, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb, strict=True))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="tiles per append (embed's --batch-size)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--her2st", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/her2st")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.slides = 100_000, 20
    n_per = args.n // args.slides
    dim = args.dim
    work = Path(tempfile.mkdtemp(dir=args.dir))
    store = open_store(work / "store", read_only=False)
    h5dir = work / "h5"
    h5dir.mkdir()
    meta = {"name": "bench", "family": "random", "cfg": {"dim": dim}, "fingerprint": "0" * 16}
    slides = [f"S{i:04d}" for i in range(args.slides)]
    rng = np.random.default_rng(0)
    w_pq, w_h5 = [], []

    def write_pq(s, tiles, emb):
        # As embed() writes a slide: one append per encoder batch, then the commit.
        w = store.slide_writer(meta, "bench", s, n_tiles=n_per)
        for i in range(0, n_per, args.batch):
            w.append(tiles.slice(i, args.batch), emb[i : i + args.batch])
        w.commit()

    def write_h5(s, tiles, emb):
        with h5py.File(h5dir / f"{s}.h5", "w") as h:
            h.create_dataset("features", data=emb)
            h.create_dataset(
                "coords", data=np.stack([tiles.column(Col.X).to_numpy(), tiles.column(Col.Y).to_numpy()], 1)
            )

    for k, s in enumerate(slides):
        emb = rng.standard_normal((n_per, dim), dtype=np.float32)
        tiles = tiles_for(s, n_per)
        pair = ((write_pq, w_pq), (write_h5, w_h5))
        for write, acc in pair if k % 2 == 0 else pair[::-1]:  # A/B, then B/A
            t = time.perf_counter()
            write(s, tiles, emb)
            acc.append(time.perf_counter() - t)
    t_pq, t_h5 = sum(w_pq), sum(w_h5)
    r_write = statistics.median(p / h for p, h in zip(w_pq, w_h5, strict=True))
    raw = args.n * dim * 4
    size_pq, size_h5 = du(store.root / "embeddings"), du(h5dir)

    def read_h5(names):
        out = np.empty((n_per * len(names), dim), np.float32)
        for i, s in enumerate(names):
            with h5py.File(h5dir / f"{s}.h5", "r") as h:
                h["features"].read_direct(out, dest_sel=np.s_[i * n_per : (i + 1) * n_per])
                coords.append(h["coords"][:])
        return out

    coords: list = []

    files = sorted((store.root / "embeddings").rglob("*.parquet"))

    def read_pyarrow():
        return [vectors_from_arrow(pq.read_table(f, columns=[Col.EMBEDDING]).column(0), dim) for f in files]

    ten = list(rng.choice(slides, size=min(10, len(slides)), replace=False))
    m, x = store.read_embeddings("bench")
    assert np.array_equal(x, read_h5(slides))
    del m, x
    h_all, p_all, r_all = paired(lambda: read_h5(slides), lambda: store.read_embeddings("bench"), args.repeats)
    h_ten, p_ten, r_ten = paired(
        lambda: read_h5(ten), lambda: store.read_embeddings("bench", slide_ids=ten), args.repeats
    )
    h_gen, g_all, r_gen = paired(lambda: read_h5(slides), read_pyarrow, args.repeats)
    h_vec, p_vec, r_vec = paired(
        lambda: read_h5(slides), lambda: store.read_embeddings("bench", columns=[Col.TILE_ID]), args.repeats
    )

    # float16 vs float32 on the first 10 slides (same writer options), pyarrow decode + DuckDB.
    f16 = work / "f16"
    f16.mkdir()
    sub = files[:10]
    for f in sub:
        t = pq.read_table(f)
        e = vectors_from_arrow(t.column(Col.EMBEDDING), dim).astype(np.float16)
        col = pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), dim)
        t16 = t.set_column(t.schema.get_field_index(Col.EMBEDDING), Col.EMBEDDING, col)
        pq.write_table(t16, f16 / f.name.replace(".parquet", f"-{f.parent.name}.parquet"), **write_options(t16.schema))
    size32, size16 = sum(f.stat().st_size for f in sub), du(f16)
    f16_files = sorted(f16.glob("*.parquet"))
    t32_, t16_, r16 = paired(
        lambda: [vectors_from_arrow(pq.read_table(f, columns=[Col.EMBEDDING]).column(0), dim) for f in sub],
        lambda: [vectors_from_arrow(pq.read_table(f, columns=[Col.EMBEDDING]).column(0), dim) for f in f16_files],
        args.repeats,
    )
    import duckdb

    con = duckdb.connect()
    q = f"SELECT max(array_inner_product(embedding::FLOAT[{dim}], embedding::FLOAT[{dim}])) FROM read_parquet($f)"
    d32, d16, rd16 = paired(
        lambda: con.execute(q, {"f": [str(f) for f in sub]}).fetchall(),
        lambda: con.execute(q, {"f": [str(f) for f in f16_files]}).fetchall(),
        args.repeats,
    )
    typ16 = con.execute("SELECT typeof(embedding) FROM read_parquet($f) LIMIT 1", {"f": str(f16_files[0])}).fetchall()[
        0
    ][0]

    lines = [
        "## Storage: Parquet store vs HDF5 per slide",
        "",
        f"`{' '.join(['python', *sys.argv])}` — {args.n:,} embeddings × {dim} float32 "
        f"in {args.slides} slides ({n_per:,} tiles each); {platform.processor() or platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores, warm page cache, median of {args.repeats} paired runs. "
        "Other jobs shared the machine: treat ratios as ±15 %.",
        "",
        "| measure | Parquet store | HDF5 per slide | ratio |",
        "| --- | --- | --- | --- |",
        f"| bytes per embedding / raw ({dim * 4} B) | {size_pq / raw:.4f} | {size_h5 / raw:.4f} | size pq/h5 {size_pq / size_h5:.3f} |",
        f"| write all: `slide_writer` append per {args.batch} tiles + commit, vs one h5py write per slide | {t_pq:.1f} s | {t_h5:.1f} s | time pq/h5 {r_write:.2f} (median of per-slide ratios; totals {t_pq / t_h5:.2f}) |",
        f"| read all into one (N, D) array: `read_embeddings` | {p_all:.2f} s | {h_all:.2f} s | speed vs HDF5 {1 / r_all:.2f}× |",
        f"| read 10 slides | {p_ten:.3f} s | {h_ten:.3f} s | speed vs HDF5 {1 / r_ten:.2f}× |",
        f"| read all, vectors + tile_id only | {p_vec:.2f} s | {h_vec:.2f} s | speed vs HDF5 {1 / r_vec:.2f}× |",
        f"| read all, generic pyarrow decode of the same files (what pandas/polars do) | {g_all:.2f} s | {h_gen:.2f} s | speed vs HDF5 {1 / r_gen:.2f}× |",
        "",
        "HDF5 reads `features` (read_direct into one array) and `coords` of each slide; the store reads the "
        "vectors through its page-level fast path plus every metadata column (or only tile_id).",
        "",
        f"float16 vs float32 (10 slides, same writer options): size {size16 / size32:.3f}× of float32; "
        f"pyarrow read+convert to float32 takes {r16:.2f}× the float32 time ({t16_:.2f} s vs {t32_:.2f} s); "
        f"DuckDB reads float16 Parquet as `{typ16}` and computes on it after a cast "
        f"(inner-product scan {d16:.2f} s vs {d32:.2f} s float32, {rd16:.2f}×). "
        "float16 has no fast path (pyarrow decodes its levels) and loses precision (about 3 decimal digits).",
    ]
    # Expression layout on her2st's real counts.
    cnts = sorted((args.her2st / "data/ST-cnts").glob("*.tsv.gz")) if args.her2st.is_dir() else []
    if cnts:
        import pandas as pd

        rows = []
        exp_store = open_store(work / "expr", read_only=False)
        gz = csr_bytes = 0
        t_read = []
        for p in cnts:
            df = pd.read_csv(p, sep="\t", index_col=0)
            m = sp.csr_matrix(df.to_numpy())
            gz += p.stat().st_size
            buf = io.BytesIO()
            np.savez_compressed(buf, data=m.data.astype(np.int32), indices=m.indices, indptr=m.indptr)
            csr_bytes += buf.tell()
            xy = np.zeros((m.shape[0], 2))
            exp_store.write_spots("her2st", p.name.split(".")[0], df.index.astype(str), xy, m, df.columns.astype(str))
            rows.append((p.name.split(".")[0], *m.shape, m.nnz))
        long_bytes = du(exp_store.root / "expression")
        dense = sum(r[1] * r[2] * 4 for r in rows)
        t0 = time.perf_counter()
        _obs, genes, _X = exp_store.read_expression()
        t_read.append(time.perf_counter() - t0)
        lines += [
            "",
            f"Expression layout, her2st {len(rows)} sections ({sum(r[1] for r in rows)} spots, "
            f"{len(genes):,} genes in the union, {sum(r[3] for r in rows):,} nonzero counts):",
            "",
            "| layout | bytes | vs source .tsv.gz |",
            "| --- | --- | --- |",
            f"| source gzip TSV (dense spots × genes) | {gz:,} | 1.00 |",
            f"| chosen: long sparse Parquet (spot_id, gene, count), zstd | {long_bytes:,} | {long_bytes / gz:.2f} |",
            f"| CSR arrays (npz, deflate) — not SQL-joinable | {csr_bytes:,} | {csr_bytes / gz:.2f} |",
            f"| dense int32 (uncompressed) | {dense:,} | {dense / gz:.2f} |",
            "",
            f"`read_expression()` of all sections into one CSR: {t_read[0]:.3f} s.",
        ]
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
