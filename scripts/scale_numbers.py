"""Per-tile and per-vector costs measured on this machine, for docs/SCALE.md (10,000 slides / 100 M tiles).

Parts (``--part``, default all):

- ``storage``: bytes on disk per tile of one real slide file per embedding width, written through
  the store's own writer (``Store.slide_writer``, one ``append`` per 32-tile batch, ``commit``),
  and the bytes per tile of a tile index's tile rows (``tiles.parquet`` on disk, Arrow in memory).
- ``files``: what a query costs per slide file: one small slide file copied into N slide folders,
  then ``open_store(root).sql`` (store listing + footer checks + DuckDB) and a bare DuckDB
  ``read_parquet`` over the same files, at two N; the slope is the cost per file.
- ``index``: FAISS per-vector costs at d = 1024: k-means training of the coarse quantiser
  (seconds per vector x list x dimension x iteration), ``add`` per vector for SQ8 and PQ64 codecs
  at two list counts (fixed encode cost + cost per list), and PQ codebook training (about 15 min
  of the 17 this part took on 2 shared cores).
- ``flops``: parameters and forward FLOPs per 224 px tile of the registered encoders'
  architectures (built by timm on the meta device: no weights, no memory).

Prints Markdown tables. Example::

    .venv/bin/python scripts/scale_numbers.py --part storage files index flops
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._schema import Col, tile_id, tile_schema
from embedstore.store import open_store

DIMS = (384, 768, 1024, 1536, 2560)
TILES = 10_000  # one slide
BATCH = 32  # tiles per append, as embed() writes


def tiles_for(slide: str, n: int) -> pa.Table:
    """A tissue-grid tile table of ``n`` tiles of 224 px at 0.5 µm/px (level-0 centres at 0.25 µm/px)."""
    cols = 120
    xs = (np.arange(n) % cols) * 448 + 224 + 40_000
    ys = (np.arange(n) // cols) * 448 + 224 + 20_000
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


def write_slide(store, dim: int, slide: str, n: int, rng: np.random.Generator) -> Path:
    """One slide of ``n`` tiles written as embed() writes it; the published file's path."""
    meta = {"name": f"enc{dim}", "family": "random", "cfg": {"dim": dim}, "fingerprint": f"{dim:016d}"}
    tiles = tiles_for(slide, n)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    writer = store.slide_writer(meta, "tcga-brca", slide, n_tiles=n)
    for i in range(0, n, BATCH):
        writer.append(tiles.slice(i, BATCH), emb[i : i + BATCH])
    writer.commit()
    (path,) = (store.root / "embeddings" / f"encoder=enc{dim}").rglob("*.parquet")
    return path


