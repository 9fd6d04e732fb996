"""The embedding stage end to end: rows per spot, resume after SIGKILL, concurrent runs, failures."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedstore.embedding import embed
from embedstore.store import open_store
from embedstore.testing import write_synthetic_slide

CLI = [sys.executable, "-m", "embedstore"]


def _table(store: Path, encoder: str = "builtin"):
    meta, emb = open_store(store).read_embeddings(encoder)
    order = np.lexsort(
        [np.asarray(meta.column("tile_id").to_pylist()), np.asarray(meta.column("slide_id").to_pylist())]
    )
    return meta.take(order), emb[order]


def test_st_cohort_one_row_per_spot_and_rerun_is_noop(synthetic_cohort, tmp_path):
    store = tmp_path / "store"
    report = embed(synthetic_cohort.root, store, workers=0, progress=False)
    assert report.ok
    assert [r.status for r in report.results] == ["done"] * 3
    s = open_store(store)
    per_slide = s.sql("SELECT slide_id, count(*) AS n, count(DISTINCT spot_id) AS spots FROM embeddings GROUP BY 1")
    expected = {sec.section: len(sec.spot_ids) for sec in synthetic_cohort.sections}
    assert dict(zip(per_slide.slide_id, per_slide.n, strict=True)) == expected
    assert (per_slide.n == per_slide.spots).all()
    joined = s.sql("SELECT count(*) AS n FROM embeddings e JOIN spots p USING (cohort, slide_id, spot_id)").n.iloc[0]
    assert joined == sum(expected.values())

    before = _table(store)
    again = embed(synthetic_cohort.root, store, workers=0, progress=False)
    assert [r.status for r in again.results] == ["skipped"] * 3
    after = _table(store)
    assert before[0].equals(after[0])
    assert np.array_equal(before[1], after[1])


def _embed_cmd(data: Path, store: Path, *extra: str) -> list[str]:
    return [*CLI, "embed", str(data), "--store", str(store), "--workers", "0", *extra]


def _staged_rows(staging: Path) -> int:
    """Tiles staged so far under ``staging`` (every slide's journal or parts)."""
    from embedstore.store._writer import read_staged, staged_files

    rows = 0
    for folder in staging.glob("encoder=*/cohort=*/slide_id=*"):
        for part in staged_files(folder):
            with contextlib.suppress(Exception):  # a batch being written right now
                rows += read_staged(part, "").num_rows
    return rows


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(2):
        write_synthetic_slide(slides / f"s{i}.tif", 1800, 1400, mpp=0.5, seed=i)
    reference = tmp_path / "reference"
    assert embed(slides, reference, workers=0, batch_size=4, progress=False).ok

    store = tmp_path / "killed"
    proc = subprocess.Popen(_embed_cmd(slides, store, "--batch-size", "4"), stderr=subprocess.DEVNULL)
    staging = store / "_staging"
    wanted = random.Random(os.getpid()).randint(1, 6)  # a random moment, in staged batches
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if staging.exists() and _staged_rows(staging) >= 4 * wanted:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Readers never see a partial slide: every published file is a complete slide.
    for f in (store / "embeddings").rglob("*.parquet") if (store / "embeddings").exists() else []:
        slide = f.parent.name.split("=", 1)[1]
        ref_rows = pq.read_metadata(next((reference / "embeddings").rglob(f"slide_id={slide}/*.parquet"))).num_rows
        assert pq.read_metadata(f).num_rows == ref_rows

    rerun = subprocess.run(_embed_cmd(slides, store, "--batch-size", "4"), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    got, want = _table(store), _table(reference)
    assert got[0].drop_columns([]).equals(want[0])
    assert np.array_equal(got[1], want[1])
    assert not any(p.is_file() for p in staging.rglob("part-*"))


def test_two_concurrent_runs_do_not_duplicate(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        write_synthetic_slide(slides / f"c{i}.tif", 1200, 1000, mpp=0.5, seed=10 + i)
    store = tmp_path / "store"
    procs = [subprocess.Popen(_embed_cmd(slides, store), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    counts = open_store(store).sql(
        "SELECT slide_id, count(*) AS n, count(DISTINCT tile_id) AS d FROM embeddings GROUP BY 1"
    )
    assert len(counts) == 3
    assert (counts.n == counts.d).all()
    # Each slide was embedded by exactly one of the two runs.
    done = sum(out.count(" done ") for out in outs)
    assert done == 3


def test_corrupt_slide_is_named_others_embedded_and_exit_nonzero(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "good.tif", 1200, 1000, mpp=0.5, seed=3)
    shutil.copy(slides / "good.tif", slides / "broken.tif")
    with (slides / "broken.tif").open("r+b") as f:  # keep the header, destroy the tile data
        f.truncate(600)
    store = tmp_path / "store"
    result = subprocess.run(_embed_cmd(slides, store), capture_output=True, text=True, check=False)
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if x.startswith("broken"))
    assert "failed" in line
    assert "broken.tif" in line
    assert "good" in open_store(store).sql("SELECT DISTINCT slide_id FROM embeddings").slide_id.tolist()


def test_gated_encoder_without_weights_is_one_line(tmp_path, synthetic_slide_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
    result = subprocess.run(
        _embed_cmd(synthetic_slide_path, tmp_path / "store", "--encoder", "uni"),
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "MahmoodLab/UNI" in lines[0]
    assert "HF_TOKEN" in lines[0]
    assert "local-dir:" in lines[0]
    assert not (tmp_path / "store" / "embeddings").exists()


def test_unwritable_store_fails_before_compute(tmp_path, synthetic_slide_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        _embed_cmd(synthetic_slide_path, blocker / "store"), capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "not writable" in result.stderr


@pytest.mark.parametrize(("workers", "loader"), [(0, "threads"), (2, "threads"), (2, "processes")])
def test_readers_do_not_change_the_table(tmp_path, synthetic_slide_path, workers, loader):
    store = tmp_path / f"w{workers}"
    assert embed(synthetic_slide_path, store, workers=workers, loader=loader, batch_size=8, progress=False).ok
    meta, emb = _table(store)
    ref_store = tmp_path / "ref"
    if not ref_store.exists():
        embed(synthetic_slide_path, ref_store, workers=0, batch_size=64, progress=False)
    ref_meta, ref_emb = _table(ref_store)
    assert meta.column("tile_id").equals(ref_meta.column("tile_id"))
    np.testing.assert_array_equal(emb, ref_emb)


def test_st_section_without_image_is_reported_failed(synthetic_cohort, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(synthetic_cohort.root, root)
    missing = synthetic_cohort.sections[1]
    for image in (root / "data" / "ST-imgs").rglob(f"*{missing.section}*.tif"):
        image.unlink()
    report = embed(root, tmp_path / "store", workers=0, progress=False)
    status = {r.slide_id: (r.status, r.reason) for r in report.results}
    assert not report.ok
    assert status[missing.section][0] == "failed"
    assert "has no image" in status[missing.section][1]
    assert sum(s == "done" for s, _ in status.values()) == len(synthetic_cohort.sections) - 1
