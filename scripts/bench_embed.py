"""Benchmark: the embedding pipeline against the bare encoder forward pass, in the same process.

A synthetic 12,000 x 12,000 px pyramidal TIFF at 0.25 µm/px (page pyramid, so 0.5 µm/px
tiles come from level 1 without resizing) is tiled on its tissue grid. Two measurements
alternate (A/B/A/B):

- A, pipeline: ``embedstore.embedding.iterate_batches`` (reader threads or DataLoader
  worker processes, ``--loader``) feeding ``encoder.forward``, steady state (timed from the
  first batch on);
- B, bare: ``encoder.forward`` on the same number of ready, preprocessed tensors.

The result is the median of the paired ratios (pipeline tiles/s / bare tiles/s) and the
time per tile spent outside ``model(x)`` in the pipeline. With the built-in encoder, where
reading dominates, the pipeline is compared with a bare OpenSlide ``read_region`` loop
(same pyramid level, resize when needed) over the same tiles instead.

ViT-S/16 weights are random (no download here) but go through the real loading path: the
state dict is saved as safetensors and loaded with ``weights="local-dir:..."``.

Usage::

    .venv/bin/python scripts/bench_embed.py                 # ViT-S/16, batch 32, 10 pairs
    .venv/bin/python scripts/bench_embed.py --encoder builtin
    .venv/bin/python scripts/bench_embed.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _vit_small(folder: Path):
    """Random ViT-S/16 saved as safetensors, loaded through the timm family's local-dir path."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    from embedstore.encoders import create_encoder

    return create_encoder("timm:vit_small_patch16_224", weights=f"local-dir:{folder}")


def _pipeline(reader, rows, enc, batch_size, workers, loader):
    """Steady-state pipeline time for ``rows``: returns (seconds, tiles, seconds inside forward)."""
    from embedstore.embedding import iterate_batches

    batches = iterate_batches(reader, rows, enc.transform(), batch_size, workers, loader)
    _first_rows, first = next(batches)
    enc.forward(first)  # warm start: worker start-up is a per-slide cost, not a per-tile one
    t0 = time.perf_counter()
    n, in_forward = 0, 0.0
    for batch_rows, batch in batches:
        f0 = time.perf_counter()
        enc.forward(batch)
        in_forward += time.perf_counter() - f0
        n += len(batch_rows)
    return time.perf_counter() - t0, n, in_forward


def _bare_forward(ready, enc, n_batches):
    t0 = time.perf_counter()
    for i in range(n_batches):
        enc.forward(ready[i % len(ready)])
    return time.perf_counter() - t0


def _bare_read(path: Path, tiles, n: int, size_px: int) -> float:
    """What a user writes by hand: openslide read_region at the level just finer than the target + PIL resize."""
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(str(path))
    downsample = tiles.column("mpp")[0].as_py() / float(osr.properties["openslide.mpp-x"])
    level = osr.get_best_level_for_downsample(downsample + 1e-6)
    side = round(size_px * downsample / osr.level_downsamples[level])
    half0 = size_px * downsample / 2
    xs, ys = tiles.column("x").to_numpy()[:n], tiles.column("y").to_numpy()[:n]
    t0 = time.perf_counter()
    for x, y in zip(xs, ys, strict=True):
        im = osr.read_region((int(x - half0), int(y - half0)), level, (side, side)).convert("RGB")
        if side != size_px:
            im = im.resize((size_px, size_px), Image.Resampling.BILINEAR)
        np.asarray(im)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vit-s16", help="vit-s16 (random ViT-S/16) or a registered name")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader", default="auto", help="auto, threads or processes (see embedding.iterate_batches)")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--batches", type=int, default=6, help="batches per pipeline run (after the warm one)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 pairs, 2 batches")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.batches = 2, 2

    import torch

    from embedstore.encoders import create_encoder
    from embedstore.slides import open_slide
    from embedstore.testing import write_synthetic_slide
    from embedstore.tiling import TileReader, grid_tiles

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_synthetic_slide(tmp / "slide.tif", 12000, 12000, mpp=0.25, seed=1)
        with open_slide(path) as slide:
            tiles = grid_tiles(slide, target_mpp=0.5, size_px=224)
        enc = _vit_small(tmp / "vit") if args.encoder == "vit-s16" else create_encoder(args.encoder)
        enc = enc.to("cpu")
        reader = TileReader(path, tiles)
        per_run = args.batch_size * (args.batches + 1)
        if tiles.num_rows < per_run:
            msg = f"only {tiles.num_rows} tiles; need {per_run}"
            raise SystemExit(msg)
        transform = enc.transform()
        ready = [
            transform(np.stack([reader[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)]))
            for b in range(2)
        ]

        ratios, outside, pipe_tps, base_tps = [], [], [], []
        rng = np.random.default_rng(0)
        for pair in range(args.pairs):
            start = int(rng.integers(0, tiles.num_rows - per_run))
            rows = np.arange(start, start + per_run)
            seconds, n, in_forward = _pipeline(reader, rows, enc, args.batch_size, args.workers, args.loader)
            if args.encoder == "builtin":
                # Reading dominates: the baseline is a bare read_region + resize loop (no features).
                base = n / _bare_read(path, tiles.slice(start), n, 224)
            else:
                base = n / _bare_forward(ready, enc, args.batches)
            pipe = n / seconds
            ratios.append(pipe / base)
            outside.append((seconds - in_forward) / n * 1000)
            pipe_tps.append(pipe)
            base_tps.append(base)
            print(f"pair {pair}: pipeline {pipe:.1f} tiles/s, baseline {base:.1f} tiles/s, ratio {pipe / base:.3f}")

        base_name = "bare read_region+resize loop" if args.encoder == "builtin" else "bare forward on ready tensors"
        print()
        print(
            f"| encoder | loader | batch | workers | pairs | pipeline tiles/s | {base_name} tiles/s | median paired ratio | ms/tile outside forward |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| {enc.name} | {args.loader} | {args.batch_size} | {args.workers} | {args.pairs} | {statistics.median(pipe_tps):.1f} | "
            f"{statistics.median(base_tps):.1f} | **{statistics.median(ratios):.3f}** "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}) | {statistics.median(outside):.2f} |"
        )


if __name__ == "__main__":
    main()
