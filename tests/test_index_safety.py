"""Index folders are data, embeddings of another tiling do not mix, ``--aggregator learned`` works.

- every path an index folder names (the learned aggregator's ``params.path``, its fixed files,
  the aligner folder) must stay inside the folder: absolute paths, ``..`` and links out are
  refused in one line naming the file and key;
- the tile geometry (µm/px, tile size, resampling) is checked wherever the encoder fingerprint
  is: an index, an aligner and a prediction refuse embeddings tiled otherwise;
- ``predict --aggregator learned`` uses the index's own learned aggregator, and says so in one
  line when the index has none.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from embedstore._schema import geometry
from embedstore.errors import BadInput, GeometryMismatch
from embedstore.expression import Panel
from embedstore.index import build_exemplar_index
from embedstore.index_folder import load_index, save_index

CLI = [sys.executable, "-m", "embedstore"]
N, D, G = 90, 16, 6
GEOM_A = geometry(0.5, 224)  # builtin's own µm/px and size
GEOM_B = geometry(1.0, 112)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(N, D)).astype(np.float32)
    expr = rng.random((N, G)).astype(np.float32)
    slides = np.repeat(["s1", "s2", "s3"], N // 3)
    return emb, expr, slides


def _index(learned: bool = False, encoder: dict | None = None):
    emb, expr, slides = _arrays()
    panel = Panel(tuple(f"g{i}" for i in range(G)), "list")
    meta = encoder if encoder is not None else {"name": "builtin", "fingerprint": "f" * 16, "geometry": GEOM_A}
    spots = [str(i) for i in range(N)]
    idx = build_exemplar_index(emb, expr, panel, slides, spots, keys="image", factory="Flat", encoder=meta)
    if learned:
        from embedstore.aggregate import LearnedAggregatorConfig

        idx.fit_learned_aggregator(emb, k=5, cfg=LearnedAggregatorConfig(hidden=8, max_epochs=2))
    return idx, emb


@pytest.fixture(scope="module")
def learned_dir(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread
    try:
        idx, _ = _index(learned=True)
    finally:
        torch.set_num_threads(threads)
    return save_index(idx, tmp_path_factory.mktemp("learned") / "idx")


def _copy_with_manifest(src, dst, edit):
    shutil.copytree(src, dst, symlinks=True)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


# --------------------------------------------------------------------------- paths stay inside the folder


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_aggregator_path_outside_the_folder_is_refused(learned_dir, tmp_path, where):
    outside = shutil.copytree(learned_dir / "aggregator", tmp_path / "elsewhere")  # a loadable aggregator
    rel = str(outside) if where == "absolute" else "../elsewhere"

    def edit(m):
        m["aggregator"]["params"]["path"] = rel

    idx_dir = _copy_with_manifest(learned_dir, tmp_path / "idx", edit)
    with pytest.raises(BadInput) as info:
        load_index(idx_dir)
    msg = str(info.value)
    assert msg.startswith(f"{idx_dir / 'manifest.json'}: key 'aggregator.params.path' is {rel!r}")
    assert "must be relative and stay inside it" in msg


def test_aggregator_link_out_of_the_folder_is_refused(learned_dir, tmp_path):
    idx_dir = shutil.copytree(learned_dir, tmp_path / "idx")
    outside = shutil.move(idx_dir / "aggregator", tmp_path / "elsewhere")
    (idx_dir / "aggregator").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BadInput) as info:
        load_index(idx_dir)
    msg = str(info.value)
    assert msg.startswith(f"{idx_dir / 'manifest.json'}: key 'aggregator.params.path': 'aggregator' leads to ")
    assert "outside the index folder" in msg


def test_index_file_linked_out_of_the_folder_is_refused(learned_dir, tmp_path):
    idx_dir = shutil.copytree(learned_dir, tmp_path / "idx")
    outside = shutil.move(idx_dir / "index.faiss", tmp_path / "index.faiss")
    (idx_dir / "index.faiss").symlink_to(outside)
    with pytest.raises(BadInput, match=r"index\.faiss: 'index\.faiss' leads to .* outside the index folder"):
        load_index(idx_dir)


def test_links_inside_the_folder_are_fine(learned_dir, tmp_path):
    idx_dir = shutil.copytree(learned_dir, tmp_path / "idx")
    (idx_dir / "aggregator").rename(idx_dir / "agg.v1")
    (idx_dir / "aggregator").symlink_to("agg.v1", target_is_directory=True)
    assert load_index(idx_dir).aggregator.name == "learned"


def test_cli_names_the_manifest_and_key(learned_dir, tmp_path):
    def edit(m):
        m["aggregator"]["params"]["path"] = "/etc"

    idx_dir = _copy_with_manifest(learned_dir, tmp_path / "idx", edit)
    line = _one_line(_cli("predict", "--index", idx_dir, "--store", tmp_path / "store", "--out", tmp_path / "p.h5ad"))
    assert f"{idx_dir / 'manifest.json'}: key 'aggregator.params.path' is '/etc'" in line


def test_malformed_geometry_in_manifest_is_one_line(learned_dir, tmp_path):
    def edit(m):
        m["embedstore.encoder"]["geometry"] = {"mpp": "half", "size_px": 224}

    idx_dir = _copy_with_manifest(learned_dir, tmp_path / "idx", edit)
    with pytest.raises(BadInput, match=r"manifest\.json: key 'embedstore\.encoder\.geometry': tile geometry"):
        load_index(idx_dir)


# --------------------------------------------------------------------------- learned aggregator by name


def test_learned_by_name_is_the_index_own(learned_dir):
    idx = load_index(learned_dir)
    emb, _, _ = _arrays(1)
    np.testing.assert_array_equal(idx.predict(emb, k=5, aggregator="learned"), idx.predict(emb, k=5))


def test_learned_by_name_without_one_is_one_clear_error():
    idx, emb = _index()
    with pytest.raises(BadInput, match=r"^aggregator='learned' \(--aggregator\): this index has no learned aggregator"):
        idx.predict(emb, k=5, aggregator="learned")


# --------------------------------------------------------------------------- tile geometry


def test_query_of_another_geometry_is_refused():
    idx, emb = _index()
    assert idx.geometry == GEOM_A
    idx.predict(emb, k=5, geometry=GEOM_A)
    with pytest.raises(GeometryMismatch) as info:
        idx.predict(emb, k=5, geometry=GEOM_B)
    assert "tiled at 1.0 µm/px x 112 px (bilinear), but 0.5 µm/px x 224 px (bilinear) is required" in str(info.value)


def test_aligner_records_and_checks_geometry(tmp_path, one_torch_thread):
    from embedstore import aligner as aligner_mod

    emb, expr, slides = _arrays()
    cfg = aligner_mod.AlignerConfig(proj_dim=8, max_epochs=1, encoder_fingerprint="f" * 16, geometry=GEOM_A)
    model = aligner_mod.fit(emb, expr, slides, cfg, 0)
    loaded = aligner_mod.load_aligner(aligner_mod.save_aligner(model, tmp_path / "aligner"))
    assert loaded.config.geometry == GEOM_A
    panel = Panel(tuple(f"g{i}" for i in range(G)), "list")
    spots = [str(i) for i in range(N)]
    other = {"name": "builtin", "fingerprint": "f" * 16, "geometry": GEOM_B}
    with pytest.raises(
        GeometryMismatch, match=r"^build_exemplar_index embeddings: embeddings were tiled at 1\.0 µm/px"
    ):
        build_exemplar_index(emb, expr, panel, slides, spots, aligner=loaded, factory="Flat", encoder=other)
    # no geometry given: the aligner's is recorded, so queries are still checked
    idx = build_exemplar_index(emb, expr, panel, slides, spots, aligner=loaded, factory="Flat", encoder={})
    assert idx.geometry == GEOM_A


def test_aligner_config_with_a_bad_geometry_names_the_file():
    from embedstore.aligner import AlignerConfig

    with pytest.raises(BadInput, match=r"^x/config\.json: geometry = \[0\.5, 224\]: must be a table"):
        AlignerConfig.from_dict({"geometry": [0.5, 224]}, "x/config.json")


# --------------------------------------------------------------------------- through a real store and the CLI


@pytest.fixture(scope="module")
def store(synthetic_cohort, synthetic_slide_path, tmp_path_factory):
    """Reference spots at builtin's 0.5 µm/px x 224 px; one query slide at 1.0 µm/px x 112 px."""
    from embedstore.embedding import embed

    path = tmp_path_factory.mktemp("geom") / "store"
    assert embed(synthetic_cohort.root, path, cohort="synthetic", workers=0, progress=False).ok
    report = embed(synthetic_slide_path, path, cohort="query", target_mpp=1.0, size_px=112, workers=0, progress=False)
    assert report.ok
    return path


