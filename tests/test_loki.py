"""The Loki path on the store: text keys in the exemplar index, the exact rule, fine-tuned heads,
zero-shot text search from Python and SQL, and evaluation beside the other methods.

Everything runs the real pipeline with ``test-openclip``, a tiny randomly initialised open_clip
CoCa built by the same code as OmiCLIP (image and text towers, open_clip's tokenizer).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run

import embedstore as es
from embedstore.aggregate import create_aggregator, loki
from embedstore.build import build_index, load_reference, with_text
from embedstore.errors import BadInput
from embedstore.evaluation import TEXT_METHODS, _methods
from embedstore.expression import apply_panel, normalize_log1p, select_panel
from embedstore.index import build_exemplar_index
from embedstore.index_folder import load_index, save_index
from embedstore.loki import predict_exact
from embedstore.recipes import AggregatorSpec, IndexSpec, PanelSpec, Recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENCODER = "test-openclip"


@pytest.fixture(scope="module")
def clip_store(cohort, tmp_path_factory):
    """The tiny cohort embedded by the tiny CoCa's image tower, and its gene sentences by its text tower."""
    from embedstore.text_embedding import embed_text

    path = tmp_path_factory.mktemp("loki") / "store"
    assert es.embed(cohort.root, path, ENCODER, cohort="synthetic", workers=0, progress=False).ok
    embed_text(path, ENCODER, cohort="synthetic", top_n=10)
    return path


@pytest.fixture(scope="module")
def reference(clip_store):
    return with_text(clip_store, load_reference(clip_store, ENCODER, cohort="synthetic"))


def _recipe(aligner, k=5) -> Recipe:
    return Recipe(
        name="loki", encoder=ENCODER, cohort="synthetic", aligner=aligner, panel=PanelSpec(n_genes=12),
        index=IndexSpec(factory="Flat", keys="text"), aggregator=AggregatorSpec(name="loki", k=k),
    )  # fmt: skip


def test_loki_aggregator_weights_by_the_similarities_themselves():
    sims = np.array([[0.5, 0.25, 0.25], [0.2, -0.2, 0.0]])
    expr = np.arange(18, dtype=np.float32).reshape(2, 3, 3)
    got = create_aggregator("loki")(sims, expr)
    # row 0: (0.5 e0 + 0.25 e1 + 0.25 e2) / 1.0; row 1 sums to zero: the plain mean
    np.testing.assert_allclose(got[0], 0.5 * expr[0, 0] + 0.25 * expr[0, 1] + 0.25 * expr[0, 2], rtol=1e-6)
    np.testing.assert_allclose(got[1], expr[1].mean(0), rtol=1e-6)
    np.testing.assert_allclose(loki(sims[:1], expr[:1]), got[:1])


