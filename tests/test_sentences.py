"""OmiCLIP/Loki gene sentences: the rule on arrays, and the files, view and readers of a real store."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from embedstore import sentences
from embedstore._schema import Col
from embedstore.errors import BadInput, DamagedFile
from embedstore.sentences import (
    gene_sentences,
    housekeeping_genes,
    read_sentence_settings,
    read_sentences,
    sentence_settings,
    write_sentences,
)
from embedstore.store import open_store

HAND_GENES = ["ACTB", "HLA-A", "AC0.1", "KRT5", "EPCAM", "ERBB2", "MUC1"]
HAND_COUNTS = np.array(
    [
        [100, 90, 80, 3, 5, 3, 1],  # ACTB housekeeping, HLA-A has '-', AC0.1 has '.'; ERBB2/KRT5 tie
        [7, 2, 0, 0, 0, 0, 0],  # only dropped genes expressed
        [0, 0, 0, 0, 2, 0, 2],  # two expressed genes, fewer than top_n: no zero padding
        [0, 0, 0, 4, 4, 4, 4],  # four-way tie: by symbol
        [0, 0, 0, 1, 0, 0, 9],
    ]
)
HAND_SENTENCES = ["EPCAM ERBB2 KRT5", "", "EPCAM MUC1", "EPCAM ERBB2 KRT5", "MUC1 KRT5"]


def test_hand_computed_sentences():
    text, n = gene_sentences(HAND_COUNTS, HAND_GENES, top_n=3)
    assert text == HAND_SENTENCES
    assert n.dtype == np.int32
    assert n.tolist() == [3, 0, 2, 3, 2]
    # the same from CSR, and whatever the order of the gene columns
    perm = [6, 2, 4, 0, 5, 1, 3]
    text_p, n_p = gene_sentences(sp.csr_matrix(HAND_COUNTS[:, perm]), [HAND_GENES[j] for j in perm], top_n=3)
    assert (text_p, n_p.tolist()) == (HAND_SENTENCES, [3, 0, 2, 3, 2])
    # zeros stored explicitly in a CSR are not expressed either
    rows, cols = np.indices(HAND_COUNTS.shape).reshape(2, -1)
    stored = sp.csr_matrix((HAND_COUNTS.ravel(), (rows, cols)), shape=HAND_COUNTS.shape)
    assert stored.nnz == HAND_COUNTS.size
    assert gene_sentences(stored, HAND_GENES, top_n=3)[0] == HAND_SENTENCES
    # with nothing excluded, ACTB (100) leads; the '-' and '.' symbols still never appear
    assert gene_sentences(HAND_COUNTS, HAND_GENES, top_n=3, exclude=set())[0][:2] == ["ACTB EPCAM ERBB2", "ACTB"]
    assert gene_sentences(HAND_COUNTS, HAND_GENES, top_n=1)[0] == ["EPCAM", "", "EPCAM", "EPCAM", "MUC1"]


def test_bad_arguments():
    with pytest.raises(BadInput, match=r"^genes: an empty gene list; pass one gene symbol per column"):
        gene_sentences(np.zeros((2, 0)), [])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(BadInput, match=rf"^top_n={bad!r}: .*pass an integer >= 1"):
            gene_sentences(HAND_COUNTS, HAND_GENES, top_n=bad)
    with pytest.raises(BadInput, match=r"^top_n=0: "):
        sentence_settings(0)
    with pytest.raises(BadInput, match=r"^counts: 7 columns for 6 genes"):
        gene_sentences(HAND_COUNTS, HAND_GENES[:6])
    with pytest.raises(BadInput, match=r"^counts: values must be finite and >= 0; pass raw counts"):
        gene_sentences(-HAND_COUNTS, HAND_GENES)


def test_housekeeping_list():
    raw = resources.files("embedstore.data").joinpath("housekeeping_genes.txt").read_text()
    symbols = [s for s in raw.splitlines() if s and not s.startswith("#")]
    assert len(symbols) == len(set(symbols)) == 394  # 398 rows of Loki's csv less GNAS x3 and NACA x1
    assert symbols[:3] == ["NFKBIA", "MARCKS", "JUNB"]  # file order kept
    assert housekeeping_genes() == frozenset(symbols)
    assert {"GAPDH", "ACTB", "GNAS", "NACA", "RPL13"} <= housekeeping_genes()
    assert "KRT5" not in housekeeping_genes()
    settings = sentence_settings(7)
    assert settings["top_n"] == 7
    assert settings["housekeeping"]["n"] == 394
    assert settings["housekeeping"]["sha256"] == hashlib.sha256(raw.encode()).hexdigest()
    assert json.loads(json.dumps(settings)) == settings == sentence_settings(7)


def _reference(X: np.ndarray, genes: list[str], top_n: int) -> list[str]:
    """Independent reference: per spot a pandas frame, filtered, sorted (count desc, symbol asc), head(top_n)."""
    hk = housekeeping_genes()
    out = []
    for row in X:
        df = pd.DataFrame({"gene": genes, "count": row})
        df = df[~df.gene.str.contains(".", regex=False) & ~df.gene.str.contains("-", regex=False)]
        df = df[~df.gene.isin(hk) & (df["count"] > 0)]
        out.append(" ".join(df.sort_values(["count", "gene"], ascending=[False, True]).head(top_n).gene))
    return out


@pytest.fixture(scope="module")
def random_counts():
    rng = np.random.default_rng(3)
    names = [f"G{i:03d}" for i in range(60)] + ["GAPDH", "ACTB", "RPL13", "HLA-DRA", "MT-CO1", "AC1.2", "LINC.7"]
    genes = list(rng.permutation(names))
    X = rng.poisson(rng.gamma(0.4, 2.0, size=(150, len(genes)))).astype(np.float64)  # many zeros and ties
    X[7] = 0
    return X, genes


@pytest.mark.parametrize("top_n", [1, 5, 50])
def test_matches_pandas_reference(random_counts, monkeypatch, top_n):
    X, genes = random_counts
    want = _reference(X, genes, top_n)
    lengths = [len(s.split()) for s in want]
    assert 0 in lengths
    assert max(lengths) == top_n if top_n < 10 else max(lengths) < top_n  # the cap binds, or leaves spots short
    monkeypatch.setattr(sentences, "CHUNK_NNZ", 37)  # many row blocks, boundaries inside the matrix
    for counts in (X, sp.csr_matrix(X, dtype=np.float32), sp.csc_matrix(X), sp.coo_matrix(X).astype(np.int64)):
        text, n = gene_sentences(counts, genes, top_n=top_n)
        assert text == want
        assert n.tolist() == [len(s.split()) for s in want]


def test_values_float32_cannot_hold_are_ranked_exactly(random_counts):
    X, genes = random_counts
    Y = X + np.random.default_rng(4).random(X.shape) * 1e-6 * (X > 0)  # ties of X broken below float32 precision
    want = _reference(Y, genes, 50)
    assert want != _reference(Y.astype(np.float32), genes, 50)  # float32 would rank some spots otherwise
    assert gene_sentences(sp.csr_matrix(Y), genes, top_n=50)[0] == want


def _write_sections(store, rng, genes, sections):
    mats = {}
    for cohort, slide, n in sections:
        m = sp.random(
            n, len(genes), density=0.3, format="csr", random_state=rng, data_rvs=lambda k: rng.integers(1, 6, k)
        )
        store.write_spots(cohort, slide, [f"{slide}-{i}" for i in range(n)], rng.random((n, 2)) * 1000, m, genes)
        mats[(cohort, slide)] = m
    return mats


GENES = ["EPCAM", "ACTB", "HLA-B", "KRT5", "AC0.1", "GAPDH", "ERBB2", "MUC1", "CD74", "COL1A1", "PTPRC", "SPP1"]


@pytest.fixture
def st_store(tmp_path):
    store = open_store(tmp_path / "store", read_only=False)
    mats = _write_sections(store, np.random.default_rng(0), GENES, [("c1", "A", 30), ("c1", "B", 20), ("c2", "C", 12)])
    return store, mats


def _sentences_files(root: Path) -> list[Path]:
    return sorted((root / "sentences").glob("**/*.parquet"))


def test_store_round_trip_and_sql(st_store):
    store, mats = st_store
    assert store.sql("SELECT count(*) AS n FROM sentences")["n"].tolist() == [0]  # the view exists, empty
    paths = write_sentences(store, top_n=4)
    root = store.root
    assert paths == [root / f"sentences/cohort={c}/slide_id={s}/sentences.parquet" for c, s in mats]
    assert _sentences_files(root) == sorted(paths)

    md = pq.read_metadata(paths[0])
    kv = {k.decode(): v.decode() for k, v in md.metadata.items()}
    assert kv["embedstore.kind"] == "sentences"
    assert kv["embedstore.schema_version"] == "2"
    assert json.loads(kv["embedstore.sentences"]) == sentence_settings(4)
    schema = pq.read_schema(paths[0])
    assert [(f.name, str(f.type), f.nullable) for f in schema] == [
        ("spot_id", "string", False), ("sentence", "string", False), ("n_genes", "int32", False),
    ]  # fmt: skip

    table = read_sentences(root)  # by path, read-only
    assert table.column_names == [Col.COHORT, Col.SLIDE_ID, Col.SPOT_ID, Col.SENTENCE, Col.N_GENES]
    want_text, want_n, want_ids = [], [], []
    for (_, slide), m in mats.items():
        text, n = gene_sentences(m, GENES, top_n=4)
        want_text += text
        want_n += n.tolist()
        want_ids += [f"{slide}-{i}" for i in range(m.shape[0])]
    assert table.column(Col.SENTENCE).to_pylist() == want_text
    assert table.column(Col.N_GENES).to_pylist() == want_n
    assert table.column(Col.SPOT_ID).to_pylist() == want_ids
    assert table.column(Col.COHORT).to_pylist() == ["c1"] * 50 + ["c2"] * 12
    assert not any(g in s.split() for s in want_text for g in ("ACTB", "GAPDH", "CD74", "HLA-B", "AC0.1"))
    assert max(want_n) == 4

    got = store.sql(
        "SELECT cohort, slide_id, spot_id, sentence, n_genes FROM sentences ORDER BY cohort, slide_id, spot_id"
    )
    ref = table.to_pandas().sort_values([Col.COHORT, Col.SLIDE_ID, Col.SPOT_ID]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, ref, check_dtype=False)
    joined = store.sql("SELECT count(*) AS n FROM sentences JOIN spots USING (cohort, slide_id, spot_id)")
    assert joined["n"].tolist() == [62]

    b_then_a = read_sentences(root, slide_ids=["B", "A"])
    assert b_then_a.column(Col.SLIDE_ID).to_pylist() == ["B"] * 20 + ["A"] * 30
    assert read_sentences(store, cohort="c2").num_rows == 12
    assert read_sentence_settings(root) == sentence_settings(4)


def test_rerun_skips_and_other_settings_rewrite(st_store):
    store, mats = st_store
    paths = write_sentences(store.root, top_n=3)
    stat = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}
    assert write_sentences(store, top_n=3) == paths
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths} == stat  # not rewritten

    # other settings for one slide: only its file is rewritten, and mixed settings are refused
    (a,) = write_sentences(store, slide_ids=["A"], top_n=6)
    assert a.stat().st_ino != stat[a][0]
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == stat[p] for p in paths if p != a)
    assert read_sentence_settings(store, slide_ids=["A"])["top_n"] == 6
    want, n = gene_sentences(mats[("c1", "A")], GENES, top_n=6)
    assert max(n) > 3
    assert read_sentences(store, slide_ids=["A"]).column(Col.SENTENCE).to_pylist() == want
    with pytest.raises(
        BadInput,
        match=r"sentences.parquet: gene sentences of settings .*write the sentences of all selected slides with one top_n",
    ):
        read_sentences(store)

    # new expression for B: its sentences are stale until written again
    new = _write_sections(store, np.random.default_rng(9), GENES, [("c1", "B", 8)])
    with pytest.raises(
        BadInput, match=r"slide_id=B/sentences.parquet: gene sentences of spots/expression since rewritten"
    ):
        read_sentences(store, slide_ids=["B"])
    write_sentences(store, slide_ids=["B"], top_n=3)
    got = read_sentences(store, slide_ids=["B"])
    assert got.column(Col.SENTENCE).to_pylist() == gene_sentences(new[("c1", "B")], GENES, top_n=3)[0]
    assert stat[paths[2]] == (paths[2].stat().st_ino, paths[2].stat().st_mtime_ns)  # C untouched throughout


def test_bad_store_input_writes_nothing(tmp_path, st_store):
    empty = open_store(tmp_path / "empty", read_only=False)
    with pytest.raises(BadInput, match=r"empty: no spots/expression; embed an ST data set into it first$"):
        write_sentences(empty)
    with pytest.raises(
        BadInput, match=r"no gene sentences; run embedstore embed-text \(or sentences.write_sentences\) first"
    ):
        read_sentences(empty)
    store, _ = st_store
    with pytest.raises(BadInput, match=r"store: no spots/expression for slides Z of cohort c1; embed an ST data set"):
        write_sentences(store, cohort="c1", slide_ids=["A", "Z"])
    with pytest.raises(BadInput, match=r"no spots/expression of cohort c9; embed an ST data set into it first"):
        write_sentences(store, cohort="c9")
    with pytest.raises(BadInput, match=r"^top_n=0: "):
        write_sentences(store, top_n=0)
    with pytest.raises(BadInput, match="opened read-only"):
        write_sentences(open_store(store.root), top_n=3)
    assert not (store.root / "sentences").exists()
    assert not (empty.root / "sentences").exists()
    write_sentences(store, slide_ids=["A"])
    with pytest.raises(BadInput, match=r"no gene sentences for slides B; run embedstore embed-text"):
        read_sentence_settings(store, slide_ids=["A", "B"])


def test_failed_write_leaves_no_file(st_store, monkeypatch):
    store, _ = st_store

    def half_then_fail(table, where, **kw):
        where.write(b"PAR1" + b"\0" * 100)
        msg = "simulated failure mid-write"
        raise OSError(msg)

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="simulated failure mid-write"):
        write_sentences(store, slide_ids=["A"])
    assert _sentences_files(store.root) == []
    assert not [p for p in (store.root / "_staging").rglob("*") if "sentences" in p.name]


def test_kill_mid_write_keeps_the_old_file(st_store):
    store, _ = st_store
    (path,) = write_sentences(store, slide_ids=["A"], top_n=50)
    before = path.read_bytes()
    script = f"""
