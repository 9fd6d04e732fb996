from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from embedstore._aligner_nets import ClipLoss
from embedstore._vectors import l2_normalize
from embedstore.aligner import AlignerConfig, fit, load_aligner, save_aligner
from embedstore.errors import BadInput
from embedstore.testing import seeded_embeddings
from embedstore.text_aligner import (
    TextAligner,
    TextAlignerConfig,
    _new_model,
    fit_text_aligner,
    load_text_aligner,
    save_text_aligner,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATIENTS = np.repeat([f"patient{i}" for i in range(6)], 100)
ROTATED_CFG = TextAlignerConfig(lr=1e-2, batch_size=128, max_epochs=60, patience=5)


def _rotated(d: int = 32, noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings and text = normalize(R @ image + noise) for a random rotation R: zero-shot is blind."""
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    img = l2_normalize(rng.standard_normal((len(PATIENTS), d)))
    txt = l2_normalize(img @ rot.T + noise * rng.standard_normal(img.shape) / np.sqrt(d))
    return img, txt


def _top1(q: np.ndarray, keys: np.ndarray) -> float:
    """Brute-force image->text retrieval: the fraction of rows whose nearest key is their own pair."""
    return float(np.mean(np.argmax(q @ keys.T, axis=1) == np.arange(len(q))))


def _val_loss(a: TextAligner, img: np.ndarray, txt: np.ndarray, rows: np.ndarray) -> float:
    """The contrastive loss of ``rows`` by hand from the projections, in training's batches (weighted by their rows)."""
    scale = a.model.logit_scale.detach().exp()
    zi, zt = torch.from_numpy(a.project_images(img[rows])), torch.from_numpy(a.project_text(txt[rows]))
    bs = a.config.batch_size
    losses = [
        float(ClipLoss()(zi[s : s + bs], zt[s : s + bs], scale)) * len(zi[s : s + bs]) for s in range(0, len(rows), bs)
    ]
    return sum(losses) / len(rows)


@pytest.fixture(scope="module")
def rotated_fit():
    img, txt = _rotated()
    return img, txt, fit_text_aligner(img, txt, PATIENTS, ROTATED_CFG, seed=0)


@pytest.mark.parametrize("rank", [0, 4])
def test_the_untrained_model_is_zero_shot_omiclip(rank):
    rng = np.random.default_rng(1)
    img = 3 * rng.standard_normal((50, 24)).astype(np.float32)  # not normalised: the model normalises
    txt = rng.standard_normal((50, 24)).astype(np.float32)
    cfg = TextAlignerConfig(image_dim=24, text_dim=24, rank=rank)
    a = TextAligner(cfg, _new_model(cfg))
    assert a.dim == 24
    np.testing.assert_allclose(a.project_images(img), l2_normalize(img), atol=1e-6)
    np.testing.assert_allclose(a.project_text(txt), l2_normalize(txt), atol=1e-6)
    assert float(a.model.logit_scale.detach().exp()) == pytest.approx(100)  # 1 / temperature 0.01


def test_fine_tuning_beats_zero_shot_retrieval_on_held_out_patients(rotated_fit):
    img, txt, a = rotated_fit
    v = a.val_rows
    zero_shot = _top1(l2_normalize(img[v]), l2_normalize(txt[v]))
    tuned = _top1(a.project_images(img[v]), a.project_text(txt[v]))
    assert zero_shot < 0.05
    assert tuned > 0.8
    assert a.best_epoch > 0
    # epoch 0 is the zero-shot model on the same validation rows, and the kept model beats it there
    assert a.history[0]["epoch"] == 0
    assert a.history[0]["val_loss"] == pytest.approx(
        _val_loss(TextAligner(a.config, _new_model(a.config)), img, txt, v), rel=1e-5
    )
    assert a.history[a.best_epoch]["val_loss"] == pytest.approx(_val_loss(a, img, txt, v), rel=1e-4, abs=1e-5)
    assert a.history[a.best_epoch]["val_loss"] < a.history[0]["val_loss"]
    assert [h["epoch"] for h in a.history] == list(range(len(a.history)))


def test_validation_holds_out_whole_patients(rotated_fit):
    _, _, a = rotated_fit
    assert 1 <= len(a.val_groups) < 6
    assert set(PATIENTS[a.val_rows]) == set(a.val_groups)
    np.testing.assert_array_equal(a.val_rows, np.flatnonzero(np.isin(PATIENTS, a.val_groups)))
    # without groups: random rows, about val_fraction of them
    img, txt = _rotated(d=8)
    b = fit_text_aligner(img, txt, None, TextAlignerConfig(max_epochs=1), seed=0)
    assert b.val_groups == ()
    assert len(b.val_rows) == round(0.2 * len(img))
    assert len(set(PATIENTS[b.val_rows])) == 6


def test_already_aligned_pairs_keep_the_identity(caplog):
    rng = np.random.default_rng(2)
    img = l2_normalize(rng.standard_normal((360, 64)))
    cfg = TextAlignerConfig(lr=1e-3, weight_decay=0.1, batch_size=64, max_epochs=4, patience=4)
    with caplog.at_level("WARNING", logger="embedstore.text_aligner"):
        a = fit_text_aligner(img, img.copy(), PATIENTS[:360], cfg, seed=0)
    assert a.best_epoch == 0
    assert len(a.history) == 5
    assert all(h["val_loss"] >= a.history[0]["val_loss"] - 1e-4 for h in a.history[1:])
    # the very weights of the untrained model (weight decay alone would have moved the temperature)
    fresh = _new_model(a.config).state_dict()
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    np.testing.assert_allclose(a.project_images(img), img, atol=1e-6)
    np.testing.assert_allclose(a.project_text(img), img, atol=1e-6)
    assert any("no epoch beat the zero-shot validation loss" in r.getMessage() for r in caplog.records)


def test_save_load_round_trip_and_kind_check(tmp_path, rotated_fit):
    img, txt, _ = rotated_fit
    geometry = {"mpp": 0.5, "size_px": 224, "resample": "lanczos"}
    cfg = TextAlignerConfig(
        lr=1e-2,
        max_epochs=3,
        encoder_name="omiclip",
        encoder_fingerprint="img123",
        text_fingerprint="txt456",
        geometry=geometry,
    )
    a = fit_text_aligner(img, txt, PATIENTS, cfg, seed=0)
    assert a.best_epoch > 0  # not the identity: the round trip carries trained weights
    a.save(tmp_path / "ta")
    assert sorted(p.name for p in (tmp_path / "ta").iterdir()) == ["config.json", "model.safetensors"]
    b = load_text_aligner(tmp_path / "ta")
    assert b.config == a.config
    assert b.config.geometry == geometry
    assert b.config.text_fingerprint == "txt456"
    np.testing.assert_array_equal(b.project_images(img), a.project_images(img))
    np.testing.assert_array_equal(b.project_text(txt), a.project_text(txt))
    assert b.history == []
    assert b.best_epoch is None

    e_img, expr, _ = seeded_embeddings(n=64)
    save_aligner(fit(e_img, expr, None, AlignerConfig(proj_dim=8, max_epochs=1), seed=0), tmp_path / "bleep")
    with pytest.raises(BadInput, match=r"bleep: holds an embedstore 'aligner' checkpoint, not a 'text_aligner'") as e:
        load_text_aligner(tmp_path / "bleep")
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match=r"ta/config.json: not an embedstore aligner config") as e:
        load_aligner(tmp_path / "ta")
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput):  # a BLEEP aligner folder is not overwritten by a text aligner
        save_text_aligner(a, tmp_path / "bleep")
    assert load_aligner(tmp_path / "bleep").config.proj_dim == 8


