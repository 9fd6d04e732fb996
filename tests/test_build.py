"""The build stage: which slides and genes an index is built from, and what it says while building."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run
from conftest import RECIPE

import embedstore as es
from embedstore.build import build_index
from embedstore.errors import BadInput
from embedstore.index_folder import load_index
from embedstore.recipes import AggregatorSpec, IndexSpec, PanelSpec, Recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _slides(index_dir) -> set[str]:
    return set(load_index(index_dir).exemplars.column("slide_id").to_pylist())


def _raw_recipe(panel: PanelSpec) -> Recipe:
    """A recipe built in code: no aligner (raw-embedding kNN), so it builds in a blink."""
    return Recipe(
        name="code", encoder="builtin", cohort="synthetic", aligner=None, panel=panel,
        index=IndexSpec(factory="Flat", keys="image"), aggregator=AggregatorSpec(name="mean", k=5),
    )  # fmt: skip


def _log_normalised(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)


def test_slide_ids_restrict_the_reference(cohort, store, index, tmp_path):
    train = [s.section for s in cohort.sections[:2]]
    out = build_index(_raw_recipe(PanelSpec(n_genes=10)), store, tmp_path / "fold.index", slide_ids=train)
    assert _slides(out) == set(train)
    # the same exemplars as the full index holds for those slides
    full = load_index(index).exemplars.to_pylist()
    want = sorted((e["slide_id"], e["spot_id"]) for e in full if e["slide_id"] in train)
    got = sorted((e["slide_id"], e["spot_id"]) for e in load_index(out).exemplars.to_pylist())
    assert got == want


def test_slide_id_outside_the_cohort_is_one_line(cohort, store, tmp_path):
    with pytest.raises(BadInput) as err:
        build_index(_raw_recipe(PanelSpec(n_genes=10)), store, tmp_path / "x.index", slide_ids=["Z9"])
    text = str(err.value)
    assert "\n" not in text
    assert "Z9" in text
    assert "cohort synthetic" in text
    assert cohort.sections[0].section in text  # the slides it could have been
    assert not (tmp_path / "x.index").exists()


def test_code_built_panel_is_the_data_driven_one_then_the_listed_genes(cohort, store, tmp_path):
    counts = np.vstack([s.counts for s in cohort.sections]).astype(np.float64)
    log = _log_normalised(counts)
    by_variance = [cohort.genes[i] for i in np.argsort(-log.var(0), kind="stable")]
    listed = [by_variance[-1], by_variance[2], by_variance[-3], by_variance[-1]]  # one already chosen, one twice
    out = build_index(_raw_recipe(PanelSpec("hvg", 5, genes=listed)), store, tmp_path / "p.index")
    assert load_index(out).genes == [*by_variance[:5], by_variance[-1], by_variance[-3]]


def test_code_built_panel_of_wrong_type_is_one_line():
    with pytest.raises(BadInput, match=r"^PanelSpec: genes = 'GENE001': must be a list of strings$"):
        PanelSpec(genes="GENE001")


def _recipe_file(tmp_path, panel_extra: str):
    path = tmp_path / "genes.toml"
    path.write_text(RECIPE.replace("n_genes = 20\n", f"n_genes = 20\n{panel_extra}\n"))
    return path


def test_recipe_genes_are_predicted_and_the_build_says_what_it_does(cohort, store, tmp_path):
    counts = np.vstack([s.counts for s in cohort.sections]).astype(np.float64)
    least_variable = cohort.genes[int(np.argmin(_log_normalised(counts).var(0)))]
    recipe = _recipe_file(tmp_path, f'genes = ["{least_variable}"]')
    result = run("index", "build", recipe, "--store", store, "--out", tmp_path / "g.index")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    n = sum(len(s.spot_ids) for s in cohort.sections)
    for needle in (
        "reading the reference embeddings and counts",
        f"reference: {n} spots from 3 slides, 30 genes",
        "panel: 21 genes (hvg)",
        f"training the aligner on {n} spots x 21 genes",
        f"FAISS Flat index: training it and adding {n} exemplars",
        "saving the index",
    ):
        assert any(line.startswith("embedstore: ") and needle in line for line in lines), (needle, result.stderr)
    adata = es.predict(tmp_path / "g.index", store, slide_ids=[cohort.sections[0].section])
    assert least_variable in list(adata.var_names)
    assert len(adata.var_names) == 21


def test_recipe_gene_the_reference_never_measured_is_one_line(store, tmp_path):
    recipe = _recipe_file(tmp_path, 'genes = ["ERBB2", "GENE001"]')
    with pytest.raises(BadInput) as err:
        build_index(recipe, store, tmp_path / "u.index")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{recipe} [panel]: genes ERBB2 not measured"), text
    assert "GENE001" not in text
    assert not (tmp_path / "u.index").exists()


def test_recipe_genes_of_wrong_type_is_one_line(store, tmp_path):
    recipe = _recipe_file(tmp_path, 'genes = "ERBB2"')
    result = run("index", "build", recipe, "--store", store, "--out", tmp_path / "w.index")
    assert_one_line_error(result, str(recipe), "[panel]", "genes", "list of strings")


def test_her2st_recipe_lists_marker_genes_measured_in_every_section(shared_data):
    import gzip

    from embedstore.recipes import load_recipe

    listed = load_recipe("her2st-builtin").panel.genes
    assert {"ERBB2", "GRB7", "ESR1", "MKI67", "CD3E"} <= set(listed)
    for counts in sorted((shared_data / "her2st" / "data" / "ST-cnts").glob("*.tsv.gz")):
        with gzip.open(counts, "rt") as f:
            measured = set(f.readline().rstrip("\n").split("\t")[1:])
        assert set(listed) <= measured, (counts.name, sorted(set(listed) - measured))
