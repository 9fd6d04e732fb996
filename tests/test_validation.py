"""Every argument checked at the edge: bad numbers and names, recipe and manifest files, count tables.

Each refusal is one line naming the parameter (or file and key), the value and the allowed
range, exit code 2 on the command line, and nothing written.
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import embedstore as es
from embedstore.errors import BadInput
from embedstore.testing import make_synthetic_cohort

CLI = [sys.executable, "-m", "embedstore"]


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Two sections of two patients, 12 spots and 8 genes each: read in well under a second."""
    return make_synthetic_cohort(
        tmp_path_factory.mktemp("tiny"), n_slides=2, n_spots=12, n_genes=8, seed=3, width=1024, height=1024, mpp=1.0
    )


# ------------------------------------------------------------------------------ command line


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--batch-size", "0"], ["batch_size=0", "--batch-size", ">= 1"]),
        (["--batch-size", "-3"], ["batch_size=-3", ">= 1"]),
        (["--workers", "-1"], ["workers=-1", "--workers", ">= 0"]),
        (["--mpp", "0"], ["mpp=0.0", "--mpp", "> 0"]),
        (["--mpp", "-0.5"], ["mpp=-0.5", "> 0"]),
        (["--mpp", "nan"], ["mpp=nan", "finite"]),
        (["--target-mpp", "0"], ["target_mpp=0.0", "--target-mpp", "> 0"]),
        (["--target-mpp", "inf"], ["target_mpp=inf", "finite"]),
        (["--size", "0"], ["size_px=0", "--size", ">= 1"]),
        (["--device", "gpu7"], ["device='gpu7'", "--device", "cuda:N"]),
    ],
)
def test_embed_refuses_bad_numbers_before_creating_the_store(tiny_cohort, tmp_path, args, needles):
    store = tmp_path / "store"
    assert_one_line_error(run("embed", tiny_cohort.root, "--store", store, *args), "embed:", *needles)
    assert not store.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--min-tissue", "1.5"], ["min_tissue=1.5", "--min-tissue", "<= 1"]),
        (["--min-tissue", "-0.1"], ["min_tissue=-0.1", ">= 0"]),
        (["--target-mpp", "0"], ["target_mpp=0.0", "> 0"]),
        (["--mpp", "0"], ["mpp=0.0", "> 0"]),
        (["--size", "-5"], ["size_px=-5", "--size"]),
    ],
)
def test_tile_refuses_bad_numbers_and_writes_nothing(synthetic_slide_path, tmp_path, args, needles):
    out = tmp_path / "tiles.parquet"
    assert_one_line_error(run("tile", synthetic_slide_path, "--out", out, *args), "tile:", *needles)
    assert not out.exists()


def test_info_refuses_zero_target_mpp(synthetic_slide_path):
    assert_one_line_error(run("info", synthetic_slide_path, "--target-mpp", "0"), "target_mpp=0.0")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--k", "0"], ["k=0", "--k", ">= 1"]),
        (["--k", "-2"], ["k=-2", ">= 1"]),
    ],
)
def test_predict_refuses_bad_k_before_reading_anything(tmp_path, args, needles):
    out = tmp_path / "pred.h5ad"
    result = run("predict", "--index", tmp_path / "no-index", "--store", tmp_path / "no-store", "--out", out, *args)
    assert_one_line_error(result, "predict:", *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--k", "0"], ["k=0", "--k", ">= 1"]),
        (["--n-genes", "0"], ["n_genes=0", "--n-genes", ">= 1"]),
        (["--seed", "-1"], ["seed=-1", "--seed", ">= 0"]),
    ],
)
def test_evaluate_refuses_bad_numbers_before_any_work(tiny_cohort, tmp_path, args, needles):
    out = tmp_path / "eval"
    assert_one_line_error(run("evaluate", "--reference", tiny_cohort.root, "--out", out, *args), *needles)
    assert not out.exists()


