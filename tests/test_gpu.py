"""CUDA paths: FAISS on the GPU and mixed-precision embedding agree with the CPU (opt-in: ``-m gpu``).

Each test compares the GPU result with a reference computed on the CPU another way (NumPy brute
force for kNN, the fp32 CPU model for embeddings). They are deselected by default; selecting them
(``-m gpu``) on a machine without a CUDA GPU and faiss-gpu fails, so a GPU check never passes by
running nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.fail("-m gpu selected, but torch sees no CUDA GPU here")
    return torch


@pytest.fixture(scope="module")
def faiss_gpu():
    from embedstore._knn import gpu_available

    if not gpu_available():
        pytest.fail("-m gpu selected, but faiss has no GPU here (install faiss-gpu instead of faiss-cpu)")


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_gpu_flat_search_equals_brute_force(faiss_gpu):
    from embedstore._knn import build, search

    rng = np.random.default_rng(0)
    base, queries = _unit(rng, 20_000, 256), _unit(rng, 500, 256)
    index = build(base, "Flat", device="cuda")
    sims, ids = search(index, queries, 10)
    ref = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ base.T, ref, axis=1), atol=1e-4)


def test_faiss_gpu_excluding_own_group_equals_brute_force(faiss_gpu):
    from embedstore._knn import build, search

    rng = np.random.default_rng(1)
    base, queries = _unit(rng, 5_000, 64), _unit(rng, 200, 64)
    groups, qgroups = rng.integers(0, 5, len(base)), rng.integers(0, 5, len(queries))
    _, ids = search(build(base, "Flat", device="cuda"), queries, 5, exclude=(groups, qgroups))
    sims = queries @ base.T
    sims[qgroups[:, None] == groups[None, :]] = -np.inf
    np.testing.assert_array_equal(ids, np.argsort(-sims, axis=1, kind="stable")[:, :5])


def test_mixed_precision_embedding_matches_fp32_cpu(cuda):
    from embedstore.encoders import create_encoder

    tiles = np.random.default_rng(2).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    cpu = create_encoder("test-vit").to("cpu").encode(tiles)
    gpu = create_encoder("test-vit").to("cuda", precision="auto").encode(tiles)
    assert gpu.dtype == np.float32
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99


def test_embed_on_gpu_writes_the_cpu_fingerprint(cuda, cohort, tmp_path):
    import embedstore as es

    cpu_store, gpu_store = tmp_path / "cpu", tmp_path / "gpu"
    assert es.embed(cohort.root, cpu_store, encoder="test-vit", device="cpu", workers=0, progress=False).ok
    assert es.embed(cohort.root, gpu_store, encoder="test-vit", device="cuda", workers=0, progress=False).ok
    q = "SELECT DISTINCT fingerprint FROM encoders"
    assert es.sql(cpu_store, q).equals(es.sql(gpu_store, q))
