"""Benchmark: building the her2st index with this tree against a baseline tree of embedstore.

Two measurements, each a fresh process run with the same interpreter, so start-up (imports)
is included, as a user sees it:

- ``build``: ``python -m embedstore index build RECIPE --store STORE --out TMP`` with the
  her2st-builtin recipe, its listed ``genes`` removed so that both trees build the same
  250-gene panel;
- ``read``: ``load_reference(STORE, "builtin", cohort="her2st")`` alone, the part of the
  build that reads the store.

A is this tree, B the baseline (``PYTHONPATH`` points at it); runs alternate A/B/A/B. The
result is the median of the paired ratios B / A (above 1: this tree is faster).

Usage::

    mkdir -p /tmp/old-embedstore && git archive b714d11^ | tar -x -C /tmp/old-embedstore
    .venv/bin/embedstore embed ../shared/data/her2st --store /tmp/e-store --cohort her2st
    .venv/bin/python scripts/bench_build.py --store /tmp/e-store --baseline /tmp/old-embedstore
    # the reading alone against another commit:
    mkdir -p /tmp/head && git archive e8dd5e4 | tar -x -C /tmp/head
    .venv/bin/python scripts/bench_build.py --store /tmp/e-store --baseline /tmp/head --only read
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The baseline names the build-stage module embedstore.reference, this tree embedstore.build; the
# file is looked for in the tree itself, since the editable install supplies modules a tree lacks.
READ = """
import importlib, pathlib, embedstore
name = "build" if (pathlib.Path(embedstore.__file__).parent / "build.py").is_file() else "reference"
importlib.import_module("embedstore." + name).load_reference({store!r}, "builtin", cohort="her2st")
"""


def _recipe(folder: Path) -> Path:
    """The her2st-builtin recipe without its listed genes, as a file both trees can read."""
    text = (REPO / "indexes" / "her2st-builtin.toml").read_text()
    path = folder / "her2st-bench.toml"
    path.write_text(re.sub(r"^genes = \[.*?^\]\n", "", text, flags=re.DOTALL | re.MULTILINE))
    if "genes" in tomllib.loads(path.read_text())["panel"]:
        sys.exit(f"{path}: could not remove [panel] genes from the her2st-builtin recipe")
    return path


def _timed(cmd: list[str], tree: Path, cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True, help="Store holding the embedded her2st cohort.")
    ap.add_argument("--baseline", type=Path, required=True, help="Source tree of the baseline (git archive).")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--only", choices=("build", "read"), help="Run one of the two measurements.")
    args = ap.parse_args()
    store = args.store.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = _recipe(work)
        build = [sys.executable, "-m", "embedstore", "index", "build", str(recipe), "--store", str(store)]
        commands = {
            "build": [*build, "--out", str(work / "index")],
            "read": [sys.executable, "-c", READ.format(store=str(store))],
        }
        for what, cmd in commands.items():
            if args.only and what != args.only:
                continue
            ratios = []
            for pair in range(args.pairs):
                a = _timed(cmd, REPO, work)
                b = _timed(cmd, args.baseline.resolve(), work)
                ratios.append(b / a)
                print(f"{what} pair {pair + 1}: this tree {a:.1f} s, baseline {b:.1f} s, ratio {b / a:.2f}", flush=True)
            print(
                f"{what}: median of {args.pairs} paired ratios (baseline / this tree) = {statistics.median(ratios):.2f}"
            )


if __name__ == "__main__":
    main()
