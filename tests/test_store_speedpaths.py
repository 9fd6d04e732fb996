"""The store's write path: staging journals, what a kill or a reboot loses, and the published bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_store import META, embed, make_tiles

import embedstore.store._files as files
from embedstore._schema import Col
from embedstore.store import open_store
from embedstore.store._files import Journal, read_journal, row_group_rows, write_options, write_parquet_atomic
from embedstore.store._writer import read_staged, staged_files

SLIDE = "embeddings/encoder=toy/cohort=c1/slide_id=S1/tiles.parquet"
STAGING = "_staging/encoder=toy/cohort=c1/slide_id=S1"


def in_order(tiles: pa.Table) -> pa.Table:
    """The tiles in the published order (y, x, tile id), as a tiler emits them."""
    keys = np.lexsort((np.asarray(tiles.column(Col.TILE_ID).to_pylist()), tiles.column(Col.X), tiles.column(Col.Y)))
    return tiles.take(pa.array(keys))


def publish(root: Path, tiles: pa.Table, batch: int) -> bytes:
    store = open_store(root, read_only=False)
    w = store.slide_writer(META, "c1", "S1", n_tiles=tiles.num_rows)
    for i in range(0, tiles.num_rows, batch):
        w.append(tiles.slice(i, batch), embed(tiles.slice(i, batch)))
    w.commit()
    return (root / SLIDE).read_bytes()


def resume(root: Path, tiles: pa.Table, batch: int = 7) -> set[str]:
    """Finish the slide as `embed` does after a crash; return the tile ids found staged."""
    w = open_store(root, read_only=False).slide_writer(META, "c1", "S1", n_tiles=tiles.num_rows)
    done = w.done_tile_ids()
    todo = tiles.filter(pa.array([t not in done for t in tiles.column(Col.TILE_ID).to_pylist()]))
    for i in range(0, todo.num_rows, batch):
        w.append(todo.slice(i, batch), embed(todo.slice(i, batch)))
    w.commit(tile_ids=tiles.column(Col.TILE_ID).to_pylist())
    return done


@pytest.fixture
def tiles() -> pa.Table:
    return make_tiles("S1", 60, seed=4)


@pytest.fixture
def clean(tmp_path, tiles) -> bytes:
    return publish(tmp_path / "clean", tiles, batch=tiles.num_rows)


@pytest.mark.parametrize("order", ["tiler", "shuffled"])
def test_published_bytes_do_not_depend_on_batching(tmp_path, tiles, order):
    tiles = in_order(tiles) if order == "tiler" else tiles
    one = publish(tmp_path / "one", tiles, batch=tiles.num_rows)
    assert publish(tmp_path / "batched", tiles, batch=7) == one
    assert publish(tmp_path / "reversed", tiles.take(pa.array(np.arange(tiles.num_rows)[::-1])), batch=5) == one
    meta, vectors = open_store(tmp_path / "one").read_embeddings("toy")
    assert np.array_equal(vectors, embed(meta))


def test_appends_neither_list_the_staging_folder_nor_fsync(tmp_path, tiles, monkeypatch):
    store = open_store(tmp_path / "s", read_only=False)
    w = store.slide_writer(META, "c1", "S1")
    calls = {"fsync": 0, "list": 0}
    real_fsync = os.fsync

    def count_fsync(fd):
        calls["fsync"] += 1
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", count_fsync)
    monkeypatch.setattr(Path, "glob", lambda *a, **k: calls.__setitem__("list", calls["list"] + 1) or iter(()))
    monkeypatch.setattr(Path, "iterdir", lambda *a, **k: calls.__setitem__("list", calls["list"] + 1) or iter(()))
    for i in range(0, tiles.num_rows, 4):
        w.append(tiles.slice(i, 4), embed(tiles.slice(i, 4)))
    assert calls == {"fsync": 0, "list": 0}  # one journal, synced every few seconds only
    monkeypatch.undo()
    assert sum(read_staged(p, "").num_rows for p in staged_files(store.root / STAGING)) == tiles.num_rows


def test_torn_last_batch_is_dropped_and_recomputed(tmp_path, tiles, clean):
    root = tmp_path / "torn"
    w = open_store(root, read_only=False).slide_writer(META, "c1", "S1", n_tiles=tiles.num_rows)
    ends = []
    for i in range(0, 50, 10):  # a writer abandoned here is what SIGKILL leaves: the batches are in the kernel
        w.append(tiles.slice(i, 10), embed(tiles.slice(i, 10)))
        (journal,) = staged_files(root / STAGING)
        ends.append(journal.stat().st_size)
    whole = journal.read_bytes()
    for cut in sorted({ends[3] + 1, ends[3] + 8, (ends[3] + ends[4]) // 2, ends[4] - 1}):
        journal.write_bytes(whole[:cut])  # killed while writing the fifth batch
        got = open_store(root, read_only=False).slide_writer(META, "c1", "S1").done_tile_ids()
        assert got == set(tiles.column(Col.TILE_ID).to_pylist()[:40])
    assert resume(root, tiles) == set(tiles.column(Col.TILE_ID).to_pylist()[:40])
    assert (root / SLIDE).read_bytes() == clean
    assert not (root / STAGING).exists()


KILLED = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_store import META, embed, make_tiles
    from embedstore.store import open_store
    tiles = make_tiles("S1", 60, seed=4)
    w = open_store({root!r}, read_only=False).slide_writer(META, "c1", "S1", n_tiles=60)
    for i in range(0, 60, 10):
        if i == {kill_at}:
            os.kill(os.getpid(), 9)
        w.append(tiles.slice(i, 10), embed(tiles.slice(i, 10)))
    """
)


