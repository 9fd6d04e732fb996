"""The text tower of open_clip CLIP/CoCa encoders and the gene-sentence embeddings it writes to a store.

Everything runs the real code path with ``test-openclip``: a real open_clip CoCa
(``coca_ViT-B-32`` at toy size, open_clip's own tokenizer), weights loaded from a fake Hugging
Face hub cache laid out as the hub client lays it out, stores built by ``embed`` and
``write_spots``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import embedstore as es
from embedstore.encoders import create_encoder, create_text_encoder, get_encoder_cfg
from embedstore.errors import BadInput, FingerprintMismatch, MissingWeights
from embedstore.sentences import read_sentences
from embedstore.store import open_store
from embedstore.text_embedding import (
    check_text_pairs,
    embed_text,
    has_text_tower,
    read_text_embeddings,
    text_metadata,
    text_table,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENC = "test-openclip"
TEXT = text_table(ENC)
SENTENCES = ["ERBB2 GRB7 KRT19", "CD3E CD8A PTPRC", "GENE001 GENE002", "ERBB2 GRB7 KRT19 MKI67"]


class _Killed(BaseException):
    """What a SIGKILL does to the loop: nothing below catches it."""


def _full(seed: int = 0):
    """The whole tiny CoCa (both towers and the decoder), as a training run of it would hold it."""
    from embedstore.encoders.openclip import build_openclip_full

    return build_openclip_full(dataclasses.replace(get_encoder_cfg(ENC), seed=seed))


def _own_text(model, texts: list[str]) -> np.ndarray:
    """The model's own ``encode_text``, normalised, through open_clip's tokenizer of its config."""
    import open_clip
    import torch

    with torch.inference_mode():
        return model.encode_text(open_clip.get_tokenizer("coca_ViT-B-32")(texts), normalize=True).numpy()


def _hub_snapshot(cache: Path, repo: str, filename: str) -> Path:
    """``cache/models--org--repo/snapshots/<rev>/filename``'s folder, with ``refs/main`` naming it."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "snapshots" / rev).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return base / "snapshots" / rev / filename


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``), empty."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _spots_store(path: Path, n_slides: int = 2, n_spots: int = 14, empty: int = 0) -> Path:
    """A store of ST sections written by ``write_spots`` only; the last ``empty`` spots of each express nothing."""
    rng = np.random.default_rng(3)
    genes = [f"GENE{g:03d}" for g in range(25)]
    st = open_store(path, read_only=False)
    for i in range(n_slides):
        counts = rng.poisson(3.0, size=(n_spots, len(genes)))
        if empty:
            counts[-empty:] = 0
        xy = rng.uniform(100, 900, size=(n_spots, 2))
        st.write_spots("c", f"s{i}", [f"{i}-{j}" for j in range(n_spots)], xy, counts, genes)
    return path


def _text_table(store: Path):
    meta, vec = read_text_embeddings(store, ENC)
    order = np.lexsort(
        [np.asarray(meta.column("spot_id").to_pylist()), np.asarray(meta.column("slide_id").to_pylist())]
    )
    return meta.take(pa.array(order)), vec[order]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """Two tiny ST sections whose spot tiles the tiny CoCa's image tower embedded (112 px tiles)."""
    from embedstore.testing import make_synthetic_cohort

    root = tmp_path_factory.mktemp("text")
    cohort = make_synthetic_cohort(root / "cohort", n_slides=2, n_spots=14, n_genes=20, seed=0, width=1000, height=1000, mpp=1.0)  # fmt: skip
    path = root / "store"
    assert es.embed(cohort.root, path, ENC, cohort="syn", size_px=112, workers=0, progress=False).ok
    return path


# --------------------------------------------------------------------------- the tiny CoCa and its towers


def test_test_variant_is_a_real_coca_and_its_image_tower_is_unchanged():
    import open_clip

    full = _full()
    assert isinstance(full, open_clip.CoCa)  # open_clip.coca_model.CoCa
    assert full.text.vocab_size == 49408
    assert full.text.context_length == 76
    a, b = create_encoder(ENC), create_encoder(ENC)
    tiles = np.random.default_rng(0).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    out = a.encode(tiles)
    assert out.shape == (3, 64)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out, b.encode(tiles))  # seeded: two builds agree
    assert a.fingerprint == b.fingerprint


