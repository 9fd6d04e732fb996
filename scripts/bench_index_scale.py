"""Benchmark: tile indexes larger than memory (on-disk inverted lists) vs in-memory, as the store grows.

A store of clustered Gaussian vectors (``--dim``, slides of ``--tiles`` tiles) is written once
and grown to each of ``--sizes``. At each size the public call ``es.build_tile_index`` runs in a
child process, once with ``layout="ondisk"`` and once with ``layout="memory"`` (alternating which
goes first), and the child reports its peak RSS (``VmHWM`` = ``ru_maxrss``, which counts the
pages of memory-mapped files it touched) and its peak anonymous RSS (``RssAnon`` sampled every
10 ms: the memory the build cannot give back to the page cache). Then both indexes, at the same
nprobe (the one tuned for the on-disk build), answer ``--queries`` fresh queries: recall@10
against an exact NumPy scan of the store, and queries/s (``index.search`` of all queries at once,
on-disk memory-mapped vs in-memory, alternated A/B, median of paired ratios).

With ``--ray-pairs N``, the on-disk build at the smallest size is also timed with its shards
filled by Ray tasks (``engine="ray"``, Ray started on this machine by the call, its start-up
included) against the local engine: N pairs, alternated, median of paired ratios ray / local.

Usage::

    .venv/bin/python scripts/bench_index_scale.py          # 0.5M, 1M, 2M x 256 (2 GB per copy on disk)
    .venv/bin/python scripts/bench_index_scale.py --sizes 100000 200000 400000 --factory IVF1024,SQ8 \\
        --memory-budget 256MB
    .venv/bin/python scripts/bench_index_scale.py --sizes 500000 --ray-pairs 2 --store /tmp/bench_ray/store
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENCODER = {"name": "bench", "family": "builtin", "cfg": {"dim": 0}, "fingerprint": "c" * 64}


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """One build in this process; prints its time and peak memory as JSON."""
    import embedstore as es

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _kb("RssAnon"))
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    report = es.build_tile_index(
        args.store, factory=args.factory, layout=args.layout, memory_budget=args.memory_budget, rebuild=True,
        device="cpu", engine=args.engine,
    )  # fmt: skip
    wall = time.perf_counter() - t
    done.set()
    s = report.search
    print(json.dumps({"wall_s": wall, "vmhwm_mb": _kb("VmHWM") / 1024, "anon_peak_mb": peak[0] / 1024,
                      "factory": s["factory"], "nprobe": s["nprobe"], "recall_build": s["recall"]}))  # fmt: skip


def mixture(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lab = rng.integers(0, len(centres), n)
    return (centres[lab] + 0.6 * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)).astype(np.float32)


def tiles_of(slide: str, n: int) -> pa.Table:
    from embedstore._schema import Col, tile_id, tile_schema

    side = int(np.ceil(np.sqrt(n)))
    xs, ys = (np.arange(n) % side) * 224 + 112, (np.arange(n) // side) * 224 + 112
    return pa.table(
        {
            Col.SLIDE_ID: [slide] * n, Col.TILE_ID: [tile_id(x, y) for x, y in zip(xs, ys, strict=True)],
            Col.SPOT_ID: pa.nulls(n, pa.string()), Col.X: xs, Col.Y: ys, Col.MPP: np.full(n, 0.5),
            Col.SIZE_PX: pa.array(np.full(n, 224), pa.int32()), Col.PADDED: np.zeros(n, dtype=bool),
        },
        schema=tile_schema(),
    )  # fmt: skip


def grow(store, n: int, tiles: int, centres: np.ndarray) -> None:
    """Add slides of ``tiles`` tiles until the store holds ``n`` (slide i always gets the same vectors)."""
    from embedstore.store._tile_search import list_slides

    have = len(list_slides(store.root, "bench")) * tiles
    for i in range(have // tiles, n // tiles):
        rng = np.random.default_rng(i)
        w = store.slide_writer({**ENCODER, "cfg": {"dim": centres.shape[1]}}, f"c{i % 4}", f"s{i:05d}")
        t = tiles_of(f"s{i:05d}", tiles)
        for a in range(0, tiles, 10_000):
            part = t.slice(a, 10_000)
            w.append(part, mixture(part.num_rows, centres, rng))
        w.commit()


def exact_top10(store, q: np.ndarray) -> np.ndarray:
    """Row numbers (store order) of each query's 10 most similar tiles, by a blocked NumPy scan."""
    from embedstore._vectors import l2_normalize

    best_s = np.full((len(q), 10), -np.inf, np.float32)
    best_i = np.full((len(q), 10), -1, np.int64)
    at = 0
    for _, x in store.iter_embeddings("bench", columns=[]):
        s = l2_normalize(q) @ l2_normalize(x).T
        cand_s = np.concatenate([best_s, s], 1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(at, at + len(x)), s.shape)], 1)
        keep = np.argpartition(-cand_s, 10, 1)[:, :10]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        at += len(x)
    return best_i