# --------------------------------------------------------------------------------- Python API


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": True}, "batch_size=True"),  # a bool is no batch size
        ({"batch_size": "32"}, "batch_size='32'"),  # nor is a string
        ({"batch_size": 8.0}, "batch_size=8.0"),
        ({"workers": -1}, "workers=-1"),
        ({"min_tissue": float("nan")}, "min_tissue=nan"),
        ({"mpp": "0.5"}, "mpp='0.5'"),
        ({"loader": "fork"}, "loader='fork'"),
        ({"device": "cuda:x"}, "device='cuda:x'"),
        ({"size_px": None}, "size_px=None"),
    ],
)
def test_api_embed_refuses_bad_arguments(tiny_cohort, tmp_path, kwargs, needle):
    with pytest.raises(BadInput, match=r"^embed: ") as e:
        es.embed(tiny_cohort.root, tmp_path / "store", **kwargs)
    assert needle in str(e.value)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"k": 0}, "k=0"),
        ({"k": 2.5}, "k=2.5"),
        ({"exclude_own": "sample"}, "exclude_own='sample'"),
        ({"aggregator": 3}, "aggregator=3"),
    ],
)
def test_api_predict_refuses_bad_arguments(tmp_path, kwargs, needle):
    with pytest.raises(BadInput, match=r"^predict: ") as e:
        es.predict(tmp_path / "no-index", tmp_path / "no-store", **kwargs)
    assert needle in str(e.value)


def _tiny_index(n: int = 30, dim: int = 8, genes: int = 4):
    from embedstore.expression import Panel
    from embedstore.index import build_exemplar_index

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    expr = rng.random((n, genes)).astype(np.float32)
    panel = Panel(genes=tuple(f"G{i}" for i in range(genes)), method="list")
    slides = [f"S{i % 3}" for i in range(n)]
    idx = build_exemplar_index(
        emb, expr, panel, slides, [str(i) for i in range(n)], aligner=None, keys="image", factory="Flat", device="cpu"
    )
    return idx, emb


def test_exemplar_index_predict_checks_k_and_group_by():
    idx, emb = _tiny_index()
    with pytest.raises(BadInput, match=r"ExemplarIndex.predict: k=0 \(--k\): must be an integer >= 1"):
        idx.predict(emb, k=0)
    with pytest.raises(BadInput, match="k=True"):
        idx.predict(emb, k=True)
    with pytest.raises(BadInput, match="group_by='auto'"):
        idx.predict(emb, k=2, query_groups=["S0"] * len(emb), group_by="auto")
    assert idx.predict(emb, k=2).shape == (len(emb), 4)


def test_build_reference_index_refuses_unknown_aggregator_params():
    from embedstore.build import build_reference_index

    with pytest.raises(BadInput, match=r"unknown parameter 'temperature' of aggregator 'softmax'"):
        build_reference_index(None, aggregator="softmax", aggregator_params={"temperature": 0.1})
    with pytest.raises(BadInput, match=r"tau = -1: must be a finite number > 0"):
        build_reference_index(None, aggregator="softmax", aggregator_params={"tau": -1})
    with pytest.raises(BadInput, match=r"n_genes=0 \(--n-genes\)"):
        build_reference_index(None, n_genes=0)


# ----------------------------------------------------------------- evaluate, before embedding


def _evaluate_refused(reference, out, **kw) -> str:
    with pytest.raises(BadInput) as e:
        es.evaluate(reference, out, **kw)
    assert not out.exists(), "nothing may be embedded or written before the refusal"
    return str(e.value)


def test_evaluate_refuses_a_query_sharing_no_gene_before_embedding(tiny_cohort, tmp_path):
    query = make_synthetic_cohort(tmp_path / "q", n_slides=1, n_spots=10, n_genes=5, seed=4, width=1024, height=1024)
    for s in query.sections:  # Ensembl ids instead of symbols: no name in common
        df = pd.read_csv(s.counts_path, sep="\t", index_col=0)
        df.columns = [f"ENSG{i:011d}" for i in range(df.shape[1])]
        df.to_csv(s.counts_path, sep="\t", compression="gzip")
    msg = _evaluate_refused(tiny_cohort.root, tmp_path / "eval", query=query.root, k=3, n_genes=4)
    assert "shares no gene with the reference" in msg
    assert str(query.root) in msg


def test_evaluate_refuses_k_beyond_the_smallest_training_fold(tiny_cohort, tmp_path):
    n_fold = min(len(s.spot_ids) for s in tiny_cohort.sections)  # two sections: each trains on the other
    msg = _evaluate_refused(tiny_cohort.root, tmp_path / "eval", k=n_fold + 1, n_genes=4)
    assert f"k={n_fold + 1} (--k): larger than the {n_fold} reference spots" in msg


