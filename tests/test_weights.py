"""Real pretrained weights from the Hugging Face hub cache load and embed (opt-in: ``-m weights``).

One test per hub-hosted encoder of the registry; each skips unless that repository is in the
local hub cache (``hf download ORG/REPO`` first; gated ones need ``HF_TOKEN``). It checks what
the tiny random variants cannot: the real checkpoint fills the real architecture, and the
result has the registry's dimension, is finite and deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedstore.encoders import create_encoder, list_encoders

pytestmark = pytest.mark.weights

HUB = list_encoders()
HUB = HUB[HUB["weights"].astype(str).str.startswith("hf-hub:")]


def _cached(repo: str) -> bool:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return any(r.repo_id == repo for r in scan_cache_dir().repos)
    except CacheNotFound:
        return False


@pytest.mark.parametrize("name", list(HUB.index))
def test_real_weights_embed(name):
    repo = HUB.loc[name, "weights"].removeprefix("hf-hub:")
    if not _cached(repo):
        pytest.skip(f"{repo} is not in the hub cache")
    encoder = create_encoder(name)
    tiles = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    a, b = encoder.encode(tiles), encoder.encode(tiles)
    assert a.shape == (4, int(HUB.loc[name, "dim"]))
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(a - a.mean(0), axis=1).max() > 0  # different tiles, different vectors
