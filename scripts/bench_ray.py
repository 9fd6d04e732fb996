"""Ray engine vs local engine: the public ``embed()`` call on the same slides with the same workers.

A = ``es.embed(slides, store)`` (local engine: this process, torch on T threads, reader threads),
B = ``es.embed(slides, store, engine="ray", address=...)`` on a one-node Ray cluster started
once before the pairs, sized so the one encoder actor gets the same T torch threads and one
CPU reads tiles. Each call starts on a fresh store and includes its start-up (model load; on
Ray also the actor start and the per-node checks). Pairs alternate A/B; the result is the
median of the paired ratios B/A. Prints a markdown section for BENCHMARKS.md.

    python scripts/bench_ray.py                       # ViT-S/16 (random weights), 3 slides, 3 pairs
    python scripts/bench_ray.py --encoder builtin --pairs 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_embed import VIT_S, _vit_small  # noqa: E402  (the same random ViT-S weights as the embed benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vit-s", choices=["vit-s", "builtin"])
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--size", type=int, default=2400, help="slide side in level-0 px at 0.25 µm/px")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local process and the actor")
    args = parser.parse_args()

    import torch
    from ray.cluster_utils import Cluster

    import embedstore as es
    from embedstore.testing import write_synthetic_slide

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    cluster = None
    try:
        data = work / "slides"
        data.mkdir()
        for i in range(args.slides):
            write_synthetic_slide(data / f"s{i}.tiff", args.size, args.size, mpp=0.25, seed=i)
        kwargs: dict = {"progress": False, "device": "cpu"}
        if args.encoder == "vit-s":
            _vit_small(work / "vit")
            kwargs |= {"encoder": VIT_S, "weights": f"local-dir:{work / 'vit'}"}
        torch.set_num_threads(args.threads)
        # One node: the actor holds `threads` CPUs (all but one), the last CPU reads tiles. The
        # cluster stays up across the pairs; each embed() connects to it as a user's run would.
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": args.threads + 1, "include_dashboard": False}
        )
        address = cluster.address
        times: dict[str, list[float]] = {"local": [], "ray": []}
        n_tiles = 0
        for pair in range(args.pairs):
            for engine in ("local", "ray"):
                store = work / f"store-{engine}-{pair}"
                extra = {"engine": "ray", "address": address} if engine == "ray" else {}
                t = time.perf_counter()
                report = es.embed(data, store, **kwargs, **extra)
                times[engine].append(time.perf_counter() - t)
                assert report.ok, report.summary()
                n_tiles = sum(r.n_tiles for r in report.results)
                shutil.rmtree(store)
            print(f"pair {pair}: local {times['local'][-1]:.1f} s, ray {times['ray'][-1]:.1f} s", file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    ratios = [b / a for a, b in zip(times["local"], times["ray"], strict=True)]
    name = "ViT-S/16 (random weights, fp32)" if args.encoder == "vit-s" else "builtin"
    print(f"\n`python scripts/bench_ray.py {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    print(
        f"{args.slides} slides, {n_tiles} tiles, {name}, {args.threads} torch threads, {args.pairs} alternated pairs\n"
    )
    print("| engine | median s | tiles/s |")
    print("| --- | --- | --- |")
    for engine in ("local", "ray"):
        m = statistics.median(times[engine])
        print(f"| {engine} | {m:.1f} | {n_tiles / m:.1f} |")
    print(f"\nmedian paired ratio ray / local: **{statistics.median(ratios):.3f}** "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; goal ≤ 1.10)")  # fmt: skip


if __name__ == "__main__":
    main()