def test_evaluate_refuses_more_genes_than_measured(tiny_cohort, tmp_path):
    msg = _evaluate_refused(tiny_cohort.root, tmp_path / "eval", k=3, n_genes=9)
    assert "n_genes=9 (--n-genes): larger than the 8 genes" in msg


def test_evaluate_refuses_unknown_methods_and_aligner_settings(tiny_cohort, tmp_path):
    assert "methods=['bleep', 'magic']" in _evaluate_refused(
        tiny_cohort.root, tmp_path / "e", methods=["bleep", "magic"]
    )
    assert "methods=[]" in _evaluate_refused(tiny_cohort.root, tmp_path / "e", methods=[])
    msg = _evaluate_refused(tiny_cohort.root, tmp_path / "e", aligner={"max_epochs": "many"})
    assert "max_epochs = 'many': must be an integer" in msg


def test_cli_evaluate_k_too_large_is_one_line_and_writes_nothing(tiny_cohort, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate", "--reference", tiny_cohort.root, "--out", out, "--k", "1000", "--n-genes", "4")
    assert_one_line_error(result, "k=1000", "reference spots")
    assert not out.exists()


# ------------------------------------------------------------------------------------ recipes

RECIPE = """
name = "r"
encoder = "builtin"
{top}
[panel]
{panel}
[aggregator]
name = "softmax"
{aggregator}
"""


@pytest.mark.parametrize(
    ("parts", "needles"),
    [
        ({"aggregator": 'k = "ten"'}, ["[aggregator]", "k = 'ten'", "integer >= 1"]),
        ({"aggregator": "k = 0"}, ["[aggregator]", "k = 0"]),
        ({"panel": "n_genes = 2.5"}, ["[panel]", "n_genes = 2.5", "integer"]),
        ({"panel": 'method = "pca"'}, ["[panel]", "method = 'pca'", "hvg, mean, list"]),
        ({"top": "seed = true"}, ["seed = True", "integer"]),
        ({"top": 'slides = "A1"'}, ["slides = 'A1'", "list of strings"]),
        ({"top": 'group_by = "sample"'}, ["group_by = 'sample'", "auto, slide_id, patient"]),
        ({"top": "aligner = 3"}, ["aligner = 3", "table"]),
        ({"top": "index = 5"}, ["index = 5", "must be a table"]),
    ],
)
def test_recipe_values_of_the_wrong_type_name_file_and_key(tmp_path, parts, needles):
    path = tmp_path / "bad.toml"
    path.write_text(RECIPE.format(**{"top": "", "panel": 'method = "hvg"', "aggregator": "", **parts}))
    with pytest.raises(BadInput) as e:
        es.build_index(path, tmp_path / "no-store", tmp_path / "idx")
    assert str(path) in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


def test_recipe_unknown_aggregator_parameter_is_refused_before_reading_the_store(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(RECIPE.format(top="", panel="", aggregator="temperature = 0.2"))
    result = run("index", "build", path, "--store", tmp_path / "no-store", "--out", tmp_path / "idx")
    assert_one_line_error(result, str(path), "unknown parameter 'temperature'")
    assert not (tmp_path / "idx").exists()


# ---------------------------------------------------------------------------------- manifests


@pytest.fixture
def saved_index(tmp_path):
    from embedstore.index_folder import save_index

    idx, _ = _tiny_index()
    return save_index(idx, tmp_path / "idx")


def _edit_manifest(folder, change) -> str:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return str(path)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m.pop("n"), "missing key 'n'"),
        (lambda m: m.pop("aggregator"), "missing key 'aggregator'"),
        (lambda m: m.update(colour="blue"), "unknown key 'colour'"),
        (lambda m: m.update(n="30"), "key 'n' is '30'"),
        (lambda m: m.update(aligned="no"), "key 'aligned' is 'no'"),
        (lambda m: m.update(keys="pixels"), "key 'keys' is 'pixels'"),
        (lambda m: m.update(k=0), "key 'k' is 0"),
        (lambda m: m.update(aggregator={"name": "softmax", "params": {"beta": 1}}), "unknown parameter 'beta'"),
        (lambda m: m.update(aggregator={"name": "magic", "params": {}}), "'magic' is not a registered aggregator"),
        (lambda m: m.update(aggregator={"name": "mean"}), "key 'aggregator'"),
        (lambda m: m.update({"embedstore.encoder": "builtin"}), "key 'embedstore.encoder'"),
    ],
)
def test_manifest_is_checked_against_its_schema(saved_index, change, needle):
    path = _edit_manifest(saved_index, change)
    with pytest.raises(BadInput) as e:
        es.load_index(saved_index)
    assert str(e.value).startswith(path), str(e.value)
    assert needle in str(e.value)


