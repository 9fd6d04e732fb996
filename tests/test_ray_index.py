"""The on-disk tile index with its shards built as Ray tasks, on a real two-node Ray cluster on this machine.

The index the Ray engine builds must be the local engine's: same ids, same codes, the same
answers to the same queries.
"""

from __future__ import annotations

import json
import os
import sys

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import assert_one_line_error, run
from test_tile_index import brute_force, hits_of, tree_digest, vectors, write

import embedstore.store._tile_search as search
import embedstore.tile_index as ti
from embedstore._vectors import l2_normalize
from embedstore.errors import BadInput, DamagedFile, MissingDependency
from embedstore.store import open_store

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'embedstore[ray]'")
if os.environ.get("CI") == "true":
    assert ray is not None  # CI installs the extra (scripts/bootstrap): these tests must run there

SLIDES = [(f"c{i % 2}", f"S{i}", 700 + 50 * i) for i in range(6)]
FACTORY = "IVF32,SQ8"
BUDGET = 300_000  # bytes: about 1,500 tiles per shard, so 5 shards of whole slides


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one logical CPU each; this process joins it as a driver."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture
def store(tmp_path, monkeypatch):
    st = open_store(tmp_path / "store", read_only=False)
    for i, (cohort, slide, n) in enumerate(SLIDES):
        write(st, cohort, slide, n, seed=i)
    monkeypatch.setattr(search, "EXACT_BELOW", 0)  # search through the index, however few tiles
    return st


def build(store, **kwargs) -> ti.TileIndexReport:
    return ti.build_tile_index(store, factory=FACTORY, layout="ondisk", memory_budget=BUDGET, rebuild=True, **kwargs)


def searched(folder, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    index = search.read_index(folder, manifest, mmap=True)
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index.search(queries, 10)


def test_shards_built_on_ray_give_the_local_index(cluster, store, tmp_path):
    local = build(store)
    assert local.search["layout"]["n_shards"] > 2  # tasks in parallel on both nodes
    folder = ti.index_folder(store.root, "toy")
    kept = tmp_path / "local-index"
    folder.rename(kept)
    on_ray = build(store, engine="ray", address=cluster.address)
    assert on_ray.search == local.search  # same codec, nprobe and recall, tuned on the same exact neighbours
    assert pq.read_table(folder / "tiles.parquet").equals(pq.read_table(kept / "tiles.parquet"))
    assert (folder / "index.ivfdata").read_bytes() == (kept / "index.ivfdata").read_bytes()  # same ids and codes
    q = l2_normalize(vectors(200, seed=7))
    for nprobe in (local.search["nprobe"], 32):
        d_ray, i_ray = searched(folder, q, nprobe)
        d_local, i_local = searched(kept, q, nprobe)
        np.testing.assert_array_equal(i_ray, i_local)
        np.testing.assert_array_equal(d_ray, d_local)
    found = hits_of(ti.nearest_tiles(store.root, q, 10), len(q))
    truth = brute_force(store, q, 10)
    recall = np.mean([len({a for a, _ in f} & {b for b, _ in t}) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9
    assert sorted(p.name for p in folder.parent.iterdir()) == ["encoder=toy"]  # no shard or check file left


def test_a_damaged_slide_fails_its_shard_task_in_one_line_and_keeps_the_index(cluster, store, monkeypatch):
    build(store)
    folder = ti.index_folder(store.root, "toy")
    before = tree_digest(folder)
    damaged = store.root / "embeddings/encoder=toy/cohort=c1/slide_id=S3/tiles.parquet"
    sample = ti._sample

    def sample_then_damage(*args, **kwargs):
        out = sample(*args, **kwargs)  # this process has read every slide: only a shard task reads S3 again
        data = damaged.read_bytes()
        damaged.write_bytes(data[: len(data) // 2])
        return out

    monkeypatch.setattr(ti, "_sample", sample_then_damage)
    with pytest.raises(DamagedFile) as e:
        build(store, engine="ray", address=cluster.address)
    assert str(e.value).startswith(f"{damaged}: ")
    assert "\n" not in str(e.value)
    assert tree_digest(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["encoder=toy"]


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(store):
    files = sorted(store.root.rglob("*"))
    result = run("index", "tiles", "--store", store.root, "--layout", "ondisk", "--engine", "ray",
                 "--address", "127.0.0.1:9")  # fmt: skip
    assert_one_line_error(result, "127.0.0.1:9", "ray start --head")
    assert sorted(store.root.rglob("*")) == files


def test_builds_in_memory_run_here_whatever_the_engine(store):
    ti.build_tile_index(store, factory=FACTORY, layout="memory", engine="ray")
    manifest = json.loads((ti.index_folder(store.root, "toy") / "manifest.json").read_text())
    assert manifest["layout"] == {"invlists": "memory"}
    assert not ray.is_initialized()  # no cluster was joined or started


def test_an_unknown_engine_or_no_ray_is_one_line_and_writes_nothing(store, monkeypatch):
    files = sorted(store.root.rglob("*"))
    with pytest.raises(BadInput, match=r"engine 'spark': not an engine; use local or ray"):
        ti.build_tile_index(store, engine="spark")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(MissingDependency, match=r"ray is needed for index tiles --engine ray; .*embedstore\[ray\]"):
        ti.build_tile_index(store, engine="ray")
    assert sorted(store.root.rglob("*")) == files