def part_storage(work: Path) -> None:
    store = open_store(work / "store", read_only=False)
    rng = np.random.default_rng(0)
    slide = "TCGA-A1-A0SB-01Z-00-DX1"
    print(f"\n### Bytes on disk per tile ({TILES:,} tiles, one slide file, `Store.slide_writer`, appends of {BATCH})\n")
    print(
        "| dim | file bytes | bytes / tile | raw float32 bytes / tile (4·d) | file / raw | bytes / tile beyond the vector |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for dim in DIMS:
        path = write_slide(store, dim, slide, TILES, rng)
        size = path.stat().st_size
        per = size / TILES
        print(f"| {dim} | {size:,} | {per:,.1f} | {4 * dim:,} | {per / (4 * dim):.4f} | {per - 4 * dim:.1f} |")
    # the rows a tile index keeps per tile (id + HIT_COLUMNS), as tile_index writes and loads them
    t = tiles_for(slide, TILES)
    rows = pa.table(
        {
            "id": pa.array(np.arange(TILES, dtype=np.int64)),
            Col.COHORT: ["tcga-brca"] * TILES,
            Col.SLIDE_ID: t.column(Col.SLIDE_ID),
            Col.TILE_ID: t.column(Col.TILE_ID),
            Col.SPOT_ID: t.column(Col.SPOT_ID),
            Col.X: t.column(Col.X),
            Col.Y: t.column(Col.Y),
        }
    )
    print(f"\nThe tile table of one slide as the Ray driver holds it until the slide is published "
          f"(`tile_schema`): {t.nbytes / TILES:.1f} B/tile in memory.")  # fmt: skip
    pq.write_table(rows, work / "tiles.parquet")
    disk = (work / "tiles.parquet").stat().st_size / TILES
    mem = pq.read_table(work / "tiles.parquet").nbytes / TILES
    print(f"\nTile index rows (id, cohort, slide_id, tile_id, spot_id, x, y; TCGA-style names): "
          f"{disk:.1f} B/tile in `tiles.parquet`, {mem:.1f} B/tile as the Arrow table a search process loads.")  # fmt: skip


def _timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def part_files(work: Path, counts: tuple[int, int]) -> None:
    import duckdb

    store = open_store(work / "fstore", read_only=False)
    src = write_slide(store, 1024, "S00000", 100, np.random.default_rng(1))
    folder = src.parent
    print("\n### Cost per slide file of a query over the store (files of 100 tiles x 1,024, warm page cache)\n")
    print(
        "| files | `open_store(root).sql(count(*))`, fresh store object | DuckDB `read_parquet(glob)` count(*), fresh connection |"
    )
    print("| --- | --- | --- |")
    made = 1
    res = {}
    for n in counts:
        for i in range(made, n):
            dest = folder.parent / f"slide_id=S{i:05d}"
            dest.mkdir()
            shutil.copy2(src, dest / src.name)
        made = n
        root = store.root
        glob = str(root / "embeddings" / "**" / "*.parquet")

        def via_store(root=root, n=n):
            got = open_store(root).sql("SELECT count(*) AS n FROM embeddings")
            assert int(got["n"][0]) == 100 * n, got

        def via_duckdb(glob=glob, n=n):
            con = duckdb.connect()
            got = con.execute(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)").fetchone()[0]
            con.close()
            assert got == 100 * n

        via_store()  # warm the page cache and the per-file-version footer memo
        res[n] = (_timed(via_store), _timed(via_duckdb))
        print(f"| {n:,} | {res[n][0]:.3f} s | {res[n][1]:.3f} s |")
    a, b = counts
    per_store = (res[b][0] - res[a][0]) / (b - a) * 1e3
    per_duck = (res[b][1] - res[a][1]) / (b - a) * 1e3
    print(f"\nSlope: {per_store:.3f} ms per file through `Store.sql`, {per_duck:.3f} ms per file for bare DuckDB.")


def _clustered(n: int, d: int, rng: np.random.Generator, centres: int = 1000) -> np.ndarray:
    c = rng.standard_normal((centres, d), dtype=np.float32)
    x = c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def part_index(d: int, n_add: int) -> None:
    import faiss

    rng = np.random.default_rng(0)
    print(f"\n### FAISS per-vector costs, d = {d} (faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads)\n")
    # k-means of the coarse quantiser: cost ~ n_train * nlist * d * niter
    nlist_t = 512
    n_train = 64 * nlist_t
    xt = _clustered(64 * 1024, d, rng)  # 64 per list for the largest index below
    q = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(q, d, nlist_t, faiss.METRIC_INNER_PRODUCT)
    niter = ivf.cp.niter
    t = time.perf_counter()
    ivf.train(xt[:n_train])
    t_train = time.perf_counter() - t
    unit = t_train / (n_train * nlist_t * d * niter)
    print(f"- k-means, IVF{nlist_t} on {n_train:,} vectors, {niter} iterations: {t_train:.2f} s "
          f"= {unit * 1e12:.3f} ps per (vector x list x dim x iteration), "
          f"{2 * n_train * nlist_t * d * niter / t_train / 1e9:.0f} GFLOP/s")  # fmt: skip
    xa = _clustered(n_add, d, rng)
    print("\n| factory | code bytes / vector | add s per 1M vectors (measured) |")
    print("| --- | --- | --- |")
    fits = {}
    for codec in ("SQ8", "PQ64"):
        per = {}
        for nlist in (256, 1024):
            index = faiss.index_factory(d, f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
            t = time.perf_counter()
            index.train(xt[: 64 * nlist])
            t_tr = time.perf_counter() - t
            t = time.perf_counter()
            index.add(xa)
            per[nlist] = (time.perf_counter() - t) / n_add
            print(f"| IVF{nlist},{codec} | {faiss.extract_index_ivf(index).code_size} | {per[nlist] * 1e6:.1f} "
                  f"(train {t_tr:.1f} s) |")  # fmt: skip
        slope = (per[1024] - per[256]) / (1024 - 256)
        fits[codec] = (per[256] - 256 * slope, slope)
    for codec, (fixed, slope) in fits.items():
        print(f"- {codec} add: {fixed * 1e6:.2f} µs per vector + {slope * 1e9:.2f} ns per vector per list "
              f"(linear fit of the two rows)")  # fmt: skip


def part_flops() -> None:
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from embedstore.encoders._catalog import TIMM_CFGS
    from embedstore.encoders.timm_hub import ARCHITECTURE_KWARGS, PooledViT

    cfgs = {c.name: c for c in TIMM_CFGS}
    print("\n### Parameters and forward FLOPs per 224 px tile (timm on the meta device, batch 1)\n")
    print("| encoder | timm architecture | dim | params (M) | GFLOP / tile (2 x MAC) |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("uni", "uni2-h", "virchow2", "h-optimus-0", "prov-gigapath"):
        arch = cfgs[name].architecture
        with torch.device("meta"):
            trunk = timm.create_model(
                arch.split(".")[0], pretrained=False, num_classes=0, **ARCHITECTURE_KWARGS[name]()
            )
            model = PooledViT(trunk, "cls_mean" if name == "virchow2" else "token").eval()
            x = torch.empty(1, 3, 224, 224)
            params = sum(p.numel() for p in model.parameters())
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                out = model(x)
        print(f"| {name} | {arch} | {out.shape[-1]} | {params / 1e6:.1f} | {fc.get_total_flops() / 1e9:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", default=["storage", "files", "index", "flops"],
                    choices=["storage", "files", "index", "flops"])  # fmt: skip
    ap.add_argument("--files", type=int, nargs=2, default=(200, 2000), help="the two file counts of --part files")
    ap.add_argument("--dim", type=int, default=1024, help="vector width of --part index")
    ap.add_argument("--n-add", type=int, default=100_000, help="vectors added per index of --part index")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    args = ap.parse_args()
    print(f"`{' '.join([Path(sys.executable).name, *sys.argv])}` on {platform.machine()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores")  # fmt: skip
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        if "storage" in args.part:
            part_storage(work)
        if "files" in args.part:
            part_files(work, tuple(args.files))
        if "index" in args.part:
            part_index(args.dim, args.n_add)
        if "flops" in args.part:
            part_flops()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