def test_cli_predict_with_a_manifest_missing_a_key_is_one_line(saved_index, tmp_path):
    path = _edit_manifest(saved_index, lambda m: m.pop("dim"))
    result = run("predict", "--index", saved_index, "--store", tmp_path / "s", "--out", tmp_path / "p.h5ad")
    assert_one_line_error(result, path, "missing key 'dim'")


def test_untouched_manifest_loads(saved_index):
    assert len(es.load_index(saved_index)) == 30


# ------------------------------------------------------------------------------- count tables


@pytest.fixture
def cohort_copy(tmp_path):
    return make_synthetic_cohort(tmp_path / "c", n_slides=1, n_spots=10, n_genes=6, seed=5, width=1024, height=1024)


def _rewrite_counts(section, change) -> None:
    df = pd.read_csv(section.counts_path, sep="\t", index_col=0)
    change(df).to_csv(section.counts_path, sep="\t", compression="gzip")


def test_fractional_counts_are_refused_as_normalised(cohort_copy):
    from embedstore.spots import read_dataset

    section = cohort_copy.sections[0]
    _rewrite_counts(section, lambda df: np.log1p(df))
    with pytest.raises(BadInput, match=r"fractional values .*pass raw integer counts; this looks normalised") as e:
        read_dataset(cohort_copy.root, join=None)
    assert str(section.counts_path) in str(e.value)


def test_duplicated_genes_are_summed_with_a_warning(cohort_copy, caplog):
    from embedstore.spots import read_dataset

    section = cohort_copy.sections[0]
    original = pd.read_csv(section.counts_path, sep="\t", index_col=0)

    def rename(df):
        df.columns = ["A", "B", "A", "C", "B", "D"]
        return df

    _rewrite_counts(section, rename)
    with caplog.at_level(logging.WARNING, logger="embedstore"):
        (adata,) = read_dataset(cohort_copy.root, join=None)
    assert list(adata.var_names) == ["A", "B", "C", "D"]
    spots = adata.obs["spot_id"].tolist()
    x = adata.X.toarray()
    np.testing.assert_array_equal(x[:, 0], original.loc[spots].iloc[:, [0, 2]].sum(axis=1))
    np.testing.assert_array_equal(x[:, 1], original.loc[spots].iloc[:, [1, 4]].sum(axis=1))
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(section.counts_path) in warning
    assert "4 columns share 2 gene names" in warning
    assert "summed" in warning


def test_truncated_counts_name_the_file_on_the_command_line(cohort_copy, tmp_path):
    path = cohort_copy.sections[0].counts_path
    data = path.read_bytes()
    assert gzip.decompress(data)  # a valid file before the cut
    path.write_bytes(data[: len(data) // 2])
    result = run("embed", cohort_copy.root, "--store", tmp_path / "store")
    line = assert_one_line_error(result, str(path), "truncated")
    assert "Aborted" not in line


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"slide,mpp\nA1,0\n", "line 2 has slide='A1' mpp='0'"),
        (b"slide,mpp\nA1,nan\n", "mpp='nan'"),
        (b"slide,mpp\nA1,0.5\nA1,0.25\n", "gives slide 'A1' mpp=0.25, an earlier line 0.5"),
        (b"\xff\xfe\x00binary", "not a readable CSV"),
    ],
)
def test_mpp_csv_values_are_checked_and_the_file_named(synthetic_slide_path, tmp_path, content, needle):
    csv = tmp_path / "mpp.csv"
    csv.write_bytes(content)
    with pytest.raises(BadInput) as e:
        es.embed(synthetic_slide_path, tmp_path / "store", mpp_csv=csv)
    assert str(e.value).startswith(str(csv))
    assert needle in str(e.value)


def test_embed_of_bad_data_creates_no_store(tmp_path):
    """The data is resolved before the store folder is made: a typo in the path leaves nothing behind."""
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "missing", tmp_path / "empty"):
        result = subprocess.run(
            [sys.executable, "-m", "embedstore", "embed", str(data), "--store", str(tmp_path / "store")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert str(data) in result.stderr
    assert not (tmp_path / "store").exists()
