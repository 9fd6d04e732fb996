"""Benchmark: ``embedstore evaluate`` (embeddings already stored) against another version of the code.

Both sides run the public command in a fresh process, ``embedstore --quiet evaluate``
(cross-validation of DATA), each with its own store embedded once beforehand, so the timed
runs measure choosing genes, training, indexing, predicting, scoring and the report. Side
A is this checkout; side B is another source tree (``git archive <rev> | tar -x -C OLD``) run
with ``PYTHONPATH=OLD`` and the same interpreter. They alternate A/B/A/B and the median of
the paired ratios B/A is reported (> 1: this checkout is faster).

Usage::

    git archive HEAD | tar -x -C /tmp/old-eval
    .venv/bin/python scripts/bench_evaluate.py --old /tmp/old-eval               # synthetic demo cohort
    .venv/bin/python scripts/bench_evaluate.py --old /tmp/old-eval --data ../shared/data/her2st --k 50 --n-genes 250
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _evaluate(source: Path, data: Path, out: Path, k: int, n_genes: int) -> float:
    """Seconds of one ``embedstore --quiet evaluate`` run of the code in ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    cmd = [sys.executable, "-m", "embedstore", "--quiet", "evaluate", "--reference", str(data), "--out", str(out)]
    cmd += ["--k", str(k), "--n-genes", str(n_genes)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent, check=False)
    if done.returncode:
        sys.exit(f"{source}: evaluate failed:\n{done.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="Source tree of side B.")
    parser.add_argument("--data", type=Path, help="ST data set; the demo's synthetic cohort by default.")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--n-genes", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    sides = {"A (this checkout)": REPO, "B (--old)": args.old.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data.resolve() if args.data else None
        if data is None:
            from embedstore.testing import make_synthetic_cohort

            data = make_synthetic_cohort(
                Path(tmp) / "cohort", n_slides=6, n_patients=3, n_spots=80, n_genes=60, seed=0, width=3000, height=3000
            ).root
        outs = {name: Path(tmp) / f"out-{i}" for i, name in enumerate(sides)}
        for name, source in sides.items():  # embeds into OUT/store, reused by the timed runs
            print(f"warm-up {name}: {_evaluate(source, data, outs[name], args.k, args.n_genes):.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.pairs):
            for name, source in sides.items():
                times[name].append(_evaluate(source, data, outs[name], args.k, args.n_genes))
            print(f"pair {i + 1}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()), flush=True)
    a, b = times.values()
    ratios = [tb / ta for ta, tb in zip(a, b, strict=True)]
    print(f"data {data}, k {args.k}, n_genes {args.n_genes}, {args.pairs} pairs")
    print(f"median A {statistics.median(a):.1f} s, median B {statistics.median(b):.1f} s")
    print(f"median paired ratio B/A {statistics.median(ratios):.2f} (pairs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