def test_weights_that_do_not_match_the_config_name_the_file(tmp_path, rotated_fit):
    _, _, a = rotated_fit
    a.save(tmp_path / "ta")
    cfg_path = tmp_path / "ta" / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"rank": 0', '"rank": 2'))
    with pytest.raises(BadInput, match=r"ta/model.safetensors: weights do not match .*config.json"):
        load_text_aligner(tmp_path / "ta")


def _one_line(match: str, fn, *args, **kw):
    with pytest.raises(BadInput, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line(rotated_fit):
    img, txt, a = rotated_fit
    _one_line(r"image embeddings \(600 rows\), text embeddings \(599\)", fit_text_aligner, img, txt[:-1])
    _one_line(r"and groups \(5\) must have the same rows", fit_text_aligner, img, txt, PATIENTS[:5])
    nan = txt.copy()
    nan[3, 2] = np.nan
    _one_line(r"text embeddings: contains NaN or infinite values", fit_text_aligner, img, nan)
    _one_line(r"text embeddings: contains NaN", a.project_text, nan)
    _one_line(r"image embeddings: expected a 2-d array", a.project_images, img[0])
    _one_line(r"image embeddings: has 31 columns but the text aligner was trained on 32", a.project_images, img[:, :31])
    _one_line(r"text embeddings: has 33 columns", a.project_text, np.ones((2, 33), np.float32))
    _one_line(
        r"config image_dim = 16 but the embeddings have 32 columns",
        fit_text_aligner,
        img,
        txt,
        None,
        TextAlignerConfig(image_dim=16),
    )
    _one_line(
        r"rank = 4 needs image and text embeddings of one dimension",
        fit_text_aligner,
        img,
        txt[:, :16],
        None,
        TextAlignerConfig(rank=4),
    )
    _one_line(
        r"text aligner config: unknown key\(s\) proj_dim; valid keys are", TextAlignerConfig.from_dict, {"proj_dim": 8}
    )
    _one_line(
        r"temperature = 0.001: must be a finite number >= 0.01 and <= 1",
        TextAlignerConfig.from_dict,
        {"temperature": 0.001},
    )
    _one_line(r"tile geometry", TextAlignerConfig, geometry={"mpp": 0.5})
    _one_line(r"needs at least 2 rows", fit_text_aligner, img[:1], txt[:1])


@pytest.mark.parametrize("width", [48, 512])
def test_a_rows_projection_does_not_depend_on_its_batch(width):
    cfg = TextAlignerConfig(image_dim=width, text_dim=width)
    model = _new_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # moved away from the identity, so the matrix products matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a = TextAligner(cfg, model)
    x = np.random.default_rng(0).standard_normal((300, width)).astype(np.float32)
    whole_img, whole_txt = a.project_images(x), a.project_text(x)
    assert not np.allclose(whole_img, l2_normalize(x), atol=1e-3)
    for batch in (1, 3, 7, 19, 64):
        np.testing.assert_array_equal(a.project_images(x, batch_size=batch), whole_img)
        np.testing.assert_array_equal(a.project_text(x, batch_size=batch), whole_txt)
    np.testing.assert_array_equal(a.project_images(x[:5]), whole_img[:5])
    # inputs are L2-normalised before the adapter (the bias would otherwise make the scale matter)
    np.testing.assert_allclose(a.project_images(3 * x), whole_img, atol=1e-6)


def test_different_dims_get_plain_projections_to_the_smaller():
    img, txt = _rotated(d=16)
    a = fit_text_aligner(img, txt[:, :12], PATIENTS, TextAlignerConfig(lr=1e-2, max_epochs=2), seed=0)
    assert (a.config.image_dim, a.config.text_dim, a.dim) == (16, 12, 12)
    z = a.project_images(img)
    assert z.shape == (600, 12)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, rtol=1e-5)
    assert a.project_text(txt[:, :12]).shape == (600, 12)


def test_fit_is_seeded(rotated_fit):
    img, txt, a = rotated_fit
    cfg = TextAlignerConfig(**{**ROTATED_CFG.to_dict(), "max_epochs": a.best_epoch, "patience": 100})
    b = fit_text_aligner(img, txt, PATIENTS, cfg, seed=0)
    np.testing.assert_array_equal(b.project_images(img), a.project_images(img))
    assert b.config.dim == 32
    assert math.isfinite(b.history[-1]["val_loss"])


def test_importing_the_module_leaves_torch_unloaded():
    code = "import embedstore.text_aligner, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
