"""Benchmark: the embedding pipeline against the bare encoder forward pass, in the same process.

A synthetic 12,000 x 12,000 px pyramidal TIFF at 0.25 µm/px (page pyramid, so 0.5 µm/px
tiles come from level 1 without resizing) is tiled on its tissue grid. Two measurements
alternate (A/B/A/B):

- A, pipeline: ``embedstore.embedding.iterate_batches`` (reader threads or DataLoader
  worker processes, ``--loader``) feeding ``encoder.forward``, steady state (timed from the
  first batch on);
- B, bare: ``encoder.forward`` on the same number of ready, preprocessed tensors.

The result is the median of the paired ratios (pipeline tiles/s / bare tiles/s) and the
time per tile spent outside ``model(x)`` in the pipeline.

``--public`` times what a user runs instead, start-up included: ``es.embed(slide, store,
encoder="timm:vit_small_patch16_224", weights="local-dir:...", progress=False)`` on a fresh store
each time, over a synthetic slide of about 1,000 tiles, against the bare forward over the same
number of tiles in the same batches (model loaded, tensors ready), alternated A/B/A/B. It
reports the median paired ratio (bare seconds / public seconds), ms per tile outside the forward
= (t_public - t_forward) / n, and where the outside time went in the call: before the first
forward (model build, weight load, tissue detection, first batch) and after it (reading,
transforms and store writes not hidden behind the forward, the publish). ``--cold`` adds a third
arm: the same call in a fresh Python process, imports included. With the built-in encoder, where
reading dominates, the pipeline is compared with a bare OpenSlide ``read_region`` loop
(same pyramid level, resize when needed) over the same tiles instead.

ViT-S/16 weights are random (no download here) but go through the real loading path: the
state dict is saved as safetensors and loaded with ``weights="local-dir:..."``.

Usage::

    .venv/bin/python scripts/bench_embed.py                 # ViT-S/16, batch 32, 10 pairs
    .venv/bin/python scripts/bench_embed.py --encoder builtin
    .venv/bin/python scripts/bench_embed.py --quick
    .venv/bin/python scripts/bench_embed.py --public --pairs 3 [--cold] [--workdir /tmp/bench-embed]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VIT_S = "timm:vit_small_patch16_224"


def _vit_small(folder: Path):
    """Random ViT-S/16 saved as safetensors (once per folder), loaded through the timm family's local-dir path."""
    from embedstore.encoders import create_encoder

    if not (folder / "model.safetensors").is_file():
        import timm
        from safetensors.torch import save_file

        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return create_encoder(VIT_S, weights=f"local-dir:{folder}")


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


class _ForwardClock:
    """Times ``Encoder.forward`` inside a public call: when the first forward began, and the seconds in all."""

    def __init__(self) -> None:
        from embedstore.encoders import Encoder

        self.first: float | None = None
        self.seconds = 0.0
        inner = Encoder.forward

        def timed(enc, batch):
            t0 = time.perf_counter()
            if self.first is None:
                self.first = t0
            try:
                return inner(enc, batch)
            finally:
                self.seconds += time.perf_counter() - t0

        Encoder.forward = timed

    def reset(self) -> None:
        self.first, self.seconds = None, 0.0


def _public_call(slide: Path, store: Path, weights: Path, args, clock: _ForwardClock) -> tuple[float, ...]:
    """One ``es.embed`` on a fresh store: seconds, before the first forward, inside forward, and CPU seconds."""
    import embedstore as es

    shutil.rmtree(store, ignore_errors=True)
    clock.reset()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    report = es.embed(
        slide, store, encoder=VIT_S, weights=f"local-dir:{weights}", device="cpu", batch_size=args.batch_size,
        workers=args.workers, loader=args.loader, progress=False,
    )  # fmt: skip
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if not report.ok:
        raise SystemExit(report.summary())
    shutil.rmtree(store, ignore_errors=True)
    return seconds, clock.first - t0, clock.seconds, cpu


_COLD = """
import sys, time
t0 = time.perf_counter()
import embedstore as es
es.embed(sys.argv[1], sys.argv[2], encoder=sys.argv[3], weights=sys.argv[4], device="cpu", batch_size=int(sys.argv[5]),
         workers=int(sys.argv[6]), loader=sys.argv[7], progress=False)
print(time.perf_counter() - t0)
"""


def _cold_call(slide: Path, store: Path, weights: Path, args) -> float:
    """The same call in a fresh interpreter, ``import embedstore`` and the imports inside the call included."""
    shutil.rmtree(store, ignore_errors=True)
    argv = [str(slide), str(store), VIT_S, f"local-dir:{weights}", str(args.batch_size), str(args.workers), args.loader]
    out = subprocess.run([sys.executable, "-c", _COLD, *argv], check=True, capture_output=True, text=True)
    shutil.rmtree(store, ignore_errors=True)
    return float(out.stdout.split()[-1])