def test_text_tower_encodes_unit_vectors_deterministically():
    t1, t2 = create_text_encoder(ENC), create_text_encoder(ENC)
    v = t1.encode(SENTENCES)
    assert v.shape == (len(SENTENCES), 64)
    assert v.dtype == np.float32
    assert t1.dim == 64
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(v, t2.encode(SENTENCES))  # seeded: two builds agree exactly
    np.testing.assert_allclose(v, t2.encode(SENTENCES, batch_size=3), atol=1e-6)  # batching changes only rounding
    assert t1.fingerprint == t2.fingerprint != t1.image_fingerprint
    # different sentences, different vectors (a shared prefix is not enough)
    sims = v @ v.T
    assert (sims[~np.eye(len(v), dtype=bool)] < 0.9999).all()
    assert t1.encode([]).shape == (0, 64)
    meta = t1.metadata()
    assert meta["family"] == "open_clip-text"
    assert meta["image_fingerprint"] == create_encoder(ENC).fingerprint
    assert meta["text"]["tokenizer"] == "coca_ViT-B-32"
    assert meta["text"]["context_length"] == 76
    with pytest.raises(BadInput, match="list of texts"):
        t1.encode("ERBB2 GRB7")


def test_only_open_clip_encoders_have_a_text_tower():
    assert has_text_tower("omiclip")
    assert has_text_tower(ENC)
    assert has_text_tower("open_clip:ViT-B-32")
    assert not has_text_tower("builtin")
    assert not has_text_tower("uni")
    assert not has_text_tower("nope")
    for name in ("builtin", "uni", "test-vit"):
        with pytest.raises(BadInput, match=rf"^encoder {name} has no text tower; .* such as omiclip$"):
            create_text_encoder(name)
    with pytest.raises(BadInput, match="not registered"):
        create_text_encoder("omiclipp")


