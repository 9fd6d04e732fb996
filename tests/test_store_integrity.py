"""Damaged stores: named in one line, rebuilt by embed and `check --repair`; staging leftovers; tile geometry."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import assert_one_line_error, run

from embedstore.build import build_index
from embedstore.embedding import check_store, embed
from embedstore.errors import BadInput, DamagedFile, GeometryMismatch
from embedstore.prediction import predict
from embedstore.store import open_store, verify_store
from embedstore.store._writer import read_staged, staged_files
from embedstore.testing import write_synthetic_slide

COHORT = "synthetic"


def tables(store: Path) -> dict[str, pa.Table]:
    """Every Parquet file of the store's data tree, by relative path (the whole visible state)."""
    out = {}
    for sub in ("embeddings", "spots", "expression"):
        for f in sorted((store / sub).rglob("*.parquet")):
            out[str(f.relative_to(store))] = pq.read_table(f, partitioning=None)
    return out


def assert_same_store(got: Path, want: Path) -> None:
    a, b = tables(got), tables(want)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].equals(b[name], check_metadata=True), name


@pytest.fixture(scope="module")
def reference(synthetic_cohort, tmp_path_factory):
    """The uninterrupted run every repaired store must equal."""
    path = tmp_path_factory.mktemp("integrity") / "store"
    assert embed(synthetic_cohort.root, path, cohort=COHORT, workers=0, progress=False).ok
    return path


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "tiny.toml"
    path.write_text(
        f'name = "tiny"\nencoder = "builtin"\ncohort = "{COHORT}"\n'
        '[panel]\nmethod = "hvg"\nn_genes = 10\n'
        "[aligner]\nproj_dim = 16\nmax_epochs = 2\n"
        '[index]\nfactory = "Flat"\n'
        '[aggregator]\nname = "mean"\nk = 4\n'
    )
    return path


@pytest.fixture(scope="module")
def index_dir(reference, recipe_file, tmp_path_factory):
    return build_index(recipe_file, reference, tmp_path_factory.mktemp("idx") / "tiny.index")


def _slide_file(store: Path, section: str) -> Path:
    return store / "embeddings" / "encoder=builtin" / f"cohort={COHORT}" / f"slide_id={section}" / "tiles.parquet"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))  # what a crash of the machine leaves of unflushed blocks


def _zero_rows(path: Path) -> None:
    t = pq.read_table(path, partitioning=None)
    pq.write_table(t.slice(0, 0), path)


def _foreign(path: Path) -> None:
    pq.write_table(pa.table({"slide": ["x", "y"], "score": [0.1, 0.2]}), path)


DAMAGES = {
    "truncated": ("embeddings", _truncate),
    "zeroed": ("embeddings", _zero),
    "zero-rows": ("embeddings", _zero_rows),
    "foreign": ("embeddings", _foreign),
    "expression": ("expression", _truncate),
}


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request, reference, synthetic_cohort, tmp_path):
    """A copy of the reference store with one file damaged: (store, damaged file)."""
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    section = synthetic_cohort.sections[1].section
    where, damage = DAMAGES[request.param]
    if where == "embeddings":
        path = _slide_file(store, section)
    else:
        path = store / "expression" / f"cohort={COHORT}" / f"slide_id={section}" / "expression.parquet"
    damage(path)
    return store, path


def test_commands_name_the_damaged_file_and_the_repair(damaged, recipe_file, index_dir, tmp_path):
    store, path = damaged
    needles = (str(path), f"embedstore check {store} --repair")
    assert_one_line_error(run("sql", store, "SELECT count(*) FROM embeddings"), *needles)
    # predict and index build in-process (the CLI prints an EmbedstoreError as its one line)
    for call in (
        lambda: predict(index_dir, store),
        lambda: build_index(recipe_file, store, tmp_path / "idx"),
    ):
        with pytest.raises(BadInput) as e:
            call()
        assert "\n" not in str(e.value)
        assert all(n in str(e.value) for n in needles), str(e.value)
    assert not (tmp_path / "idx").exists()


def test_cli_predict_and_index_build_name_a_truncated_file(
    reference, recipe_file, index_dir, tmp_path, synthetic_cohort
):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    path = _slide_file(store, synthetic_cohort.sections[0].section)
    _truncate(path)
    needles = (str(path), f"embedstore check {store} --repair")
    assert_one_line_error(
        run("predict", "--index", index_dir, "--store", store, "--out", tmp_path / "p.h5ad"), *needles
    )
    out = tmp_path / "idx"
    assert_one_line_error(run("index", "build", recipe_file, "--store", store, "--out", out), *needles)
    assert not out.exists()


