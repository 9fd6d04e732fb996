"""read_embeddings with 1, 2 and 4 threads against h5py, A/B in one process (BENCHMARKS.md, Storage).

python scripts/bench_read_threads.py --slides 50 --tiles 5000 --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_storage import tiles_for

import embedstore.store._store as store_module
from embedstore.store import open_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=50)
    ap.add_argument("--tiles", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n, dim = args.tiles, args.dim
    work = Path(tempfile.mkdtemp(prefix="bench_read_"))
    try:
        store = open_store(work / "store", read_only=False)
        meta = {"name": "bench", "family": "random", "cfg": {"dim": dim}, "fingerprint": "0" * 16}
        rng = np.random.default_rng(0)
        (work / "h5").mkdir()
        slides = [f"S{k:04d}" for k in range(args.slides)]
        for s in slides:
            emb, tiles = rng.standard_normal((n, dim), dtype=np.float32), tiles_for(s, n)
            w = store.slide_writer(meta, "bench", s, n_tiles=n)
            w.append(tiles, emb)
            w.commit()
            with h5py.File(work / "h5" / f"{s}.h5", "w") as h:
                h.create_dataset("features", data=emb)
                h.create_dataset("coords", data=np.stack([tiles.column("x"), tiles.column("y")], 1))

        def h5() -> None:
            out = np.empty((n * len(slides), dim), np.float32)
            for i, s in enumerate(slides):
                with h5py.File(work / "h5" / f"{s}.h5", "r") as h:
                    h["features"].read_direct(out, dest_sel=np.s_[i * n : (i + 1) * n])
                    h["coords"][:]

        def store_read(threads: int, columns: list[str] | None = None):
            def read() -> None:
                store_module.READ_THREADS = threads
                store.read_embeddings("bench", columns=columns)

            return read

        cases = {
            "HDF5 (features + coords)": h5,
            "1 thread, tile_id only": store_read(1, ["tile_id"]),
            "2 threads, every column": store_read(2),
            "2 threads, tile_id only": store_read(2, ["tile_id"]),
            "2 threads, vectors only": store_read(2, []),
            "4 threads, every column": store_read(4),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, read in cases.items():
                t = time.perf_counter()
                read()
                times[name].append(time.perf_counter() - t)
        base = times["HDF5 (features + coords)"]
        print(f"`python scripts/bench_read_threads.py {' '.join(sys.argv[1:])}`\n")
        print("| read | median s | speed vs HDF5 (median of paired ratios) |\n| --- | --- | --- |")
        for name, ts in times.items():
            ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
            print(f"| {name} | {statistics.median(ts):.3f} | {ratio:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