@pytest.fixture(scope="module")
def store_index(store, tmp_path_factory):
    from embedstore.build import build_index

    recipe = tmp_path_factory.mktemp("recipe") / "geom.toml"
    recipe.write_text(
        'name = "geom"\nencoder = "builtin"\ncohort = "synthetic"\naligner = false\n'
        '[panel]\nmethod = "hvg"\nn_genes = 10\n[index]\nfactory = "Flat"\nkeys = "image"\n'
        '[aggregator]\nname = "learned"\nk = 5\n'
    )
    return build_index(recipe, store, tmp_path_factory.mktemp("idx") / "geom.index")


def test_index_records_the_reference_geometry(store_index):
    assert load_index(store_index).geometry == GEOM_A


def test_predict_refuses_a_slide_of_another_geometry(store, store_index, tmp_path):
    from embedstore.prediction import predict

    with pytest.raises(GeometryMismatch) as info:
        predict(store_index, store, cohort="query")
    assert "1.0 µm/px x 112 px" in str(info.value)
    assert "0.5 µm/px x 224 px" in str(info.value)

    out = tmp_path / "p.h5ad"
    line = _one_line(_cli("predict", "--index", store_index, "--store", store, "--cohort", "query", "--out", out))
    assert "synthetic" in line  # the file, named by its slide folder
    assert "tiled at 1.0 µm/px x 112 px (bilinear), but 0.5 µm/px x 224 px (bilinear) is required" in line
    assert not out.exists()