def test_embed_rerun_rebuilds_the_damaged_file(damaged, reference, synthetic_cohort, caplog):
    store, path = damaged
    original = path.read_bytes()
    report = embed(synthetic_cohort.root, store, cohort=COHORT, workers=0, progress=False)
    assert report.ok
    assert [r.status for r in report.results].count("done") == 1
    assert any(str(path) in r.getMessage() and "moved it to" in r.getMessage() for r in caplog.records)
    moved = list((store / "_quarantine").rglob(path.name))
    assert [m.read_bytes() for m in moved] == [original]  # moved aside, never deleted
    assert_same_store(store, reference)


def test_check_finds_it_and_repair_rebuilds_it(damaged, reference):
    store, path = damaged
    found = check_store(store)
    assert not found.ok
    assert [line.split(": ")[0] for line in found.found] == [str(path)]
    repaired = check_store(store, repair=True, device="cpu", workers=0)
    assert repaired.ok, repaired.remaining
    assert any(line.startswith(f"{path}: moved to") for line in repaired.repaired)
    assert_same_store(store, reference)
    assert check_store(store).ok


def test_check_cli_reports_then_repairs(reference, synthetic_cohort, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    path = _slide_file(store, synthetic_cohort.sections[2].section)
    _truncate(path)
    result = run("check", store)
    assert result.returncode == 1
    assert f"problem: {path}: " in result.stdout
    repaired = run("check", store, "--repair", "--device", "cpu")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired:" in repaired.stdout
    assert_same_store(store, reference)


def test_damaged_pages_under_an_intact_footer(reference, tmp_path, synthetic_cohort):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    path = _slide_file(store, synthetic_cohort.sections[0].section)
    md = pq.read_metadata(path)
    leaf = [md.schema.column(i).path for i in range(md.num_columns)].index("embedding.list.element")
    start = md.row_group(0).column(leaf).data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 64] = bytes(64)  # the page header: the fast reader hands over to pyarrow
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFile, match=r"tiles\.parquet: unreadable data .*embedstore check .* --repair"):
        open_store(store).read_embeddings("builtin")
    with pytest.raises(BadInput, match=r"embedstore check .* --repair"):
        open_store(store).sql("SELECT sum(embedding[1]) FROM embeddings")
    data[start : start + 64] = path.read_bytes()[start : start + 64]
    data[start + 200 : start + 600] = bytes(400)  # the floats only: the page CRC catches it
    path.write_bytes(bytes(data))
    assert [line.split(": ")[0] for line in check_store(store).found] == [str(path)]


def test_commit_never_publishes_an_empty_or_incomplete_slide(tmp_path):
    store = open_store(tmp_path / "store", read_only=False)
    meta = {"name": "toy", "fingerprint": "f" * 16}
    tiles = pa.table(
        {
            "slide_id": ["S"] * 4, "tile_id": [f"{i}_0" for i in range(4)], "spot_id": pa.nulls(4, pa.string()),
            "x": [0, 1, 2, 3], "y": [0] * 4, "mpp": [0.5] * 4, "size_px": pa.array([224] * 4, pa.int32()),
            "padded": [False] * 4,
        }
    )  # fmt: skip
    w = store.slide_writer(meta, "c", "S", n_tiles=4)
    w.append(tiles.slice(0, 0), np.empty((0, 8), np.float32))  # what --batch-size 0 amounted to
    with pytest.raises(BadInput, match="nothing to commit"):
        w.commit()
    w.append(tiles.slice(0, 2), np.ones((2, 8), np.float32))
    with pytest.raises(BadInput, match="2 of the slide's 4 tiles are embedded; the slide is not published"):
        w.commit()
    assert store.slide_status("toy", "c", "S") == "partial"
    # A file of 0 rows (an older embedstore's) is not done: damaged, never "complete".
    w.append(tiles.slice(2, 2), np.ones((2, 8), np.float32))
    final = w.commit()
    pq.write_table(pq.read_table(final).slice(0, 0), final)
    assert store.slide_status("toy", "c", "S") == "damaged"


KILL_AFTER_PUBLISH = textwrap.dedent(
    """
    import os, signal, types
    import embedstore.store._writer as writer
    from embedstore.embedding import embed

    def die(*args, **kwargs):  # the kill lands between the publishing rename and the cleanup
        os.kill(os.getpid(), signal.SIGKILL)

    writer.shutil = types.SimpleNamespace(rmtree=die)
    embed({slides!r}, {store!r}, workers=0, batch_size=4, progress=False)
    """
)

KILL_AFTER_PARTS = textwrap.dedent(
    """
    import os, signal
    from embedstore.store._writer import SlideWriter
    from embedstore.embedding import embed

    append = SlideWriter.append
    calls = []

    def append_then_die(self, tiles, embeddings):
        append(self, tiles, embeddings)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    SlideWriter.append = append_then_die
    embed({slides!r}, {store!r}, workers=0, batch_size=4, target_mpp=0.5, progress=False)
    """
)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "s0.tif", 1200, 1000, mpp=0.5, seed=1)
    return folder


