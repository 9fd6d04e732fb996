"""Benchmark: spot-centred tile reading (TileReader + iter_tile_batches) against a bare OpenSlide loop.

Writes a synthetic pyramidal TIFF (default 20,000 x 20,000 px at 0.263 µm/px, an Aperio GT450-like
40x scan, so 0.5 µm/px tiles are read from level 0 and resized, as on real slides) to a temporary
folder once, puts spots on a 100 µm (Visium-like) grid over the tissue, and measures tiles/s:

- A: a bare loop of ``openslide.read_region`` + ``PIL.Image.resize`` over the same regions;
- B: embedstore's reader with one worker thread (``iter_tile_batches(workers=1)``).

A and B alternate (A/B/A/B ...); the result is the median of the paired ratios B/A (goal >= 0.9).
Scaling is the median paired ratio of 2 workers over 1 worker, alternated the same way.

Usage::

    .venv/bin/python scripts/bench_tiling.py            # full run
    .venv/bin/python scripts/bench_tiling.py --quick    # smoke run (small slide, few tiles)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _spot_grid(slide, pitch_um: float, limit: int, seed: int) -> np.ndarray:
    from embedstore.slides import tissue_mask

    mask, ds = tissue_mask(slide)
    pitch = pitch_um / slide.mpp
    w, h = slide.dimensions
    xs = np.arange(pitch / 2, w, pitch)
    ys = np.arange(pitch / 2, h, pitch)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    on = mask[
        (pts[:, 1] / ds).astype(int).clip(0, mask.shape[0] - 1), (pts[:, 0] / ds).astype(int).clip(0, mask.shape[1] - 1)
    ]
    pts = pts[on]
    if len(pts) > limit:
        pts = pts[np.sort(np.random.default_rng(seed).choice(len(pts), limit, replace=False))]
    return pts


def _bare_loop(path: Path, regions: list[tuple[int, int, int, int]], size_px: int) -> float:
    """Baseline: what a user would write by hand with OpenSlide and PIL. Returns tiles/s."""
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(str(path))
    t0 = time.perf_counter()
    for x0, y0, level, side in regions:
        im = osr.read_region((x0, y0), level, (side, side)).convert("RGB")
        if side != size_px:
            im = im.resize((size_px, size_px), Image.Resampling.BILINEAR)
        np.asarray(im)
    dt = time.perf_counter() - t0
    osr.close()
    return len(regions) / dt


def _embedstore(path: Path, table, workers: int, batch_size: int) -> float:
    from embedstore.tiling import TileReader, iter_tile_batches

    reader = TileReader(path, table)
    reader.slide  # noqa: B018 - open outside the timed part, as the bare loop does
    n = 0
    t0 = time.perf_counter()
    for rows, _tiles in iter_tile_batches(reader, batch_size=batch_size, workers=workers):
        n += rows.size
    dt = time.perf_counter() - t0
    reader.close()
    return n / dt


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4,000 px slide, 100 tiles, 2 pairs")
    ap.add_argument("--size", type=int, default=20_000, help="slide side in px")
    ap.add_argument("--slide-mpp", type=float, default=0.263, help="level-0 µm/px of the synthetic slide")
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--size-px", type=int, default=224)
    ap.add_argument("--tiles", type=int, default=600, help="tiles per timed pass")
    ap.add_argument("--pairs", type=int, default=5, help="A/B pairs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="reuse/keep the slide here (default: a temporary folder)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.tiles, args.pairs = 4000, 100, 2

    from embedstore.slides import open_slide
    from embedstore.testing import write_synthetic_slide
    from embedstore.tile_table import tile_geometry
    from embedstore.tiling import spot_tiles

    with tempfile.TemporaryDirectory(prefix="bench-tiling-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"synthetic_{args.size}_{args.slide_mpp}.tif"
        t0 = time.perf_counter()
        if not path.exists():
            write_synthetic_slide(path, args.size, args.size, mpp=args.slide_mpp, seed=0)
        gen_s = time.perf_counter() - t0

        with open_slide(path) as slide:
            centres = _spot_grid(slide, 100.0, args.tiles, seed=0)
            table = spot_tiles(slide, centres, [f"s{i}" for i in range(len(centres))], args.target_mpp, args.size_px)
            level = slide.best_level_for_mpp(args.target_mpp)
            side0 = tile_geometry(slide.mpp, args.target_mpp, args.size_px)
            side = round(side0 / slide.level_downsamples[level])
            regions = [
                (int(np.floor(x - side0 / 2 + 0.5)), int(np.floor(y - side0 / 2 + 0.5)), level, side)
                for x, y in zip(table["x"].to_pylist(), table["y"].to_pylist(), strict=True)
            ]
            dims, levels = slide.dimensions, slide.level_count

        # warm-up (page cache, imports), not timed
        _bare_loop(path, regions[:50], args.size_px)
        _embedstore(path, table.slice(0, 50), 1, args.batch_size)

        ratios, base_rates, ours_rates = [], [], []
        for _ in range(args.pairs):
            a = _bare_loop(path, regions, args.size_px)
            b = _embedstore(path, table, 1, args.batch_size)
            base_rates.append(a)
            ours_rates.append(b)
            ratios.append(b / a)
        scale, two_rates = [], []
        for _ in range(args.pairs):
            one = _embedstore(path, table, 1, args.batch_size)
            two = _embedstore(path, table, 2, args.batch_size)
            two_rates.append(two)
            scale.append(two / one)

    load = os.getloadavg()
    cmd = "scripts/bench_tiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "### Tile reading (scripts/bench_tiling.py)",
        "",
        f"Command: `.venv/bin/python {cmd.strip()}`",
        "",
        f"Synthetic pyramidal TIFF {dims[0]:,} x {dims[1]:,} px at {args.slide_mpp} µm/px ({levels} levels, zlib tiles; "
        f"generated in {gen_s:.1f} s). {len(regions)} spot-centred {args.size_px} px tiles at {args.target_mpp} µm/px "
        f"(read {side} px from level {level}, resized with PIL BILINEAR), batch {args.batch_size}, {args.pairs} alternated pairs.",
        "",
        "| measure | median | pairs |",
        "| --- | --- | --- |",
        f"| bare loop (openslide read_region + PIL resize), tiles/s | {statistics.median(base_rates):.0f} | {', '.join(f'{r:.0f}' for r in base_rates)} |",
        f"| embedstore, 1 worker, tiles/s | {statistics.median(ours_rates):.0f} | {', '.join(f'{r:.0f}' for r in ours_rates)} |",
        f"| **ratio embedstore 1 worker / bare loop** (goal >= 0.9) | **{statistics.median(ratios):.2f}** | {', '.join(f'{r:.2f}' for r in ratios)} |",
        f"| embedstore, 2 workers, tiles/s | {statistics.median(two_rates):.0f} | {', '.join(f'{r:.0f}' for r in two_rates)} |",
        f"| **scaling 2 workers / 1 worker** | **{statistics.median(scale):.2f}** | {', '.join(f'{r:.2f}' for r in scale)} |",
        "",
        f"Machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end of the run. "
        "Other jobs shared the cores, so absolute rates are noisy; the paired ratios are the numbers to read.",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
