"""The Ray engine on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

The table the Ray engine writes must be the local engine's, bit for bit with the built-in
encoder, also when a worker is killed mid-run or when the driver dies and a rerun resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import CLI, assert_one_line_error, run

import embedstore as es
from embedstore.errors import BadInput, MissingDependency
from embedstore.testing import write_synthetic_slide

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'embedstore[ray]'")
if os.environ.get("CI") == "true":
    assert ray is not None  # CI installs the extra (scripts/bootstrap): these tests must run there


@pytest.mark.slow  # a minute or more on 2 cores; CI runs the engine's other real-cluster tests
def test_readme_ray_block(index, tmp_path):
    """The README's cohort-scale block runs as written (Ray started on this machine by each command)."""
    import anndata as ad
    from test_readme import _sh, command_lines, fenced

    (block,) = [b for b in fenced("bash") if "--engine ray" in b]
    work = tmp_path / "work"
    (work / "slides").mkdir(parents=True)
    for i in range(2):
        write_synthetic_slide(work / "slides" / f"S{i}.tif", 1536, 1536, mpp=None, seed=10 + i)
    (work / "mpp.csv").write_text("slide,mpp\nS0,0.5\nS1,0.5\n")
    (work / "her2st.index").symlink_to(index)
    for line in command_lines(block):
        r = _sh(line, work)
        assert r.returncode == 0, f"README line failed: {line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert len(slide_files(work / "cohort")) == 2
    assert (work / "cohort" / "tile_indexes" / "encoder=builtin" / "index.ivfdata").is_file()
    for s in ("S0", "S1"):
        assert ad.read_h5ad(work / "predictions" / "slides" / f"{s}.h5ad").n_obs > 10


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, two logical CPUs each; this process joins it as a driver."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three small pyramidal TIFFs (~40-60 tissue tiles each)."""
    folder = tmp_path_factory.mktemp("ray_slides") / "cohort"
    folder.mkdir()
    for i in range(3):
        write_synthetic_slide(folder / f"s{i}.tiff", 3600, 2800, mpp=0.25, seed=11 + i)
    return folder


@pytest.fixture(scope="module")
def local_table(slides, tmp_path_factory):
    """The local engine's store of the same slides: the reference."""
    store = tmp_path_factory.mktemp("ray_ref") / "store"
    report = es.embed(slides, store, progress=False, batch_size=8)
    assert report.ok
    return store


def slide_files(store: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sorted((store / "embeddings").rglob("tiles.parquet"))}


def assert_same_table(store: Path, reference: Path) -> None:
    """Every slide file holds the same rows, columns and vectors (bit for bit) as the reference's."""
    mine, theirs = slide_files(store), slide_files(reference)
    assert mine.keys() == theirs.keys()
    for name, path in theirs.items():
        a, b = pq.read_table(mine[name]), pq.read_table(path)
        assert a.schema.names == b.schema.names
        assert a.equals(b), name
    ta, ea = es.open_store(store).read_embeddings("builtin")
    tb, eb = es.open_store(reference).read_embeddings("builtin")
    assert ta.equals(tb)
    assert np.array_equal(ea, eb)


def embed_on_ray(slides: Path, store: Path, cluster, **kwargs) -> es.EmbedReport:
    return es.embed(slides, store, engine="ray", address=cluster.address, progress=False, batch_size=8, **kwargs)