def _kill(script: str, slides: Path, store: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", script.format(slides=str(slides), store=str(store))],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_staging_left_by_a_kill_after_publishing_is_cleared(slides, tmp_path):
    want = tmp_path / "want"
    assert embed(slides, want, workers=0, batch_size=4, progress=False).ok
    store = tmp_path / "store"
    _kill(KILL_AFTER_PUBLISH, slides, store)
    staging = store / "_staging" / "encoder=builtin" / f"cohort={slides.name}" / "slide_id=s0"
    assert staged_files(staging)
    assert open_store(store).slide_status("builtin", slides.name, "s0") == "complete"
    assert [p.kind for p in verify_store(open_store(store)).problems] == ["staging"]
    report = embed(slides, store, workers=0, batch_size=4, progress=False)
    assert [r.status for r in report.results] == ["skipped"]
    assert not staging.exists()
    assert_same_store(store, want)


def test_kill_then_rerun_with_another_target_mpp_is_refused(slides, tmp_path):
    store = tmp_path / "store"
    _kill(KILL_AFTER_PARTS, slides, store)
    staging = store / "_staging" / "encoder=builtin" / f"cohort={slides.name}" / "slide_id=s0"
    parts = {p: p.read_bytes() for p in staged_files(staging)}
    assert sum(read_staged(p, "").num_rows for p in parts) == 2 * 4  # the two batches appended before the kill
    cmd = ["embed", slides, "--store", store, "--workers", "0", "--batch-size", "4", "--target-mpp", "1.0"]
    result = run(*cmd)
    assert result.returncode == 1, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("s0"))
    assert "failed" in line
    assert "0.5 µm/px x 224 px (bilinear)" in line
    assert "1.0 µm/px x 224 px (bilinear)" in line
    assert "--target-mpp" in line
    assert not (store / "embeddings").exists() or not any((store / "embeddings").rglob("*.parquet"))
    assert {p: p.read_bytes() for p in staged_files(staging)} == parts  # nothing staged was changed or deleted
    # Resuming with the original settings completes the slide as an uninterrupted run would.
    assert embed(slides, store, workers=0, batch_size=4, target_mpp=0.5, progress=False).ok
    want = tmp_path / "want"
    assert embed(slides, want, workers=0, batch_size=4, target_mpp=0.5, progress=False).ok
    assert_same_store(store, want)
    # A complete slide is not skipped silently under other settings either.
    again = embed(slides, store, workers=0, target_mpp=1.0, progress=False)
    assert again.results[0].status == "failed"
    assert "0.5 µm/px" in again.results[0].reason
    assert "1.0 µm/px" in again.results[0].reason


def test_mixed_geometries_across_slides_are_refused(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(2):
        write_synthetic_slide(folder / f"m{i}.tif", 1200, 1000, mpp=0.5, seed=20 + i)
    store = tmp_path / "store"
    assert embed(folder, store, workers=0, progress=False, slide_ids=["m0"]).ok
    assert embed(folder, store, workers=0, progress=False, slide_ids=["m1"], size_px=112).ok
    st = open_store(store)
    with pytest.raises(
        GeometryMismatch, match=r"slide_id=m1/tiles\.parquet: .*0\.5 µm/px x 112 px.*0\.5 µm/px x 224 px"
    ):
        st.read_embeddings("builtin")
    with pytest.raises(GeometryMismatch):
        list(st.iter_embeddings("builtin", slide_ids=["m0"], geometry={"mpp": 0.5, "size_px": 112}))
    _, emb = st.read_embeddings("builtin", slide_ids=["m1"], geometry={"mpp": 0.5, "size_px": 112})
    assert len(emb) > 0
    assert st.encoder_metadata("builtin")["geometry"] == {"mpp": 0.5, "size_px": 224, "resample": "bilinear"}


def test_check_reads_staged_journals(slides, tmp_path):
    """`check` notes a slide partly staged in a journal, and names a journal whose batches cannot be read."""
    store = tmp_path / "store"
    _kill(KILL_AFTER_PARTS, slides, store)
    staging = store / "_staging" / "encoder=builtin" / f"cohort={slides.name}" / "slide_id=s0"
    (journal,) = [p for p in staged_files(staging) if p.suffix == ".arrows"]
    report = verify_store(open_store(store))
    assert report.problems == []
    assert any("partly embedded" in note and str(staging) in note for note in report.notes)
    journal.write_bytes(b"\0" * journal.stat().st_size)  # zeroed by a crash of the file system
    problems = verify_store(open_store(store)).problems
    assert [(p.path, p.kind) for p in problems] == [(journal, "part")]