def build(args: argparse.Namespace, layout: str, engine: str = "local") -> dict:
    cmd = [sys.executable, __file__, "--child", "--store", str(args.store), "--layout", layout,
           "--factory", args.factory, "--memory-budget", args.memory_budget, "--engine", engine]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tiles", type=int, default=50_000, help="tiles per slide")
    p.add_argument("--factory", default="auto")
    p.add_argument("--memory-budget", default="512MB")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--store", type=Path, default=Path("/tmp/bench_index_scale/store"))
    p.add_argument("--layout", default="ondisk")
    p.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    p.add_argument("--ray-pairs", type=int, default=0, help="time the on-disk build on Ray vs local: pairs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import faiss

    from embedstore.store import open_store
    from embedstore.store._tile_search import index_folder, read_index

    print("command:", shlex.join([".venv/bin/python", "scripts/bench_index_scale.py", *sys.argv[1:]]))
    free = shutil.disk_usage(args.store.parent if args.store.parent.exists() else "/tmp").free
    need = 2 * max(args.sizes) * args.dim * 4
    print(f"disk free {free / 1e9:.1f} GB, store and indexes need about {need / 1e9:.1f} GB")
    if free < need:
        sys.exit("not enough disk space; pass --store on a larger disk or smaller --sizes")
    store = open_store(args.store, read_only=False)
    centres = np.random.default_rng(123).standard_normal((1000, args.dim)).astype(np.float32)
    q = mixture(args.queries, centres, np.random.default_rng(10**6))
    rows, engines = [], None
    for n_at, n in enumerate(sorted(args.sizes)):
        t = time.perf_counter()
        grow(store, n, args.tiles, centres)
        print(f"store at {n} tiles ({time.perf_counter() - t:.0f} s to grow)", flush=True)
        truth = exact_top10(store, q)
        folder = index_folder(store.root, "bench")
        res, loaded = {}, {}
        for layout in ("ondisk", "memory") if n_at % 2 == 0 else ("memory", "ondisk"):
            res[layout] = build(args, layout)
            kept = args.store.parent / f"index-{layout}"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(folder, kept)
            manifest = json.loads((kept / "manifest.json").read_text())
            loaded[layout] = read_index(kept, manifest, mmap=layout == "ondisk")
            print(layout, res[layout], flush=True)
        nprobe = res["ondisk"]["nprobe"]
        recall, times = {}, {"ondisk": [], "memory": []}
        for layout, index in loaded.items():
            faiss.extract_index_ivf(index).nprobe = nprobe
            _, found = index.search(q, 10)  # tile ids are row numbers of the store order here
            recall[layout] = np.mean([len(set(f) & set(t_)) / 10 for f, t_ in zip(found, truth, strict=True)])
        for _ in range(args.reps):
            for layout in ("ondisk", "memory"):
                t = time.perf_counter()
                loaded[layout].search(q, 10)
                times[layout].append(time.perf_counter() - t)
        ratio = statistics.median(m / d for m, d in zip(times["memory"], times["ondisk"], strict=True))
        rows.append((n, res, recall, {k: len(q) / statistics.median(v) for k, v in times.items()}, ratio, nprobe))
        if n_at == 0 and args.ray_pairs:
            engines = (n, time_engines(args))
    print(
        "\n| n | layout | build s | peak RSS (VmHWM) MB | peak anonymous RSS MB | factory | recall@10 (200 q) | q/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, res, recall, qps, _, nprobe in rows:
        for layout in ("ondisk", "memory"):
            r = res[layout]
            print(f"| {n:,} | {layout} | {r['wall_s']:.1f} | {r['vmhwm_mb']:.0f} | {r['anon_peak_mb']:.0f} | "
                  f"{r['factory']}, nprobe {nprobe} | {recall[layout]:.3f} | {qps[layout]:.0f} |")  # fmt: skip
    print("\nq/s on-disk / in-memory (median of paired ratios):", ", ".join(f"{n:,}: {r:.2f}" for n, *_, r, _ in rows))
    for key in ("vmhwm_mb", "anon_peak_mb"):
        first, last = rows[0][1]["ondisk"][key], rows[-1][1]["ondisk"][key]
        print(f"on-disk build {key}: {first:.0f} -> {last:.0f} MB ({last / first:.2f}x) while n grows "
              f"{rows[-1][0] / rows[0][0]:.0f}x")  # fmt: skip
    if engines:
        n, walls = engines
        ratio = statistics.median(r / lo for r, lo in zip(walls["ray"], walls["local"], strict=True))
        print(f"\non-disk build of {n:,} tiles, shards on Ray vs local: local {statistics.median(walls['local']):.1f} s, "
              f"ray {statistics.median(walls['ray']):.1f} s (median), ray / local {ratio:.2f} "
              f"(median of {len(walls['ray'])} paired ratios)")  # fmt: skip


def time_engines(args: argparse.Namespace) -> dict[str, list[float]]:
    """Wall time of the on-disk build with each engine, in alternated pairs (which goes first alternates too)."""
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    for i in range(args.ray_pairs):
        for engine in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
            walls[engine].append(build(args, "ondisk", engine)["wall_s"])
            print(engine, f"{walls[engine][-1]:.1f} s", flush=True)
    return walls


if __name__ == "__main__":
    main()