def _busy_map_worker() -> int | None:
    """Pid of a Ray Data actor process working on a batch right now (its title names the call), if any."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if title.startswith(b"ray::MapWorker") and title.endswith(b".submit"):
                return int(proc.name)
    return None


def _when_staged(store: Path, action, timeout: float = 120.0) -> threading.Thread:
    """Run ``action()`` in a thread as soon as the first batch is staged in ``store``."""

    def watch():
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(p.is_file() for p in (store / "_staging").rglob("part-*")):
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_local_engines_table_even_when_a_worker_is_killed(cluster, slides, local_table, tmp_path):
    store = tmp_path / "store"
    killed = []

    def kill_an_encoder_actor_in_a_batch():
        end = time.monotonic() + 120
        while time.monotonic() < end and not killed:
            pid = _busy_map_worker()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_an_encoder_actor_in_a_batch, daemon=True)
    watcher.start()
    report = embed_on_ray(slides, store, cluster)
    watcher.join()
    assert killed, "no encoder actor was seen embedding a batch"
    assert report.ok, report.summary()
    assert [r.status for r in report.results] == ["done"] * 3
    assert_same_table(store, local_table)  # the local engine's table, bit for bit, despite the kill
    again = embed_on_ray(slides, store, cluster)  # a rerun finds everything done
    assert [r.status for r in again.results] == ["skipped"] * 3


@pytest.mark.slow  # a minute or more on 2 cores; CI runs the engine's other real-cluster tests
def test_a_killed_driver_resumes_to_the_same_table(cluster, slides, local_table, tmp_path):
    store = tmp_path / "store"
    args = [*CLI, "embed", slides, "--store", store, "--engine", "ray", "--address", cluster.address]
    args += ["--batch-size", "2"]  # small batches: the staged batches trickle in, so the kill lands mid-run
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _when_staged(store, lambda: proc.send_signal(signal.SIGKILL)).join()
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert any(p.is_file() for p in (store / "_staging").rglob("part-*"))
    assert not slide_files(store).keys() >= {"slide_id=s0", "slide_id=s1", "slide_id=s2"}
    report = embed_on_ray(slides, store, cluster)
    assert report.ok, report.summary()
    assert_same_table(store, local_table)


def test_a_corrupt_slide_is_named_and_the_others_are_embedded(cluster, slides, tmp_path):
    data = tmp_path / "cohort"
    data.mkdir()
    for p in slides.iterdir():
        (data / p.name).symlink_to(p)
    broken = data / "zz_broken.tiff"
    broken.write_bytes((slides / "s0.tiff").read_bytes()[:5000])
    result = run("embed", data, "--store", tmp_path / "store", "--engine", "ray", "--address", cluster.address)
    assert result.returncode == 1, result.stderr
    lines = {ln.split()[0]: ln for ln in result.stdout.splitlines() if ln.strip()}
    assert " failed " in lines["zz_broken"]
    assert str(broken) in lines["zz_broken"]
    assert all(" done " in lines[f"s{i}"] for i in range(3))
    assert "3 done, 0 skipped, 1 failed" in result.stdout


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(slides, tmp_path):
    result = run("embed", slides, "--store", tmp_path / "store", "--engine", "ray", "--address", "127.0.0.1:9")
    assert_one_line_error(result, "127.0.0.1:9", "ray start --head")
    assert not (tmp_path / "store").exists()


def test_without_ray_the_extra_is_named(slides, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(MissingDependency, match=r"embedstore\[ray\]"):
        es.embed(slides, tmp_path / "store", engine="ray")
    assert not (tmp_path / "store").exists()
    code = f"import sys; sys.modules['ray'] = None; from embedstore.cli import main; sys.argv = ['embedstore', 'embed', {str(slides)!r}, '--store', {str(tmp_path / 'store')!r}, '--engine', 'ray']; main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert_one_line_error(result, "embedstore[ray]")


def test_an_unknown_engine_is_refused(slides, tmp_path):
    with pytest.raises(BadInput, match="use local or ray"):
        es.embed(slides, tmp_path / "store", engine="spark")
    assert not (tmp_path / "store").exists()


def test_nodes_that_do_not_see_a_file_are_named(cluster, tmp_path):
    from embedstore import _ray

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with pytest.raises(BadInput, match=r"node .*: .*nowhere\.tiff: not found; the slides must be on a file system"):
            _ray.check_nodes_see(ray, [tmp_path / "nowhere.tiff"], "the slides")
        out = tmp_path / "out"
        out.mkdir()
        _ray.check_nodes_see(ray, [], "the output", shared_dir=out)  # the same folder on every node: passes
        assert list(out.iterdir()) == []  # the check leaves nothing behind
    finally:
        ray.shutdown()


@pytest.mark.slow  # a minute or more on 2 cores; CI runs the engine's other real-cluster tests
def test_predict_on_ray_writes_the_local_engines_files(cluster, index, store, tmp_path):
    import anndata as ad

    from embedstore.cohort_prediction import predict_cohort, slide_file

    local = predict_cohort(index, store, tmp_path / "local")
    result = run("predict", "--index", index, "--store", store, "--out", tmp_path / "ray", "--engine", "ray",
                 "--address", cluster.address)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 done, 0 skipped, 0 failed" in result.stdout
    for r in local.results:
        got = ad.read_h5ad(slide_file(tmp_path / "ray", "synthetic", r.slide_id))
        want = ad.read_h5ad(slide_file(tmp_path / "local", "synthetic", r.slide_id))
        assert np.array_equal(got.X, want.X)
        assert got.obs.equals(want.obs)


def test_errors_raised_on_workers_are_one_line(cluster):
    """An embedstore error on a worker comes back as itself; any other as ClusterFailure (Ray's wrapper is also an X)."""
    from embedstore import _ray
    from embedstore.errors import ClusterFailure

    def data_error():
        msg = "x.tif: broken; embed it again"
        raise BadInput(msg)

    def crash():
        msg = "division by zero"
        raise ZeroDivisionError(msg)

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with pytest.raises(BadInput) as info, _ray.cluster_errors("rerun to resume"):
            ray.get(ray.remote(max_retries=0)(data_error).remote())
        assert type(info.value) is BadInput
        assert str(info.value) == "x.tif: broken; embed it again"
        crashed = r"ZeroDivisionError: division by zero\); rerun to resume"
        with pytest.raises(ClusterFailure, match=crashed), _ray.cluster_errors("rerun to resume"):
            ray.get(ray.remote(max_retries=0)(crash).remote())
    finally:
        ray.shutdown()


@pytest.mark.slow  # starts a second Ray here (~10 s); CI's suite is near its 10 minutes
def test_without_an_address_ray_starts_here_and_does_not_join_a_running_cluster(cluster):
    """A cluster already running on this machine (the module's) is not joined: Ray Data's actors
    were cancelled there and the run failed with a bare SystemException. Last in the file: it
    starts and stops a second Ray in this process."""
    from embedstore import _ray

    with _ray.session(None, "embed --engine ray") as ray_here:
        assert ray_here.get_runtime_context().gcs_address != cluster.address
        assert len(_ray.alive_nodes(ray_here)) == 1