def test_exact_rule_is_loki_predex_computed_another_way():
    rng = np.random.default_rng(0)
    img, txt, expr = rng.normal(size=(7, 8)), rng.normal(size=(20, 8)), rng.random((20, 4))
    s = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    want = (s @ expr) / s.sum(1, keepdims=True)  # Loki's predict_st_gene_expr, literally
    np.testing.assert_allclose(predict_exact(img, txt, expr, batch_size=3), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(BadInput, match="text embeddings and expression of the same reference spots"):
        predict_exact(img, txt[:5], expr)


def test_faiss_top_k_at_k_all_agrees_with_the_exact_rule(reference):
    ref = reference
    panel = select_panel(ref.counts, ref.genes, "hvg", 12)
    expr = apply_panel(normalize_log1p(ref.counts), ref.genes, panel)
    idx = build_exemplar_index(
        ref.embeddings, expr, panel, ref.column("slide_id"), ref.column("spot_id"),
        keys="text", text_emb=ref.text, text_encoder=ref.text_encoder, factory="Flat", encoder=ref.encoder,
        aggregator="loki",
    )  # fmt: skip
    queries = ref.embeddings[::7]
    top_all = idx.predict(queries, k=len(idx))
    np.testing.assert_allclose(top_all, predict_exact(queries, ref.text, expr), rtol=1e-4, atol=1e-5)
    # fewer neighbours is another estimate, not the same numbers
    assert not np.allclose(idx.predict(queries, k=3), top_all, atol=1e-4)
    assert idx.manifest["keys"] == "text"
    assert idx.manifest["text_encoder"]["fingerprint"] == ref.text_encoder["fingerprint"]


def test_text_recipe_builds_zero_shot_and_fine_tuned_indexes_that_reload(clip_store, reference, tmp_path):
    zero = load_index(build_index(_recipe(None), clip_store, tmp_path / "zero.index"))
    assert zero.aligner is None
    assert zero.manifest["keys"] == "text"
    np.testing.assert_allclose(
        zero.key_vectors, reference.text / np.linalg.norm(reference.text, axis=1, keepdims=True), atol=1e-6
    )
    tuned_dir = build_index(_recipe({"max_epochs": 2}), clip_store, tmp_path / "tuned.index")
    assert json.loads((tuned_dir / "aligner" / "config.json").read_text())["embedstore.kind"] == "text_aligner"
    tuned = load_index(tuned_dir)
    assert type(tuned.aligner).__name__ == "TextAligner"
    queries = reference.embeddings[:9]
    saved = load_index(save_index(tuned, tmp_path / "again.index"))
    np.testing.assert_array_equal(saved.predict(queries, k=5), tuned.predict(queries, k=5))
    # prediction from the store, through the public call
    adata = es.predict(tuned_dir, clip_store, cohort="synthetic", k=5)
    assert adata.n_obs == reference.embeddings.shape[0]
    assert adata.var_names.tolist() == tuned.genes


def test_text_keys_without_text_embeddings_are_one_line(clip_store, reference):
    ref = load_reference(clip_store, ENCODER, cohort="synthetic")
    from embedstore.build import build_reference_index

    with pytest.raises(BadInput, match="with_text"):
        build_reference_index(ref, keys="text", aligner=None, aggregator="loki", k=5, n_genes=10)


def test_zero_shot_text_search_matches_brute_force_in_python_and_sql(clip_store):
    from embedstore.encoders import create_text_encoder

    st = es.open_store(clip_store)
    meta, emb = st.read_embeddings(ENCODER, columns=["slide_id", "tile_id"])
    q = create_text_encoder(ENCODER).encode(["GENE003 GENE007"])[0]
    scores = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ q
    order = np.argsort(-scores, kind="stable")[:5]
    want = [(meta.column("slide_id")[i].as_py(), meta.column("tile_id")[i].as_py()) for i in order]
    hits = es.search(clip_store, text="GENE003, GENE007 notagene", k=5)  # the store's only image encoder
    assert list(zip(hits.column("slide_id").to_pylist(), hits.column("tile_id").to_pylist(), strict=True)) == want
    np.testing.assert_allclose(hits.column("score").to_numpy(), scores[order], rtol=1e-4, atol=1e-5)
    rows = st.sql("SELECT slide_id, tile_id FROM text_tiles('GENE003 GENE007', k := 5) ORDER BY rank")
    assert list(zip(rows.slide_id, rows.tile_id, strict=True)) == want


def test_text_tower_of_another_checkpoint_is_refused_in_python_and_sql(clip_store, tmp_path):
    import dataclasses

    import torch

    from embedstore.encoders import get_encoder_cfg
    from embedstore.encoders.openclip import build_openclip_full
    from embedstore.errors import FingerprintMismatch

    other = build_openclip_full(dataclasses.replace(get_encoder_cfg(ENCODER), seed=1))
    weights = tmp_path / "other.pt"
    torch.save(other.state_dict(), weights)
    with pytest.raises(FingerprintMismatch, match="the images were embedded with"):
        es.search(clip_store, text="GENE003", weights=str(weights))
    result = run("search", "--store", clip_store, "--text", "GENE003", "--weights", weights)
    assert_one_line_error(result, "text tower", "--weights")


def test_text_search_with_no_known_gene_is_one_line(clip_store):
    result = run("search", "--store", clip_store, "--text", "tumour cells", "-k", "3")
    assert_one_line_error(result, "no word is a gene measured in this store", "ERBB2")


def test_embed_text_with_an_encoder_without_text_tower_is_one_line(store):
    assert_one_line_error(run("embed-text", store, "--encoder", "builtin"), "builtin", "text tower")


def test_evaluate_runs_loki_only_with_a_text_tower():
    assert set(TEXT_METHODS) <= set(_methods(None, ENCODER))
    assert not set(TEXT_METHODS) & set(_methods(None, "builtin"))
    with pytest.raises(BadInput, match="loki: need an encoder with a text tower"):
        _methods(["ridge", "loki"], "builtin")


def test_evaluate_reports_loki_beside_the_other_methods(cohort, tmp_path):
    result = es.evaluate(
        cohort.root, tmp_path / "eval", encoder=ENCODER, k=5, n_genes=12, workers=0,
        methods=["knn-raw", "loki", "loki-tuned"], additions=["smooth"],
    )  # fmt: skip
    methods = result.metrics["methods"]
    base = {"knn-raw", "loki", "loki-tuned"}
    assert set(methods) == base | {f"{m}+smooth" for m in base}  # the index methods, smoothed
    assert set(result.metrics["gains"]["smooth"]) == base
    for m in ("loki", "loki-tuned"):
        assert np.isfinite(methods[m]["gene_sets"]["hvg50"]["pearson_mean"])
        assert len(list((tmp_path / "eval").glob(f"fold-*/predictions_{m}.h5ad"))) == 3  # one per patient


def test_check_repair_embeds_a_damaged_text_slide_again(clip_store):
    """Last in the file: it damages the module's store."""
    st = es.open_store(clip_store)
    before = st.read_embeddings(f"{ENCODER}-text", columns=["slide_id", "spot_id"])
    victim = next((clip_store / "embeddings" / f"encoder={ENCODER}-text").glob("cohort=*/slide_id=*/tiles.parquet"))
    victim.write_bytes(victim.read_bytes()[:100])
    assert es.check_store(clip_store).remaining  # found
    report = es.check_store(clip_store, repair=True, device="cpu")
    assert not report.remaining, report.remaining
    assert any("gene sentences made again" in line for line in report.repaired)
    after = st.read_embeddings(f"{ENCODER}-text", columns=["slide_id", "spot_id"])
    assert after[0].equals(before[0])
    np.testing.assert_array_equal(after[1], before[1])
