"""An unreachable hub (an HPC compute node) fails at once in one line, or uses the cache.

The network is made really unreachable, not only declared offline: the hub endpoint is a
closed local port (connection refused) or a local socket that listens and never answers.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "embedstore"]
# generous bound for a subprocess that imports torch; the old code took 25-45 s of retries
BOUND_S = 60


def _env(hf_home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN") and "proxy" not in k.lower()
    }
    return {**env, "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, **extra}


@pytest.fixture
def closed_port():
    """A local port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_server():
    """A local socket that accepts connections into its backlog and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _embed(slide: Path, tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    args = [*CLI, "embed", str(slide), "--store", str(tmp_path / "store"), "--device", "cpu", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=BOUND_S, check=False)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter with ``env`` (the hub settings are read at import)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=BOUND_S, check=False
    )


def _assert_unreachable_line(result: subprocess.CompletedProcess, endpoint: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("embedstore: error: uni: weights for MahmoodLab/UNI are not available")
    assert f"the hub at {endpoint} is not reachable" in line
    assert "HF_HUB_OFFLINE" not in line  # it was not set
    assert "`hf download MahmoodLab/UNI`" in line
    assert "HF_HOME" in line
    assert "--weights local-dir:" in line


def test_refused_connection_fails_in_one_line(synthetic_slide_path, tmp_path, closed_port):
    result = _embed(synthetic_slide_path, tmp_path, _env(tmp_path / "hf", closed_port), "--encoder", "uni")
    _assert_unreachable_line(result, closed_port)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))


def test_silent_endpoint_fails_in_one_line(synthetic_slide_path, tmp_path, silent_server):
    # the probe waits HF_HUB_ETAG_TIMEOUT seconds once; the hub client would retry six times per file name
    env = _env(tmp_path / "hf", silent_server, HF_HUB_ETAG_TIMEOUT="2")
    result = _embed(synthetic_slide_path, tmp_path, env, "--encoder", "uni")
    _assert_unreachable_line(result, silent_server)
    assert "timed out" in result.stderr


def test_cached_weights_are_used_when_the_hub_is_unreachable(tmp_path, closed_port):
    """A compute node with a copied HF_HOME: the cache serves, quietly, with no network."""
    from safetensors.torch import save_file

    from embedstore.encoders import create_encoder

    rand = create_encoder("test-vit")
    snapshot = tmp_path / "hf" / "hub" / "models--embedstore--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in rand.model.trunk.state_dict().items()}, str(snapshot / "model.safetensors")
    )
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = (
        "from embedstore.encoders import create_encoder; "
        "e = create_encoder('test-vit', weights='hf-hub:embedstore/tiny'); print(e.weights_source)"
    )
    result = _python(code, _env(tmp_path / "hf", closed_port))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hf-hub:embedstore/tiny"
    assert result.stderr == ""


def test_offline_variable_is_named_only_when_set(tmp_path, synthetic_slide_path, closed_port):
    env = _env(tmp_path / "hf", closed_port, HF_HUB_OFFLINE="1")
    result = _embed(synthetic_slide_path, tmp_path, env, "--encoder", "uni")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "(offline (HF_HUB_OFFLINE=1) and not in the hub cache)" in lines[0]
    assert "not reachable" not in lines[0]


def test_text_tower_comes_from_the_cache_when_the_hub_is_unreachable(tmp_path, closed_port):
    """OmiCLIP's text tower reads the same cached checkpoint as its image tower, with no network and no noise."""
    import torch

    from embedstore.encoders import get_encoder_cfg
    from embedstore.encoders.openclip import build_openclip_full

    full = build_openclip_full(get_encoder_cfg("test-openclip"))
    snapshot = tmp_path / "hf" / "hub" / "models--embedstore--tiny-coca" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, snapshot / "checkpoint.pt")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    code = (
        "from embedstore.encoders import create_encoder, create_text_encoder; w = 'hf-hub:embedstore/tiny-coca'; "
        "t = create_text_encoder('test-openclip', weights=w); "
        "print(t.weights_source, t.image_fingerprint == create_encoder('test-openclip', weights=w).fingerprint)"
    )
    result = _python(code, _env(tmp_path / "hf", closed_port))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hf-hub:embedstore/tiny-coca True"
    assert result.stderr == ""
