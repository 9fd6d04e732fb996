from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from embedstore._aligner_nets import ClipLoss, ProjectionHead
from embedstore.aligner import AlignerConfig, fit, load_aligner, save_aligner
from embedstore.errors import BadInput
from embedstore.testing import seeded_embeddings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _np_ce(logits, targets):
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-(targets * logp).sum(1).mean())


def test_clip_loss_by_hand():
    a = np.array([[1.0, 0.0], [0.6, 0.8]])
    b = np.array([[3.0, 4.0], [0.0, 2.0]])  # normalised inside the loss: (0.6, 0.8), (0, 1)
    an, bn = a, b / np.linalg.norm(b, axis=1, keepdims=True)
    s = 10.0
    logits = s * an @ bn.T
    eye = np.eye(2)
    expected = (_np_ce(logits, eye) + _np_ce(logits.T, eye)) / 2
    loss_fn = ClipLoss()
    got = loss_fn(torch.tensor(a), torch.tensor(b), torch.tensor(s))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # BLEEP's soft targets: softmax(s * (a a^T + b b^T) / 2)
    sim = s * (an @ an.T + bn @ bn.T) / 2
    t = np.exp(sim) / np.exp(sim).sum(1, keepdims=True)
    expected_soft = (_np_ce(logits, t) + _np_ce(logits.T, t.T)) / 2
    got_soft = ClipLoss(soft_targets=True)(torch.tensor(a), torch.tensor(b), torch.tensor(s))
    assert float(got_soft) == pytest.approx(expected_soft, rel=1e-6)