def test_predict_with_learned_by_name(store, store_index, tmp_path):
    import embedstore as es

    slides = ["A1"]
    by_name = es.predict(store_index, store, slide_ids=slides, aggregator="learned")
    default = es.predict(store_index, store, slide_ids=slides)
    np.testing.assert_array_equal(by_name.X, default.X)
    out = tmp_path / "p.h5ad"
    result = _cli(
        "predict", "--index", store_index, "--store", store, "--slide", "A1", "--aggregator", "learned", "--out", out
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_predict_learned_by_name_on_an_index_without_one(store, tmp_path):
    from embedstore.build import build_index

    recipe = tmp_path / "mean.toml"
    recipe.write_text(
        'name = "mean"\nencoder = "builtin"\ncohort = "synthetic"\naligner = false\n'
        '[panel]\nmethod = "hvg"\nn_genes = 10\n[index]\nfactory = "Flat"\nkeys = "image"\n'
        '[aggregator]\nname = "mean"\nk = 5\n'
    )
    index_dir = build_index(recipe, store, tmp_path / "mean.index")
    out = tmp_path / "p.h5ad"
    line = _one_line(
        _cli(
            "predict", "--index", index_dir, "--store", store, "--slide", "A1", "--aggregator", "learned", "--out", out
        )
    )
    assert "aggregator='learned' (--aggregator)" in line
    assert "'mean'" in line


# --------------------------------------------------------------------------- checkpoint configs are data too


@pytest.fixture(scope="module")
def aligned_dir(tmp_path_factory):
    from embedstore.aligner import AlignerConfig, fit

    emb, expr, slides = _arrays()
    panel = Panel(tuple(f"g{i}" for i in range(G)), "list")
    meta = {"name": "builtin", "fingerprint": "f" * 16, "geometry": GEOM_A}
    cfg = AlignerConfig(
        proj_dim=8,
        max_epochs=2,
        genes=panel.genes,
        encoder_name="builtin",
        encoder_fingerprint="f" * 16,
        geometry=GEOM_A,
    )
    model = fit(emb, expr, slides, cfg, 0)
    idx = build_exemplar_index(
        emb, expr, panel, slides, [str(i) for i in range(N)], aligner=model, factory="Flat", encoder=meta
    )
    return save_index(idx, tmp_path_factory.mktemp("aligned") / "idx")


def _edit_config(src, dst, sub, edit):
    shutil.copytree(src, dst)
    path = dst / sub / "config.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["config"].update(proj_dim="8"), "proj_dim = '8': must be an integer >= 1"),
        (lambda d: d["config"].update(proj_dim=-3), "proj_dim = -3: must be an integer >= 1"),
        (lambda d: d["config"].update(lr=float("nan")), "lr = nan: must be a finite number > 0"),
        (lambda d: d.update(config=[]), "must be a table of key = value"),
        (lambda d: d["config"].update(genes=d["config"]["genes"][:3]), "which are not the panel of"),
    ],
)
def test_a_tampered_aligner_config_is_one_line(aligned_dir, tmp_path, edit, needle):
    config = _edit_config(aligned_dir, tmp_path / "idx", "aligner", edit)
    with pytest.raises(BadInput) as e:
        load_index(tmp_path / "idx")
    assert str(config) in str(e.value)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["config"].update(hidden="8"), "hidden = '8': must be an integer >= 1"),
        (lambda d: d["config"].update(dropout=1.5), "dropout = 1.5: must be a finite number"),
        (lambda d: d.update(config="x"), "must be a table of key = value"),
    ],
)
def test_a_tampered_aggregator_config_is_one_line(learned_dir, tmp_path, edit, needle):
    config = _edit_config(learned_dir, tmp_path / "idx", "aggregator", edit)
    with pytest.raises(BadInput) as e:
        load_index(tmp_path / "idx")
    assert str(config) in str(e.value)
    assert needle in str(e.value)
