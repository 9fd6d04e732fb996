"""A full disk (ENOSPC, on a small tmpfs) or a file-size limit (EFBIG): one line, exit 1, nothing left behind."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embedstore.index_folder import load_index
from embedstore.store import open_store

CLI = [sys.executable, "-m", "embedstore"]


def run(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False, **kw)


def assert_disk_full(result: subprocess.CompletedProcess, under: Path, what: str = "no space left") -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # progress bars and warnings share stderr; the error itself is one line
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if "embedstore: error:" in ln]
    assert len(lines) == 1, result.stderr
    assert str(under) in lines[0]
    assert what in lines[0]
    assert "needs about" in lines[0]
    assert ".tmp-" not in lines[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


class SmallDisk:
    """A tmpfs mounted for one test, with a ballast file to leave a chosen number of bytes free."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ballast = root / "ballast"

    def leave_free(self, n: int) -> None:
        st = os.statvfs(self.root)
        size = st.f_bavail * st.f_frsize - n
        with self.ballast.open("ab") as f:
            f.write(b"\0" * max(size, 0))

    def free_all(self) -> None:
        self.ballast.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs in CI: {mounted.stderr.decode().strip()}")
        pytest.skip("mounting a tmpfs needs root")
    yield SmallDisk(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def file_size_limit(n: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return limit


def test_embed_stops_on_a_full_disk_and_resumes(small_disk, cohort):
    store = small_disk.root / "store"
    small_disk.leave_free(60_000)  # room for about one slide
    result = run("embed", cohort.root, "--store", store, "--cohort", "synthetic", "--workers", 0)
    assert_disk_full(result, store)
    assert not temp_files(small_disk.root)
    done = open_store(store).sql("SELECT count(DISTINCT slide_id) AS n FROM embeddings").n[0]
    assert done < 3  # stopped at the full disk, not recorded as one failed slide among others
    small_disk.free_all()
    rerun = run("embed", cohort.root, "--store", store, "--cohort", "synthetic", "--workers", 0)
    assert rerun.returncode == 0, rerun.stderr
    assert open_store(store).sql("SELECT count(DISTINCT slide_id) AS n FROM embeddings").n[0] == 3


def test_index_build_on_a_full_disk_keeps_the_old_index(small_disk, store, recipe, index):
    out = small_disk.root / "tiny.index"
    shutil.copytree(index, out)
    small_disk.leave_free(16_000)
    assert_disk_full(run("index", "build", recipe, "--store", store, "--out", out), out)
    assert not temp_files(small_disk.root)
    assert load_index(out).manifest["n"] > 0  # the old index is still there and loads
    small_disk.free_all()
    assert run("index", "build", recipe, "--store", store, "--out", out).returncode == 0
    assert load_index(out).manifest["created_at"] >= load_index(index).manifest["created_at"]


def test_predict_over_the_file_size_limit(tmp_path, store, index):
    out = tmp_path / "pred.h5ad"
    result = run("predict", "--index", index, "--store", store, "--out", out, preexec_fn=file_size_limit(30_000))
    assert_disk_full(result, out, "file-size limit")
    assert not out.exists()
    assert not temp_files(tmp_path)
    assert run("predict", "--index", index, "--store", store, "--out", out).returncode == 0
    assert out.is_file()


def test_predict_plot_on_a_full_disk(small_disk, store, index):
    out = small_disk.root / "pred.h5ad"
    small_disk.leave_free(80_000)  # the h5ad fits, the maps do not
    result = run("predict", "--index", index, "--store", store, "--out", out, "--plot")
    assert_disk_full(result, small_disk.root)
    assert not temp_files(small_disk.root)
    small_disk.free_all()
    assert run("predict", "--index", index, "--store", store, "--out", out, "--plot").returncode == 0


def test_evaluate_on_a_full_disk(small_disk, cohort, tmp_path):
    out = small_disk.root / "eval"
    store = tmp_path / "store"
    small_disk.leave_free(200_000)  # the predictions fit, the report's figures do not
    args = ("evaluate", "--reference", cohort.root, "--out", out, "--store", store, "--k", 5, "--n-genes", 20)
    args += ("--additions", "none")  # the additions have their own tests
    assert_disk_full(run(*args), out)
    assert not temp_files(small_disk.root)
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json"]  # no half run published
    small_disk.free_all()
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").is_file()
