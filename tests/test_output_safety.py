"""Outputs never delete or overwrite what embedstore did not write, and replace their own atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import pytest

import embedstore as es
from embedstore.aligner import load_aligner, save_aligner
from embedstore.demo import demo
from embedstore.errors import BadInput
from embedstore.index_folder import load_index, save_index

CLI = [sys.executable, "-m", "embedstore"]


def run(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False, **kw)


def assert_refused(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def targets(tmp_path, store):
    """Three folders embedstore must not write into: a user's folder, a store, a store's subfolder."""
    user = tmp_path / "project"
    user.mkdir()
    (user / "notes.txt").write_text("my thesis")
    before = _snapshot(store)
    yield {"user folder": user, "store": store, "store subfolder": store / "embeddings"}
    assert (user / "notes.txt").read_text() == "my thesis"
    assert _snapshot(store) == before


KINDS = ["user folder", "store", "store subfolder"]


# ------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("kind", KINDS)
def test_cli_index_build_refuses(kind, targets, store, recipe):
    out = targets[kind]
    assert_refused(run("index", "build", recipe, "--store", store, "--out", out), out)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_evaluate_and_demo_refuse(kind, targets, cohort):
    out = targets[kind]
    assert_refused(run("evaluate", "--reference", cohort.root, "--out", out, "--k", 5, "--n-genes", 20), out)
    assert_refused(run("demo", "--out", out), out)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_file_outputs_refuse_folders(kind, targets, store, index, synthetic_slide_path):
    out = targets[kind]
    assert_refused(run("predict", "--index", index, "--store", store, "--out", out), out)
    assert_refused(run("tile", synthetic_slide_path, "--out", out), out)
    if kind != "user folder":  # a new file beside a user's files is fine; a new file in a store is not
        assert_refused(run("tile", synthetic_slide_path, "--out", out / "t.parquet"), out / "t.parquet")
        assert_refused(run("predict", "--index", index, "--store", store, "--out", out / "p.h5ad"), out / "p.h5ad")


def test_cli_file_outputs_refuse_user_files(tmp_path, store, index, synthetic_slide_path):
    user = {name: tmp_path / name for name in ("mine.h5ad", "mine.parquet", "mine.png", "mine.A1.png")}
    for path in user.values():
        path.write_bytes(b"user data")
    assert_refused(run("predict", "--index", index, "--store", store, "--out", user["mine.h5ad"]), user["mine.h5ad"])
    tiles = run("tile", synthetic_slide_path, "--out", user["mine.parquet"])
    assert_refused(tiles, user["mine.parquet"])
    preview = run("tile", synthetic_slide_path, "--out", tmp_path / "t.parquet", "--preview", user["mine.png"])
    assert_refused(preview, user["mine.png"])
    assert not (tmp_path / "t.parquet").exists()
    assert all(p.read_bytes() == b"user data" for p in user.values())


def test_cli_plot_refuses_a_user_png(tmp_path, store, index):
    out = tmp_path / "pred.h5ad"
    (tmp_path / "pred.A1.png").write_bytes(b"user figure")
    result = run("predict", "--index", index, "--store", store, "--out", out, "--plot")
    assert_refused(result, tmp_path / "pred.A1.png")
    assert not out.exists()
    assert (tmp_path / "pred.A1.png").read_bytes() == b"user figure"


def test_cli_replaces_its_own_outputs(tmp_path, store, index, synthetic_slide_path):
    out = tmp_path / "pred.h5ad"
    for _ in range(2):
        assert run("predict", "--index", index, "--store", store, "--out", out, "--plot").returncode == 0
    assert ad.read_h5ad(out).uns["embedstore"]["kind"] == "prediction"
    for _ in range(2):
        result = run("tile", synthetic_slide_path, "--out", tmp_path / "t.parquet", "--preview", tmp_path / "t.png")
        assert result.returncode == 0, result.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------ the API


@pytest.mark.parametrize("kind", KINDS)
def test_api_outputs_refuse(kind, targets, store, recipe, index, cohort):
    out = targets[kind]
    idx = load_index(index)
    calls = {
        "build_index": lambda: es.build_index(recipe, store, out),
        "predict": lambda: es.predict(idx, store, out=out),
        "evaluate": lambda: es.evaluate(cohort.root, out, k=5, n_genes=20, workers=0, additions=()),
        "train_aligner": lambda: es.train_aligner(store, "builtin", out, max_epochs=1),
        "save_aligner": lambda: save_aligner(idx.aligner, out),
        "save_index": lambda: save_index(idx, out, overwrite=True),
        "demo": lambda: demo(out),
    }
    for name, call in calls.items():
        with pytest.raises(BadInput) as err:
            call()
        assert str(out) in str(err.value), name


def test_api_checkpoint_refuses_another_kind_and_replaces_its_own(tmp_path, index):
    idx = load_index(index)
    folder = tmp_path / "aligner"
    save_aligner(idx.aligner, folder)
    save_aligner(idx.aligner, folder)  # its own kind: replaced
    assert load_aligner(folder).config == idx.aligner.config
    with pytest.raises(BadInput, match="not an embedstore exemplar index"):
        save_index(idx, folder, overwrite=True)  # an aligner is not an index
    with pytest.raises(BadInput, match="already exists"):
        save_index(idx, index)  # overwrite=False
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_index(save_index(idx, empty)).manifest["n"] == idx.manifest["n"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_index_holding_a_store_is_refused(tmp_path, index, store, recipe):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(index, idx)
    (idx / "embeddings" / "encoder=builtin").mkdir(parents=True)  # a store put inside an index
    result = run("index", "build", recipe, "--store", store, "--out", idx)
    assert_refused(result, idx)
    assert (idx / "embeddings" / "encoder=builtin").is_dir()


# ------------------------------------------------------------------------------ atomic replacement


def _temp_entry(folder: Path, name: str) -> bool:
    return any(p.name.startswith(f".{name}.tmp-") for p in folder.iterdir())


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.02])
def test_killed_index_build_leaves_a_loadable_index(delay, tmp_path, index, store, recipe):
    import shutil

    out = tmp_path / "idx"
    shutil.copytree(index, out)
    old = json.loads((out / "manifest.json").read_text())["created_at"]
    proc = subprocess.Popen([*CLI, "index", "build", str(recipe), "--store", str(store), "--out", str(out)])
    try:
        while proc.poll() is None and not _temp_entry(tmp_path, "idx"):
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    loaded = load_index(out)  # the old index or the new one, never nothing
    assert loaded.manifest["created_at"] >= old
    # the next build cleans what the killed one left and completes
    assert run("index", "build", recipe, "--store", store, "--out", out).returncode == 0
    assert load_index(out).manifest["n"] == loaded.manifest["n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# ---------------------------------------------------------------------------------- evaluate reruns


def _stamps(out: Path) -> set[str]:
    """The run ids carried by every result file of an evaluation folder."""
    runs = set()
    for p in out.rglob("predictions_*.h5ad"):
        runs.add(ad.read_h5ad(p).uns["embedstore"]["run"])
    for p in [out / "metrics.json", *out.glob("fold-*/metrics.json")]:
        runs.add(json.loads(p.read_text())["run"])
    html = (out / "report.html").read_text()
    runs.add(html.split("name='embedstore.run' content='")[1].split("'")[0])
    return runs


def test_evaluate_rerun_replaces_the_whole_run(tmp_path, cohort, monkeypatch):
    from embedstore import evaluation

    out = tmp_path / "eval"
    kw = {"n_genes": 20, "k": 5, "workers": 0}
    es.evaluate(cohort.root, out, methods=("ridge", "knn-raw"), additions=(), **kw)
    first = json.loads((out / "evaluation.json").read_text())["run"]
    assert _stamps(out) == {first}
    assert list(out.glob("fold-*/predictions_knn-raw.h5ad"))

    # a run killed half-way through publishing: files are stamped, the marker names both runs
    calls = []
    real_swap = evaluation.swap_in

    def dies_after_one(src, dest):
        if calls:
            raise KeyboardInterrupt
        calls.append(dest)
        real_swap(src, dest)

    monkeypatch.setattr(evaluation, "swap_in", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        es.evaluate(cohort.root, out, methods=("ridge",), additions=(), **kw)
    marker = json.loads((out / "evaluation.json").read_text())
    assert marker["run"] == first
    assert marker["incoming_run"] != first
    assert _stamps(out) <= {first, marker["incoming_run"]}
    monkeypatch.undo()

    result = es.evaluate(cohort.root, out, methods=("ridge",), additions=(), **kw)
    final = json.loads((out / "evaluation.json").read_text())
    assert _stamps(out) == {final["run"]} == {result.metrics["run"]}
    assert not list(out.glob("fold-*/predictions_knn-raw.h5ad"))
    assert sorted(p.name for p in out.iterdir()) == sorted([*final["files"], "evaluation.json", "store"])
    assert "incoming" not in final


def test_evaluate_keeps_a_users_file_under_a_result_name(tmp_path, cohort):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "evaluation.json").write_text(json.dumps({"embedstore.kind": "evaluation", "run": None, "files": []}))
    (out / "report.html").write_text("my own report")
    with pytest.raises(BadInput, match=r"report\.html"):
        es.evaluate(cohort.root, out, methods=("ridge",), n_genes=20, k=5, workers=0, additions=())
    assert (out / "report.html").read_text() == "my own report"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert any((out / "store").iterdir())  # the embeddings are kept for the rerun


def test_published_outputs_follow_the_umask(index, tmp_path):
    """A lab's shared group reads what embedstore writes: nothing is published private (safetensors writes 0600)."""
    import stat

    old = os.umask(0o002)
    try:
        out = save_index(es.load_index(index), tmp_path / "shared.index")
    finally:
        os.umask(old)
    modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert all(m == (0o775 if (out / p).is_dir() else 0o664) for p, m in modes.items()), modes