def test_projection_head_shape_and_norm():
    head = ProjectionHead(12, 8, dropout=0.0)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 8)
    assert isinstance(head.layer_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("soft", [False, True])
def test_loss_falls_on_64_rows(soft):
    img, expr, _ = seeded_embeddings(n=64)
    cfg = AlignerConfig(proj_dim=16, batch_size=32, max_epochs=15, patience=15, val_fraction=0, soft_targets=soft)
    a = fit(img, expr, None, cfg, seed=0)
    losses = [h["train_loss"] for h in a.history]
    assert len(losses) == 15
    assert losses[-1] < 0.7 * losses[0]
    z = a.project_images(img)
    assert z.shape == (64, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, rtol=1e-5)


def test_fit_is_seeded_validates_on_held_out_slides_and_round_trips(tmp_path):
    img, expr, slides = seeded_embeddings(n=160)
    cfg = AlignerConfig(
        proj_dim=16, batch_size=64, max_epochs=4, encoder_fingerprint="abc123", genes=tuple(f"g{i}" for i in range(20))
    )
    a = fit(img, expr, slides, cfg, seed=3)
    b = fit(img, expr, slides, cfg, seed=3)
    np.testing.assert_array_equal(a.project_images(img), b.project_images(img))
    assert a.config.image_dim == 48
    assert a.config.n_genes == 20
    assert a.config.encoder_fingerprint == "abc123"
    assert {"train_loss", "val_loss"} <= set(a.history[0])
    save_aligner(a, tmp_path / "al")
    assert sorted(p.name for p in (tmp_path / "al").iterdir()) == ["config.json", "model.safetensors"]
    c = load_aligner(tmp_path / "al")
    assert c.config == a.config
    np.testing.assert_array_equal(c.project_images(img), a.project_images(img))
    np.testing.assert_array_equal(c.project_expression(expr), a.project_expression(expr))
    with pytest.raises(BadInput, match="image embeddings: has 47 columns but the aligner was trained on 48"):
        c.project_images(img[:, :47])


def _noise(n=120, seed=7):
    """Image and expression rows with nothing in common: the validation loss soon stops improving."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 10)).astype(np.float32), rng.standard_normal((n, 6)).astype(np.float32)


NOISE_CFG = AlignerConfig(proj_dim=8, batch_size=16, max_epochs=40, patience=2, lr=1e-2)


@pytest.mark.parametrize("width", [48, 512])
def test_a_rows_projection_does_not_depend_on_its_batch(width):
    """Streaming rows in batches of any size (a slide's last row group may hold 3) equals one call, bit for bit."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((300, width)).astype(np.float32)
    expr = rng.standard_normal((300, 20)).astype(np.float32)
    cfg = AlignerConfig(proj_dim=16, batch_size=64, max_epochs=1, genes=tuple(f"g{i}" for i in range(20)))
    a = fit(img, expr, np.repeat(np.arange(3), 100), cfg, seed=0)
    whole = a.project_images(img)
    for batch in (1, 3, 7, 19, 64):
        np.testing.assert_array_equal(a.project_images(img, batch_size=batch), whole)
    np.testing.assert_array_equal(a.project_expression(expr[:5]), a.project_expression(expr)[:5])


def test_early_stopping_keeps_the_best_epoch():
    img, expr = _noise()
    stopped = fit(img, expr, None, NOISE_CFG, seed=0)
    val = [h["val_loss"] for h in stopped.history]
    best = int(np.argmin(val))
    assert len(val) == best + 1 + NOISE_CFG.patience < NOISE_CFG.max_epochs
    # reference: the same seeded run, cut off after the best epoch instead of rolled back to it
    cut = AlignerConfig(**{**NOISE_CFG.to_dict(), "max_epochs": best + 1, "patience": NOISE_CFG.max_epochs})
    reference = fit(img, expr, None, cut, seed=0)
    np.testing.assert_array_equal(stopped.project_images(img), reference.project_images(img))
    np.testing.assert_array_equal(stopped.project_expression(expr), reference.project_expression(expr))


def test_each_epoch_and_the_early_stop_print_a_progress_line(caplog):
    img, expr = _noise()
    with caplog.at_level("INFO", logger="embedstore.progress"):
        a = fit(img, expr, None, NOISE_CFG, seed=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "embedstore.progress"]
    assert len(lines) == len(a.history) + 1
    for h, line in zip(a.history, lines, strict=False):
        expected = f"aligner epoch {h['epoch'] + 1}/40: train {h['train_loss']:.4f} val {h['val_loss']:.4f} ("
        assert line.startswith(expected)
        assert re.fullmatch(r".*\(\d+\.\d s\)", line)
    best = int(np.argmin([h["val_loss"] for h in a.history]))
    assert lines[-1] == (
        f"aligner: early stop at epoch {len(a.history)} (patience 2); "
        f"keeping epoch {best + 1}, val {a.history[best]['val_loss']:.4f}"
    )


def test_importing_the_training_modules_leaves_torch_unloaded():
    code = "import embedstore.aligner, embedstore.aggregate, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_from_hf_hub_with_patched_download(tmp_path, monkeypatch):
    import huggingface_hub

    img, expr, _ = seeded_embeddings(n=64)
    a = fit(img, expr, None, AlignerConfig(proj_dim=8, max_epochs=1), seed=0)
    save_aligner(a, tmp_path / "snap")
    calls = []

    def fake_download(repo_id, filename, revision=None, **kw):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / "snap" / filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    b = load_aligner("hf-hub:org/aligner@v1")
    assert calls == [("org/aligner", "config.json", "v1"), ("org/aligner", "model.safetensors", "v1")]
    np.testing.assert_array_equal(b.project_images(img), a.project_images(img))


def test_corrupted_or_mismatched_checkpoint_names_the_file(tmp_path):
    img, expr, _ = seeded_embeddings(n=64)
    a = fit(img, expr, None, AlignerConfig(proj_dim=8, max_epochs=1), seed=0)
    save_aligner(a, tmp_path / "al")
    w = tmp_path / "al" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(BadInput, match=r"al/model.safetensors: cannot be read as safetensors .*corrupted"):
        load_aligner(tmp_path / "al")
    (tmp_path / "al" / "config.json").write_text("{not json")
    with pytest.raises(BadInput, match=r"al/config.json: not valid JSON"):
        load_aligner(tmp_path / "al")
    with pytest.raises(BadInput, match=r"aligner config: unknown key\(s\) bogus; valid keys are"):
        AlignerConfig.from_dict({"bogus": 1})
    with pytest.raises(BadInput, match="aligner folder not found"):
        load_aligner(tmp_path / "nowhere")


def test_adamw_matches_torch_optim_bit_for_bit():
    """The aligner's optimizer (kept off torch.optim, whose first use imports the compiler) is torch's AdamW."""
    import torch

    from embedstore._adamw import AdamW

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    theirs = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(32, 8)
    for model, opt in (
        (ours, AdamW(ours.parameters(), lr=3e-3, weight_decay=0.05)),
        (theirs, torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.05)),
    ):
        for _ in range(40):
            opt.zero_grad()
            (model(x) ** 2).mean().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