def test_plain_clip_text_keys_are_top_level(tmp_path):
    """``open_clip:<arch>`` of a plain CLIP: its text keys (token_embedding, transformer, ...) are top-level and load strictly."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    arch = "ViT-S-32-alt"  # open_clip's smallest plain-CLIP text tower (width 256)
    torch.manual_seed(5)
    clip = open_clip.create_model(arch, pretrained=None, pretrained_text=False).eval()
    text_keys = {k: v.contiguous() for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    assert "token_embedding.weight" in text_keys
    assert "transformer.resblocks.0.attn.in_proj_weight" in text_keys
    save_file(text_keys, str(tmp_path / "clip.safetensors"))
    enc = create_text_encoder(f"open_clip:{arch}", weights=str(tmp_path / "clip.safetensors"))
    texts = ["a photo of tissue", "ERBB2 GRB7"]
    with torch.inference_mode():
        want = clip.encode_text(open_clip.get_tokenizer(arch)(texts), normalize=True).numpy()
    np.testing.assert_allclose(enc.encode(texts), want, atol=1e-5)
    # the image tower's fingerprint of that file, as create_encoder computes it (no image tower is built)
    from embedstore.encoders._config import weights_fingerprint
    from embedstore.encoders.openclip import generic_cfg

    assert enc.image_fingerprint == weights_fingerprint(
        generic_cfg(arch, weights="file"), tmp_path / "clip.safetensors"
    )

    # strict: a text key missing is one line naming the file
    del text_keys["ln_final.weight"]
    save_file(text_keys, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BadInput, match=r"partial.safetensors: weights do not fit open_clip:ViT-S-32-alt \(1 missing"):
        create_text_encoder(f"open_clip:{arch}", weights=str(tmp_path / "partial.safetensors"))


# --------------------------------------------------------------------------- weights through the hub cache


def test_text_and_image_towers_load_one_checkpoint_from_the_hub_cache(hub, tmp_path):
    import torch
    from safetensors.torch import save_file

    full = _full(seed=1)  # not the registry's seed: loading must happen for the outputs to match
    sd = full.state_dict()
    # an open_clip training checkpoint: DDP prefixes, nested under "state_dict", beside other keys
    ckpt = _hub_snapshot(hub, "org/loki", "checkpoint.pt")
    torch.save({"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)
    st = _hub_snapshot(hub, "org/loki-st", "model.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))

    want = _own_text(full, SENTENCES)
    random_init = create_text_encoder(ENC).encode(SENTENCES)
    assert not np.allclose(want, random_init, atol=1e-3)
    for weights in ("hf-hub:org/loki", "hf-hub:org/loki-st", f"local-dir:{st.parent}", str(ckpt)):
        text = create_text_encoder(ENC, weights=weights)
        np.testing.assert_allclose(text.encode(SENTENCES), want, atol=1e-5)
        image = create_encoder(ENC, weights=weights)
        assert text.image_fingerprint == image.fingerprint != create_encoder(ENC).fingerprint
        assert text.weights_source == image.weights_source
    assert create_text_encoder(ENC, weights="hf-hub:org/loki-st").fingerprint != text.fingerprint  # other bytes

    # the image tower of the same file is the saved model's own image tower
    tiles = np.random.default_rng(1).integers(0, 256, size=(2, 112, 112, 3), dtype=np.uint8)
    image = create_encoder(ENC, weights="hf-hub:org/loki")
    with torch.inference_mode():
        own = full.encode_image(torch.as_tensor(image.transform()(tiles)), normalize=True).numpy()
    np.testing.assert_allclose(image.encode(tiles), own, atol=1e-5)


def test_gated_omiclip_text_tower_is_one_line(hub, monkeypatch):
    with pytest.raises(MissingWeights) as err:
        create_text_encoder("omiclip")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("omiclip: weights for WangGuangyuLab/Loki are not available")
    assert "HF_TOKEN" in line
    assert "local-dir:" in line

    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    def gated(repo_id, filename, **kw):
        # GatedRepoError needs an HTTP response to construct; build it bare, as test_encoders does
        err = hf_errors.GatedRepoError.__new__(hf_errors.GatedRepoError)
        Exception.__init__(err, f"Access to model {repo_id} is restricted")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(MissingWeights, match=r"WangGuangyuLab/Loki .*gated repository.*HF_TOKEN.*local-dir:"):
        create_text_encoder("omiclip")


def test_weights_without_or_of_another_text_tower_are_one_line(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    full = _full()
    visual_only = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items() if k.startswith("visual.")}, str(visual_only))
    with pytest.raises(BadInput, match=r"visual.safetensors: holds no text tower .*full CLIP/CoCa checkpoint"):
        create_text_encoder(ENC, weights=str(visual_only))

    from embedstore.encoders.openclip import TEST_OPENCLIP_CONFIG

    wider = {**TEST_OPENCLIP_CONFIG, "text_cfg": {**TEST_OPENCLIP_CONFIG["text_cfg"], "width": 48}}
    other = open_clip.create_model("coca_ViT-B-32", pretrained=None, pretrained_text=False, **wider)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "wider.pt")
    with pytest.raises(
        BadInput, match=r"^\S*wider.pt: weights do not fit test-openclip \(.*\); pass weights for this architecture$"
    ):
        create_text_encoder(ENC, weights=str(tmp_path / "wider.pt"))


# --------------------------------------------------------------------------- the store


def test_embed_text_round_trip_on_a_store(image_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(image_store, store)
    report = embed_text(store, ENC, top_n=8, batch_size=5, device="cpu", progress=False)
    assert report.ok
    assert [r.status for r in report.results] == ["done", "done"]
    assert report.table == TEXT
    st = open_store(store)
    sentences = read_sentences(st)
    nonempty = [s for s in sentences.column("sentence").to_pylist() if s]
    meta, vec = read_text_embeddings(st, ENC)
    assert meta.num_rows == len(nonempty) == sum(r.n_tiles for r in report.results) > 0
    n = st.sql(f'SELECT count(*) AS n FROM "embeddings_{TEXT.replace("-", "_")}"').n.iloc[0]
    assert n == meta.num_rows
    # one text row per spot, where the spot is, tied to the image rows of that spot
    assert meta.column("tile_id").to_pylist() == meta.column("spot_id").to_pylist()
    joined = st.sql(
        'SELECT count(*) AS n FROM "embeddings_test_openclip_text" t JOIN spots p USING (cohort, slide_id, spot_id) '
        "JOIN embeddings_test_openclip i USING (cohort, slide_id, spot_id) WHERE t.x = round(p.x) AND t.y = round(p.y)"
    ).n.iloc[0]
    assert joined == meta.num_rows

    # the stored vectors are the text tower's, for exactly these sentences, batched as embed_text batches them
    text = create_text_encoder(ENC)
    for slide in ("A1", "B1"):
        part = sentences.filter(pa.compute.equal(sentences.column("slide_id"), slide))
        ids = [
            i for i, s in zip(part.column("spot_id").to_pylist(), part.column("sentence").to_pylist(), strict=True) if s
        ]
        want = dict(
            zip(ids, text.encode([s for s in part.column("sentence").to_pylist() if s], batch_size=5), strict=True)
        )
        rows = [i for i, s in enumerate(meta.column("slide_id").to_pylist()) if s == slide]
        got = {meta.column("spot_id")[i].as_py(): vec[i] for i in rows}
        assert got.keys() == want.keys()
        for spot in ids:
            np.testing.assert_array_equal(got[spot], want[spot])

    # fingerprints and settings recorded; the geometry is that of the slide's image tiles
    tm = text_metadata(st, ENC)
    image = st.encoder_metadata(ENC)
    assert tm["name"] == TEXT
    assert tm["family"] == "open_clip-text"
    assert tm["fingerprint"] == report.fingerprint
    assert tm["image_fingerprint"] == image["fingerprint"] == create_encoder(ENC).fingerprint
    assert tm["text_fingerprint"] == text.fingerprint != tm["fingerprint"]
    assert tm["sentences"]["top_n"] == 8
    assert tm["geometry"] == image["geometry"]
    assert tm["geometry"]["size_px"] == 112
    assert set(meta.column("fingerprint").to_pylist()) == {report.fingerprint}
    check_text_pairs(image, tm, "here")  # same checkpoint: no error

    # a rerun skips every slide and touches no file
    files = sorted((store / "embeddings" / f"encoder={TEXT}").rglob("*.parquet"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    again = embed_text(store, ENC, top_n=8, batch_size=5, progress=False)
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before

    # other sentence settings over the published slides: one line naming the slide and the fix, nothing rewritten
    sentence_files = {p: p.read_bytes() for p in (store / "sentences").rglob("*.parquet")}
    with pytest.raises(BadInput) as err:
        embed_text(store, ENC, top_n=9, progress=False)
    line = str(err.value)
    assert "\n" not in line
    assert "slide A1" in line
    assert "top_n=8" in line
    assert "--top-n 8" in line
    assert {p: p.read_bytes() for p in (store / "sentences").rglob("*.parquet")} == sentence_files
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before


def test_text_of_other_weights_than_the_images_is_refused(image_store, tmp_path):
    import torch

    ckpt = tmp_path / "other.pt"
    torch.save(_full(seed=2).state_dict(), ckpt)
    image = open_store(image_store).encoder_metadata(ENC)
    other = create_text_encoder(ENC, weights=str(ckpt)).metadata()
    with pytest.raises(FingerprintMismatch) as err:
        check_text_pairs(image, other, "STORE/text")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("STORE/text: ")
    assert other["image_fingerprint"] in line
    assert image["fingerprint"] in line
    assert (
        "embed the text with the same checkpoint as the images: embedstore embed-text STORE --encoder test-openclip --weights"
        in line
    )

    # and through the store: text embedded from the other checkpoint, images from the seed
    store = tmp_path / "store"
    shutil.copytree(image_store, store)
    assert embed_text(store, ENC, weights=str(ckpt), top_n=5, progress=False).ok
    with pytest.raises(FingerprintMismatch, match="image fingerprint"):
        check_text_pairs(open_store(store).encoder_metadata(ENC), text_metadata(store, ENC), str(store))


def test_killed_run_resumes_to_the_uninterrupted_table(tmp_path, monkeypatch):
    from embedstore.encoders.openclip import TextEncoder

    whole = _spots_store(tmp_path / "whole")
    killed = _spots_store(tmp_path / "killed")
    assert embed_text(whole, ENC, batch_size=4, progress=False).ok

    encode = TextEncoder.encode
    calls = []

    def dies_after_one_batch(self, texts, batch_size=64):
        calls.append(len(texts))
        if len(calls) > 1:
            raise _Killed
        return encode(self, texts, batch_size)

    monkeypatch.setattr(TextEncoder, "encode", dies_after_one_batch)
    with pytest.raises(_Killed):
        embed_text(killed, ENC, batch_size=4, progress=False)
    monkeypatch.setattr(TextEncoder, "encode", encode)
    st = open_store(killed)
    assert st.slide_status(TEXT, "c", "s0") == "partial"
    assert st.slide_status(TEXT, "c", "s1") == "absent"

    report = embed_text(killed, ENC, batch_size=4, progress=False)
    assert [r.status for r in report.results] == ["done", "done"]
    (m1, v1), (m2, v2) = _text_table(whole), _text_table(killed)
    assert m1.equals(m2)
    np.testing.assert_array_equal(v1, v2)
    assert not (killed / "_staging").exists() or not any((killed / "_staging").rglob("part-*"))
    # no image embeddings here: the geometry a default embed would give the encoder's tiles
    assert text_metadata(killed, ENC)["geometry"] == {"mpp": 0.5, "size_px": 224, "resample": "bilinear"}


def test_spots_with_an_empty_sentence_are_counted_not_embedded(tmp_path, caplog):
    store = _spots_store(tmp_path / "store", n_slides=1, n_spots=10, empty=3)
    with caplog.at_level("INFO", logger="embedstore.text_embedding"):
        report = embed_text(store, ENC, progress=False)
    assert report.ok
    assert report.n_empty == 3
    assert report.results[0].n_tiles == 7
    assert "3 spot(s) with an empty gene sentence" in report.summary()
    assert any("empty gene sentence" in r.getMessage() for r in caplog.records)
    meta, _ = read_text_embeddings(store, ENC)
    assert sorted(meta.column("spot_id").to_pylist()) == [f"0-{j}" for j in range(7)]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, image_store):
    empty = tmp_path / "empty"
    open_store(empty, read_only=False)
    with pytest.raises(BadInput, match=r"no spots/expression; embed an ST data set into it first"):
        embed_text(empty, ENC, progress=False)
    with pytest.raises(BadInput, match=r"no spots/expression of cohort nope"):
        embed_text(image_store, ENC, cohort="nope", progress=False)
    with pytest.raises(BadInput, match="encoder builtin has no text tower"):
        embed_text(image_store, "builtin", progress=False)
    with pytest.raises(BadInput, match="top_n=0"):
        embed_text(image_store, ENC, top_n=0, progress=False)
    with pytest.raises(BadInput, match="no store folder here"):
        embed_text(tmp_path / "nowhere", ENC, progress=False)
    assert not (tmp_path / "nowhere").exists()
    visual_only = tmp_path / "visual.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _full().state_dict().items() if k.startswith("visual.")}, str(visual_only))
    with pytest.raises(BadInput, match="holds no text tower"):
        embed_text(image_store, ENC, weights=str(visual_only), progress=False)
    assert not (image_store / "embeddings" / f"encoder={TEXT}").exists()
    assert not (image_store / "sentences").exists()
    with pytest.raises(BadInput, match=rf"no text embeddings for encoder {ENC} in .*; run embedstore embed-text"):
        read_text_embeddings(image_store, ENC)
    with pytest.raises(BadInput, match="no text embeddings"):
        text_metadata(image_store, ENC)
