"""Encoder registry, loaders, fingerprints and the built-in features.

Every registered encoder whose weights are available offline (built-in, tiny random test variants,
EfficientNet-Lite0 from its package) is run through the same contract; gated encoders are checked
for their one-line error and, on the meta device, for the shape of their architecture.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from encoder_contracts import check_encoder_contract, he_tile

import embedstore.encoders as enc_mod
from embedstore import _schema
from embedstore.encoders import (
    DEFAULT_ENCODER,
    EncoderCfg,
    create_encoder,
    get_encoder_cfg,
    list_encoders,
    make_transform,
    register_encoder,
)
from embedstore.encoders._registry import ENCODERS
from embedstore.errors import BadInput, MissingDependency, MissingWeights

OFFLINE = [e.name for e in ENCODERS if e.metadata["hf_hub_id"] is None]  # builtin, test-*, efficientnet-lite0
HUB = [e.name for e in ENCODERS if e.metadata["hf_hub_id"] is not None]
TEST_VARIANTS = [n for n in OFFLINE if n.startswith("test-")]


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """Three different synthetic H&E tiles of 224 px."""
    return np.stack([he_tile(0.05, 0.25), he_tile(0.15, 0.4, nuclei=12, seed=1), he_tile(0.3, 0.1, nuclei=30, seed=2)])


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {}


def _get(encoders: dict, name: str):
    if name not in encoders:
        encoders[name] = create_encoder(name)
    return encoders[name]


@pytest.fixture(scope="module")
def her2st_tiles(shared_data) -> np.ndarray:
    """Two 224 px regions of a real H&E section (her2st C2) at ~1.4 µm/px: tissue, and background glass."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a 92 Mpx JPEG we trust
        img = Image.open(shared_data / "her2st" / "data" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg")
        img.draft("RGB", (img.width // 2, img.height // 2))  # decode at half size: 4x less work
        tissue = np.asarray(img.crop((3400, 1700, 3624, 1924)).convert("RGB"))
        glass = np.asarray(img.crop((0, 0, 224, 224)).convert("RGB"))
    return np.stack([tissue, glass])


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An offline, empty Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf"


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_family_with_metadata():
    df = list_encoders()
    assert {"family", "dim", "license", "gated", "hf_hub_id", "weights"} <= set(df.columns)
    expected = {
        "builtin": 128,
        "uni": 1024,
        "uni2-h": 1536,
        "conch": 512,
        "virchow2": 2560,
        "h-optimus-0": 1536,
        "h-optimus-1": 1536,
        "phikon-v2": 1024,
        "prov-gigapath": 1536,
        "omiclip": 768,
        "efficientnet-lite0": 1280,
        "test-vit": 64,
        "test-virchow": 64,
        "test-uni2": 64,
        "test-openclip": 64,
    }
    assert {k: int(df.loc[k, "dim"]) for k in expected} == expected
    assert df.loc["uni2-h", "hf_hub_id"] == "MahmoodLab/UNI2-h"
    assert bool(df.loc["virchow2", "gated"]) is True
    assert DEFAULT_ENCODER == "builtin"
    for name in df.index:
        assert get_encoder_cfg(name).dim == df.loc[name, "dim"]


def test_register_twice_is_an_error():
    with pytest.raises(BadInput, match=r"^encoder 'test-vit': already registered; choose another name$"):
        register_encoder("test-vit", cfg=get_encoder_cfg("test-vit"))(lambda weights=None: None)


def test_register_checks_metadata_against_cfg():
    cfg = EncoderCfg(name="x-new", family="timm", architecture="vit_small_patch16_224", dim=8)
    with pytest.raises(BadInput, match=r"encoder 'x-new': dim=9 disagrees with its cfg \(8\)"):
        register_encoder("x-new", cfg=cfg, dim=9)
    assert "x-new" not in ENCODERS


def test_unknown_name_lists_close_matches():
    with pytest.raises(BadInput, match=r"^encoder 'uni3': not registered; did you mean uni, "):
        create_encoder("uni3")


def test_path_as_name_suggests_both_prefixes():
    with pytest.raises(BadInput, match=r"local-dir:/path/to/folder' or weights='hf-hub:org/repo'"):
        create_encoder("/data/models/uni")


def test_unknown_keyword_is_an_error():
    with pytest.raises(
        BadInput, match=r"^encoder 'uni': unexpected keyword arguments \['img_size'\]; it accepts only weights=$"
    ):
        create_encoder("uni", img_size=448)


def test_import_and_listing_stay_cheap():
    # importing the package, listing the registry (API and CLI) and reading a cfg load no model code
    code = (
        "import sys, embedstore, embedstore.encoders as e; from embedstore.cli import app; "
        "from typer.testing import CliRunner; "
        "e.list_encoders(); e.get_encoder_cfg('uni2-h'); r = CliRunner().invoke(app, ['encoders']); "
        "assert r.exit_code == 0 and 'uni2-h' in r.output, r.output; "
        "heavy = ('torch', 'timm', 'open_clip', 'huggingface_hub'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in "
        "('embedstore.encoders.timm_hub', 'embedstore.encoders.openclip', 'embedstore.encoders.imagenet', "
        "'embedstore.encoders.external')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_encoders_satisfy_the_contract(name, tiles, encoders):
    enc = _get(encoders, name)
    out = check_encoder_contract(enc, tiles)
    # different tissue gives different embeddings
    assert not np.allclose(out[0], out[1])
    assert not np.allclose(out[1], out[2])
    # tiles of another size are resized to the model's input
    big = np.repeat(np.repeat(tiles[:1], 2, axis=1), 2, axis=2)
    assert enc.encode(big).shape == (1, enc.dim)


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_test_variants_are_reproducible_random_models(name, tiles, encoders):
    a = _get(encoders, name)
    b = create_encoder(name)
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.encode(tiles[:1]), b.encode(tiles[:1]))
    assert a.metadata()["weights"] == "random-init(seed=0)"


@pytest.mark.parametrize("name", [n for n in OFFLINE if n != "builtin"])
def test_model_classes_live_at_module_level(name, encoders):
    # a class defined inside a function cannot be found by its name (pickling, torch.compile caches, docs)
    cls = type(_get(encoders, name).model)
    assert "<locals>" not in cls.__qualname__
    assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls


def test_transform_resizes_crops_and_normalises():
    cfg = EncoderCfg(
        name="t",
        family="timm",
        architecture="a",
        dim=1,
        input_size=224,
        resize_size=256,
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.6, 0.7),
    )
    x = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    got = make_transform(cfg)(x).numpy()
    ref = (x[:, 16:240, 16:240].astype(np.float64) / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(got, ref.transpose(0, 3, 1, 2), rtol=0, atol=1e-5)
    with pytest.raises(BadInput, match=r"^t: expected uint8 RGB tiles of shape \(B, H, W, 3\), got ndarray float64"):
        make_transform(cfg)(x.astype(float))


def test_centre_crop_takes_torchvisions_offset():
    # an odd margin (235 -> 224: 5.5 px) is split as torchvision's CenterCrop splits it
    import torch
    from torchvision.transforms.functional import center_crop

    cfg = EncoderCfg(name="t", family="timm", architecture="a", dim=1, resize_size=235, mean=(0, 0, 0), std=(1, 1, 1))
    x = np.random.default_rng(1).integers(0, 256, (1, 235, 235, 3), dtype=np.uint8)
    ref = center_crop(torch.from_numpy(x).permute(0, 3, 1, 2), [224, 224]).numpy() / 255
    np.testing.assert_allclose(make_transform(cfg)(x).numpy(), ref, rtol=0, atol=1e-6)


def test_device_and_precision_choices(encoders):
    import torch

    enc = _get(encoders, "test-vit")
    assert enc.to("auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert enc.to("cpu", "auto").precision == "fp32"
    with pytest.raises(BadInput, match=r"^test-vit: precision 'fp8' is not known; use auto, fp32, fp16 or bf16$"):
        enc.to("cpu", "fp8")


# --------------------------------------------------------------------------- weights: hub, local folders, files


def _save_safetensors(module, folder: Path, prefix: str = "", bump: float = 0.0) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {prefix + k: v.detach().clone().contiguous() + bump for k, v in module.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.mark.parametrize(
    ("name", "native", "prefix"),
    [("test-vit", "trunk", ""), ("test-virchow", "trunk", ""), ("test-openclip", "visual", "visual.")],
)
def test_weights_round_trip_through_local_dir_and_hub(
    name, native, prefix, tiles, encoders, tmp_path, monkeypatch, empty_hub
):
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    rand = _get(encoders, name)
    file_a = _save_safetensors(getattr(rand.model, native), tmp_path / "a", prefix)
    from_dir = create_encoder(name, weights=f"local-dir:{tmp_path / 'a'}")
    np.testing.assert_allclose(from_dir.encode(tiles), rand.encode(tiles), atol=1e-6)
    expected_fp = _schema.fingerprint(hashlib.sha256(file_a.read_bytes()).hexdigest(), from_dir.cfg.preprocessing())
    assert from_dir.fingerprint == expected_fp != rand.fingerprint
    assert create_encoder(name, weights=str(file_a)).fingerprint == expected_fp  # a direct file path

    # the hub path: hf_hub_download gets local_files_only=True (HF_HUB_OFFLINE=1) and returns the cached file
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("local_files_only")))
        if filename == "model.safetensors":
            return str(file_a)
        msg = "not cached"
        raise hf_errors.LocalEntryNotFoundError(msg)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    from_hub = create_encoder(name, weights="hf-hub:embedstore/tiny")
    assert from_hub.fingerprint == expected_fp
    assert from_hub.metadata()["weights"] == "hf-hub:embedstore/tiny"
    assert ("embedstore/tiny", "model.safetensors", True) in calls

    # other bytes, other fingerprint and other embeddings
    _save_safetensors(getattr(rand.model, native), tmp_path / "b", prefix, bump=0.01)
    other = create_encoder(name, weights=f"local-dir:{tmp_path / 'b'}")
    assert other.fingerprint != expected_fp
    assert not np.allclose(other.encode(tiles), from_dir.encode(tiles))


def test_loki_style_checkpoint_loads_with_weights_only(tiles, encoders, tmp_path):
    import torch

    rand = _get(encoders, "test-openclip")
    # open_clip training checkpoints nest the DDP state dict under "state_dict", with a text tower beside it
    sd = {"module.visual." + k: v for k, v in rand.model.visual.state_dict().items()}
    sd["module.text.token_embedding.weight"] = torch.zeros(4, 2)
    (tmp_path / "loki").mkdir()
    torch.save({"epoch": 3, "name": "x", "state_dict": sd}, tmp_path / "loki" / "checkpoint.pt")
    enc = create_encoder("test-openclip", weights=f"local-dir:{tmp_path / 'loki'}")
    np.testing.assert_allclose(enc.encode(tiles), rand.encode(tiles), atol=1e-6)


class _NotAStateDict:
    pass


def test_pickled_objects_are_refused(tmp_path):
    import torch

    torch.save({"model": _NotAStateDict()}, tmp_path / "evil.pt")
    with pytest.raises(MissingWeights, match=r"evil.pt: cannot read weights \(UnpicklingError\); pass a safetensors"):
        create_encoder("test-vit", weights=str(tmp_path / "evil.pt"))


def test_weights_of_another_architecture_are_refused(encoders, tmp_path):
    _save_safetensors(_get(encoders, "test-vit").model.trunk, tmp_path / "vit")
    with pytest.raises(BadInput, match=r"model.safetensors: weights do not fit test-virchow \("):
        create_encoder("test-virchow", weights=f"local-dir:{tmp_path / 'vit'}")


def test_bad_weight_addresses(tmp_path):
    with pytest.raises(MissingWeights, match=r"nope: not a folder; pass weights=local-dir:/path/to/folder"):
        create_encoder("test-vit", weights=f"local-dir:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeights, match=r"empty: no weight file for test-vit \(looked for model.safetensors, "):
        create_encoder("test-vit", weights=f"local-dir:{tmp_path / 'empty'}")
    with pytest.raises(
        MissingWeights,
        match=r"^/no/such/uni.bin: no such weight file; pass weights='local-dir:/path/to/folder' for a folder or weights='hf-hub:org/repo'",
    ):
        create_encoder("uni", weights="/no/such/uni.bin")
    with pytest.raises(BadInput, match=r"^test-vit: weights='latest' is not understood"):
        create_encoder("test-vit", weights="latest")


@pytest.mark.parametrize("name", HUB)
def test_hub_encoders_fail_in_one_line_without_weights(name, empty_hub):
    cfg = get_encoder_cfg(name)
    if cfg.family == "conch":
        with pytest.raises(
            MissingDependency,
            match=r"^conch is needed for encoder conch .*pip install git\+https://github.com/Mahmoodlab/CONCH.git$",
        ):
            create_encoder(name)
        return
    if cfg.family == "hf_transformers":
        with pytest.raises(
            MissingDependency, match=r"^transformers is needed for encoder phikon-v2; pip install transformers$"
        ):
            create_encoder(name)
        return
    with pytest.raises(MissingWeights) as info:
        create_encoder(name)
    repo = cfg.hf_hub_id
    assert str(info.value) == (
        f"{name}: weights for {repo} are not available (offline (HF_HUB_OFFLINE=1) and not in the hub cache); "
        f"set HF_TOKEN (or `hf auth login`) and accept the licence at https://huggingface.co/{repo}, "
        "or pass weights=local-dir:/path/to/folder"
    )


def test_gated_error_names_the_reason(monkeypatch, empty_hub):
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    def gated(repo_id, filename, **kw):
        # GatedRepoError needs an HTTP response to construct; build it bare, as the hub client would raise it
        err = hf_errors.GatedRepoError.__new__(hf_errors.GatedRepoError)
        Exception.__init__(err, f"Access to model {repo_id} is restricted")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(
        MissingWeights,
        match=r"^uni2-h: weights for MahmoodLab/UNI2-h are not available \(gated repository and this account has no access\); set HF_TOKEN",
    ):
        create_encoder("uni2-h")


# --------------------------------------------------------------------------- real architectures on the meta device

_PARAMS_M = {  # published sizes, millions of parameters
    "uni": (300, 310),
    "uni2-h": (675, 690),
    "virchow2": (625, 640),
    "h-optimus-0": (1125, 1140),
    "h-optimus-1": (1125, 1140),
    "prov-gigapath": (1125, 1140),
}


@pytest.mark.parametrize("name", sorted(_PARAMS_M))
def test_real_timm_configs_have_the_published_shape(name):
    import torch

    from embedstore.encoders.timm_hub import ARCHITECTURE_KWARGS, build_timm_model

    cfg = get_encoder_cfg(name)
    model = build_timm_model(cfg, ARCHITECTURE_KWARGS[name](), device="meta")
    with torch.device("meta"):
        out = model(torch.empty(2, 3, cfg.input_size, cfg.input_size))
    assert tuple(out.shape) == (2, cfg.dim)
    lo, hi = _PARAMS_M[name]
    assert lo < sum(p.numel() for p in model.parameters()) / 1e6 < hi


def test_real_omiclip_config_has_the_published_shape():
    import torch

    from embedstore.encoders.openclip import build_openclip_model

    cfg = get_encoder_cfg("omiclip")
    model = build_openclip_model(cfg, device="meta")
    with torch.device("meta"):
        out = model(torch.empty(2, 3, 224, 224))
    assert tuple(out.shape) == (2, 768)


# --------------------------------------------------------------------------- EfficientNet-Lite0: real weights offline


def test_efficientnet_lite0_real_weights(her2st_tiles, encoders):
    import torch

    from embedstore.encoders.imagenet import packaged_weights_file

    enc = _get(encoders, "efficientnet-lite0")
    path = packaged_weights_file()
    pre = {k: (list(v) if isinstance(v, tuple) else v) for k, v in json.loads(json.dumps(enc.cfg.to_dict())).items()}
    pre = {
        k: pre[k]
        for k in (
            "architecture",
            "input_size",
            "resize_size",
            "mean",
            "std",
            "interpolation",
            "target_mpp",
            "pooling",
            "normalize",
            "dim",
        )
    }
    assert enc.fingerprint == _schema.fingerprint(hashlib.sha256(path.read_bytes()).hexdigest(), pre)

    # two regions of a real H&E section and the first one again
    a, b = her2st_tiles
    out = enc.encode(np.stack([a, b, a]))
    np.testing.assert_array_equal(out[0], out[2])
    cos = out[0] @ out[1] / (np.linalg.norm(out[0]) * np.linalg.norm(out[1]))
    assert cos < 0.95

    # reference computed another way: NumPy normalisation, the package's own feature extractor
    x = (a.astype(np.float32) / 255 - np.array(enc.cfg.mean, np.float32)) / np.array(enc.cfg.std, np.float32)
    with torch.inference_mode():
        ref = enc.model.net.extract_features(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())).mean(dim=(2, 3))
    np.testing.assert_allclose(out[0], ref[0].numpy(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the built-in encoder


def test_builtin_recovers_stain_amounts_and_counts_nuclei():
    from embedstore.encoders.builtin import _OD_LUT, FEATURE_NAMES, RGB_FROM_HED, builtin_features

    counts = [0, 5, 10, 20, 40]
    t = np.stack([he_tile(0.1, 0.3, nuclei=n, seed=n) for n in counts])
    f = builtin_features(t)
    col = {n: f[:, i] for i, n in enumerate(FEATURE_NAMES)}
    # reference: per-pixel least-squares unmixing of the optical density, then the mean
    od = _OD_LUT[t].reshape(-1, 3).astype(np.float64)
    conc = np.linalg.lstsq(RGB_FROM_HED.T, od.T, rcond=None)[0]  # solve od = conc @ RGB_FROM_HED
    ref = np.clip(conc.T.reshape(len(t), -1, 3), 0, None).mean(axis=1)
    np.testing.assert_allclose(col["h_mean"], ref[:, 0], atol=0.01)
    np.testing.assert_allclose(col["e_mean"], ref[:, 1], atol=0.01)
    np.testing.assert_allclose(col["e_mean"], 0.3, atol=0.01)
    # blobs at the nuclear scale: about one per drawn nucleus (per 1000 px of the 112 px level)
    np.testing.assert_allclose(col["blob_count_s2.4"] * 112 * 112 / 1000, counts, atol=2)
    assert np.all(np.diff(col["nuclear_frac_0.35"]) > 0)


def test_builtin_is_finite_on_blank_and_black_tiles():
    enc = create_encoder("builtin")
    t = np.stack([np.full((224, 224, 3), 255, np.uint8), np.zeros((224, 224, 3), np.uint8)])
    out = enc.encode(t)
    assert np.isfinite(out).all()
    assert out.shape == (2, 128)
    assert enc.forward(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 128)


def test_builtin_separates_tissue_from_background(her2st_tiles):
    from embedstore.encoders.builtin import FEATURE_NAMES

    f = create_encoder("builtin").encode(her2st_tiles)
    i = FEATURE_NAMES.index("tissue_frac")
    assert f[0, i] > 0.5 > f[1, i]
    assert f[0, FEATURE_NAMES.index("h_mean")] > 2 * f[1, FEATURE_NAMES.index("h_mean")]


def test_builtin_fingerprint_comes_from_version_and_parameters():
    from embedstore.encoders import builtin

    enc = create_encoder("builtin")
    digest = f"{builtin.VERSION}:" + json.dumps(builtin.PARAMS, sort_keys=True)
    assert enc.fingerprint == _schema.fingerprint(digest, builtin.BUILTIN_CFG.preprocessing())
    assert enc.model is None
    with pytest.raises(BadInput, match=r"^builtin: has no weights"):
        create_encoder("builtin", weights="local-dir:/x")


def test_generic_timm_and_open_clip_names(empty_hub):
    with pytest.raises(
        MissingWeights, match=r"^timm:resnet18: weights for timm/resnet18.a1_in1k are not available \(offline"
    ):
        create_encoder("timm:resnet18")
    with pytest.raises(
        BadInput, match=r"^timm:vit_smal_patch16_224: not a timm architecture; did you mean vit_small_patch16_224"
    ):
        create_encoder("timm:vit_smal_patch16_224")
    with pytest.raises(BadInput, match=r"^open_clip:ViT-B-61: not an open_clip model config; did you mean "):
        create_encoder("open_clip:ViT-B-61")
    with pytest.raises(MissingWeights, match=r"^open_clip:ViT-B-32: weights for timm/"):
        create_encoder("open_clip:ViT-B-32")


def test_generic_timm_preprocesses_as_timm_resolves(tmp_path):
    """``timm:<arch>`` takes timm's own data config; its transform equals timm's create_transform."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    # tinynet_d: 152 px at crop_pct 0.875, so timm resizes to floor(173.7) = 173, not round() = 174
    trunk = timm.create_model("tinynet_d.in1k", pretrained=False, num_classes=0).eval()
    (tmp_path / "w").mkdir()
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(tmp_path / "w" / "model.safetensors"))
    enc = create_encoder("timm:tinynet_d", weights=f"local-dir:{tmp_path / 'w'}")
    resolved = timm.data.resolve_model_data_config(trunk)
    assert (enc.cfg.input_size, enc.cfg.resize_size) == (152, 173)
    assert enc.cfg.mean == tuple(resolved["mean"])
    assert enc.cfg.std == tuple(resolved["std"])
    assert enc.cfg.interpolation == resolved["interpolation"]
    timm_tf = timm.data.create_transform(**resolved)
    for size, atol in ((173, 1e-5), (224, 1.5 / 255 / min(enc.cfg.std)), (120, 1.5 / 255 / min(enc.cfg.std))):
        tile = he_tile(0.15, 0.4, size=size, nuclei=12, seed=1)
        ref = timm_tf(Image.fromarray(tile)).numpy()
        # same size: only the crop and the normalisation; other sizes: PIL and torch resampling agree within ~1 level
        np.testing.assert_allclose(enc.transform()(tile[None]).numpy()[0], ref, rtol=0, atol=atol)
    with torch.inference_mode():
        ref_out = trunk(torch.from_numpy(ref[None]))
    np.testing.assert_allclose(enc.forward(torch.from_numpy(ref[None])), ref_out.numpy(), rtol=1e-5, atol=1e-5)
    # the resolved preprocessing is what the fingerprint hashes
    weights = hashlib.sha256((tmp_path / "w" / "model.safetensors").read_bytes()).hexdigest()
    preprocessing = {
        "architecture": "tinynet_d",
        "input_size": 152,
        "resize_size": 173,
        "mean": list(resolved["mean"]),
        "std": list(resolved["std"]),
        "interpolation": resolved["interpolation"],
        "target_mpp": 0.5,
        "pooling": "token",
        "normalize": False,
        "dim": trunk.num_features,
    }
    assert enc.fingerprint == _schema.fingerprint(weights, preprocessing)


def test_openclip_models_come_from_its_public_api():
    from embedstore.encoders import openclip

    tree = ast.parse(Path(openclip.__file__).read_text())
    private = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("open_clip."))
        or (isinstance(node, ast.Attribute) and ast.unparse(node.value) == "open_clip" and node.attr.startswith("_"))
    ]
    assert private == []


def test_module_reexports():
    assert enc_mod.create_encoder is create_encoder