@pytest.mark.parametrize("kill_at", [10, 50])
def test_sigkill_between_appends_loses_nothing_appended(tmp_path, tiles, clean, kill_at):
    root = tmp_path / "killed"
    script = KILLED.format(tests=str(Path(__file__).parent), root=str(root), kill_at=kill_at)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert open_store(root).slide_status("toy", "c1", "S1") == "partial"
    assert resume(root, tiles) == set(tiles.column(Col.TILE_ID).to_pylist()[:kill_at])
    assert (root / SLIDE).read_bytes() == clean


def _batches(n: int, start: int = 0) -> pa.Table:
    return pa.table({"i": pa.array(np.arange(start, start + n), pa.int64())})


def test_after_a_reboot_only_synced_batches_count(tmp_path, monkeypatch):
    path = tmp_path / "part-000000.arrows"
    j = Journal(path, _batches(0).schema, sync_seconds=float("inf"))
    j.append(_batches(3))
    j.append(_batches(3, 3))
    j.sync()
    j.append(_batches(3, 6))
    with path.open("ab") as f:
        f.write(b"\0" * 100)  # a power cut can leave blocks of zeros after the last write
    assert read_journal(path).column("i").to_pylist() == list(range(9))
    monkeypatch.setattr(files, "boot_id", lambda: "another-boot")
    assert read_journal(path).column("i").to_pylist() == list(range(6))


def test_without_a_boot_id_every_batch_is_synced(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "boot_id", lambda: None)
    path = tmp_path / "part-000000.arrows"
    j = Journal(path, _batches(0).schema)
    j.append(_batches(2))
    j.append(_batches(2, 2))
    monkeypatch.setattr(files, "boot_id", lambda: "after-reboot")
    assert read_journal(path).column("i").to_pylist() == list(range(4))


def test_reboot_then_rerun_equals_uninterrupted(tmp_path, tiles, clean, monkeypatch):
    root = tmp_path / "rebooted"
    w = open_store(root, read_only=False).slide_writer(META, "c1", "S1", n_tiles=tiles.num_rows)
    w.append(tiles.slice(0, 20), embed(tiles.slice(0, 20)))
    w._journal.sync()  # what the writer does every JOURNAL_SYNC_SECONDS
    w.append(tiles.slice(20, 20), embed(tiles.slice(20, 20)))
    monkeypatch.setattr(files, "boot_id", lambda: "another-boot")
    assert resume(root, tiles) == set(tiles.column(Col.TILE_ID).to_pylist()[:20])
    assert (root / SLIDE).read_bytes() == clean


def test_parquet_parts_of_older_versions_resume(tmp_path, tiles, clean):
    root = tmp_path / "old"
    w = open_store(root, read_only=False).slide_writer(META, "c1", "S1", n_tiles=tiles.num_rows)
    for i in range(0, 30, 10):
        w.append(tiles.slice(i, 10), embed(tiles.slice(i, 10)))
    (journal,) = staged_files(root / STAGING)
    # Before journals, each batch was one Parquet part: stage the same rows that way.
    table = read_journal(journal)
    for k in range(3):
        part = table.slice(10 * k, 10)
        dest = root / STAGING / f"part-{k:06d}.parquet"
        write_parquet_atomic(part, dest, row_group_size=row_group_rows(16), **write_options(part.schema))
    journal.unlink()
    assert open_store(root).slide_status("toy", "c1", "S1") == "partial"
    assert resume(root, tiles) == set(tiles.column(Col.TILE_ID).to_pylist()[:30])
    assert (root / SLIDE).read_bytes() == clean


def test_a_damaged_journal_is_moved_aside_and_its_tiles_embedded_again(tmp_path, tiles, clean):
    root = tmp_path / "damaged"
    w = open_store(root, read_only=False).slide_writer(META, "c1", "S1", n_tiles=tiles.num_rows)
    w.append(tiles.slice(0, 10), embed(tiles.slice(0, 10)))
    (journal,) = staged_files(root / STAGING)
    journal.write_bytes(b"\xff" * 64)  # not even its schema reads
    assert resume(root, tiles) == set()
    assert (root / SLIDE).read_bytes() == clean
    assert [p.name for p in (root / "_quarantine").rglob("*.arrows")] == [journal.name]