def _bare_forward_tiles(ready, enc, n: int, batch_size: int) -> tuple[float, float]:
    """The bare forward over ``n`` tiles in the batches the public call makes (the last one short): seconds, CPU seconds."""
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, n, batch_size)):
        enc.forward(ready[b % len(ready)][: min(batch_size, n - start)])
    return time.perf_counter() - t0, time.process_time() - cpu0


def _public(args) -> None:
    import torch

    from embedstore.slides import open_slide
    from embedstore.testing import write_synthetic_slide
    from embedstore.tiling import TileReader, grid_tiles

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        slide = work / f"slide-{args.width}x{args.height}.tif"
        if not slide.is_file():
            write_synthetic_slide(slide, args.width, args.height, mpp=0.25, seed=1)
        with open_slide(slide) as s:
            tiles = grid_tiles(s, target_mpp=0.5, size_px=224)
        n = tiles.num_rows
        enc = _vit_small(work / "vit").to("cpu")
        reader = TileReader(slide, tiles)
        transform = enc.transform()
        bs = args.batch_size
        ready = [transform(np.stack([reader[i % n] for i in range(b * bs, (b + 1) * bs)])) for b in range(2)]
        enc.forward(ready[0])  # warm: the bare side starts with a model that has run
        clock = _ForwardClock()
        store = Path(tmp) / "store"
        _public_call(slide, store, work / "vit", args, clock)  # imports inside the call happen once per process
        rows, cpu_ratios = [], []
        for pair in range(args.pairs):
            public, startup, in_forward, public_cpu = _public_call(slide, store, work / "vit", args, clock)
            bare, bare_cpu = _bare_forward_tiles(ready, enc, n, bs)
            cold = _cold_call(slide, store, work / "vit", args) if args.cold else float("nan")
            rows.append((public, bare, startup, in_forward, cold))
            cpu_ratios.append(bare_cpu / public_cpu)
            print(
                f"pair {pair}: public {public:.1f} s (first forward at {startup:.2f} s, {in_forward:.1f} s in forward), "
                f"bare forward {bare:.1f} s, ratio {bare / public:.3f}, outside {(public - bare) / n * 1000:.2f} ms/tile; "
                f"CPU s public {public_cpu:.1f}, bare {bare_cpu:.1f}, ratio {bare_cpu / public_cpu:.3f}"
                + (f"; fresh process {cold:.1f} s (ratio {bare / cold:.3f})" if args.cold else "")
            )
        med = statistics.median
        ratios = [b / p for p, b, *_ in rows]
        print()
        print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} tiles")
        print(
            "| encoder | tiles | batch | workers | pairs | public s | bare forward s | median paired ratio bare/public | "
            "ms/tile outside forward | s before first forward | ms/tile outside forward after it |"
            + (" fresh process: ratio |" if args.cold else "")
        )
        print("| --- " * (12 if args.cold else 11) + "|")
        cold = f" {med(b / c for _p, b, _s, _f, c in rows):.3f} |" if args.cold else ""
        print(
            f"| ViT-S/16 | {n} | {bs} | {args.workers} | {args.pairs} | {med(p for p, *_ in rows):.1f} | "
            f"{med(b for _p, b, *_ in rows):.1f} | **{med(ratios):.3f}** (min {min(ratios):.3f}, max {max(ratios):.3f}) | "
            f"{med((p - b) / n * 1000 for p, b, *_ in rows):.2f} | {med(s for _p, _b, s, *_ in rows):.2f} | "
            f"{med((p - s - f) / n * 1000 for p, _b, s, f, _c in rows):.2f} |{cold}"
        )
        print(f"median paired CPU-time ratio bare/public (robust to other load on the cores): {med(cpu_ratios):.3f}")


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
    parser.add_argument("--public", action="store_true", help="time es.embed on a whole slide (ViT-S/16) instead")
    parser.add_argument("--cold", action="store_true", help="--public: also the call in a fresh process")
    parser.add_argument("--width", type=int, default=17000, help="--public: slide width (17000 x 20000: 999 tiles)")
    parser.add_argument("--height", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workdir", help="--public: keep the slide and weights here between runs")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.batches = 2, 2
    if args.public:
        _public(args)
        return

    import torch

    from embedstore.encoders import create_encoder
    from embedstore.slides import open_slide
    from embedstore.testing import write_synthetic_slide
    from embedstore.tiling import TileReader, grid_tiles

    torch.set_num_threads(args.threads)
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