import os, signal
import pyarrow.parquet as pq
from embedstore.sentences import write_sentences

def half_then_kill(table, where, **kw):
    where.write(b"PAR1" + b"x" * 4096)
    where.flush()
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = half_then_kill
write_sentences({str(store.root)!r}, slide_ids=["A"], top_n=7)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert [p for p in (store.root / "_staging").rglob("*") if "sentences" in p.name]  # killed mid-write indeed
    assert _sentences_files(store.root) == [path]
    assert path.read_bytes() == before
    assert read_sentence_settings(store, slide_ids=["A"])["top_n"] == 50
    write_sentences(store, slide_ids=["A"], top_n=7)  # the next write succeeds and clears the dead temp file
    assert read_sentence_settings(store, slide_ids=["A"])["top_n"] == 7
    assert not [p for p in (store.root / "_staging").rglob("*") if "sentences" in p.name]


def test_damaged_file_is_named(st_store):
    store, _ = st_store
    paths = write_sentences(store, top_n=5)
    path = paths[1]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DamagedFile, match="not a readable Parquet file") as e:
        read_sentences(store.root)
    assert e.value.path == path
    assert str(e.value).startswith(f"{path}: ")
    with pytest.raises(DamagedFile, match=r"remove it and run embedstore embed-text"):
        open_store(store.root).sql("SELECT count(*) FROM sentences")

    # a page zeroed under an intact footer: the page checksum names the file
    path.write_bytes(good)
    col = pq.read_metadata(path).row_group(0).column(1)  # the sentence column chunk
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    damaged = bytearray(good)
    damaged[start + 30 : start + col.total_compressed_size - 4] = b"\0" * (col.total_compressed_size - 34)
    path.write_bytes(bytes(damaged))
    with pytest.raises(DamagedFile, match="unreadable data") as e:
        read_sentences(store.root, slide_ids=["B"])
    assert e.value.path == path

    # writing again replaces a file whose footer is unreadable
    path.write_bytes(good[: len(good) // 2])
    write_sentences(store, top_n=5)
    assert read_sentences(store.root).num_rows == 62
