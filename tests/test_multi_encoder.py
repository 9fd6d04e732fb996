"""A store with several encoders: every view, query helper and export is per encoder or refuses to mix."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedstore._schema import META_ENCODER, Col, tile_schema
from embedstore.embedding import embed
from embedstore.errors import BadInput
from embedstore.store import open_store
from embedstore.testing import make_synthetic_cohort

# builtin 128-d, efficientnet-lite0 1280-d (real weights), and two 64-d encoders of different fingerprints.
ENCODERS = {"builtin": 128, "efficientnet-lite0": 1280, "test-vit": 64, "test-virchow": 64}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("multi")
    cohort = make_synthetic_cohort(
        work / "cohort", n_slides=2, n_spots=8, n_genes=10, seed=0, width=800, height=800, mpp=1.0
    )
    for name in ENCODERS:
        report = embed(cohort.root, work / "store", encoder=name, workers=0, progress=False, device="cpu")
        assert report.ok, report.summary()
    return work / "store"


@pytest.fixture(scope="module")
def store(store_dir):
    return open_store(store_dir)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_catalog_lists_every_encoder_with_its_view(store):
    enc = store.sql("SELECT encoder, dim, view FROM encoders ORDER BY encoder")
    assert dict(zip(enc.encoder, enc.dim, strict=True)) == ENCODERS
    assert enc.view.tolist() == [
        "embeddings_builtin",
        "embeddings_efficientnet_lite0",
        "embeddings_test_virchow",
        "embeddings_test_vit",
    ]
    for name, dim in ENCODERS.items():
        view = "embeddings_" + re.sub(r"\W", "_", name)
        t = store.sql(f"SELECT typeof(embedding) AS t, count(DISTINCT fingerprint) AS n FROM {view} GROUP BY 1")
        assert t.t.tolist() == [f"FLOAT[{dim}]"]
        assert t.n.tolist() == [1]
    slides = store.sql("SELECT encoder, count(*) AS n FROM slides GROUP BY 1")
    assert dict(zip(slides.encoder, slides.n, strict=True)) == dict.fromkeys(ENCODERS, 2)


def test_embeddings_view_refuses_in_one_line(store):
    with pytest.raises(BadInput) as info:
        store.sql("SELECT count(*) FROM embeddings")
    text = one_line(info)
    assert "4 encoders, so there is no `embeddings` view" in text
    assert "embeddings_builtin (128-d)" in text
    assert "embeddings_efficientnet_lite0 (1280-d)" in text


def test_cosine_across_dims_is_an_error(store):
    with pytest.raises(BadInput, match="query: ") as info:
        store.sql(
            "SELECT cosine(a.embedding, b.embedding) FROM embeddings_builtin a "
            "JOIN embeddings_test_vit b USING (cohort, slide_id, tile_id)"
        )
    one_line(info)


@pytest.mark.parametrize("output", ["arrow", "numpy", "pandas"])
def test_export_refuses_mixed_dims(store, output):
    query = (
        "SELECT tile_id, embedding::FLOAT[] AS embedding FROM embeddings_builtin "
        "UNION ALL SELECT tile_id, embedding::FLOAT[] FROM embeddings_efficientnet_lite0"
    )
    with pytest.raises(BadInput, match="column embedding mixes vectors of 128 and 1280 values") as info:
        store.sql(query, output=output)
    one_line(info)


@pytest.mark.parametrize("output", ["arrow", "numpy", "pandas"])
def test_export_refuses_mixed_fingerprints_of_one_dim(store, output):
    query = (
        "SELECT fingerprint, embedding FROM embeddings_test_vit "
        "UNION ALL SELECT fingerprint, embedding FROM embeddings_test_virchow"
    )
    with pytest.raises(BadInput, match="holds vectors of 2 encoder fingerprints") as info:
        store.sql(query, output=output)
    one_line(info)


def test_one_encoder_folder_with_two_fingerprints_errors_when_vectors_are_read(store_dir, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    src = next((root / "embeddings" / "encoder=builtin").glob("cohort=*/slide_id=A1/tiles.parquet"))
    table = pq.read_table(src)
    meta = json.loads(table.schema.metadata[META_ENCODER.encode()])
    # The same encoder name, other weights (say, a re-download): a slide written with them.
    writable = open_store(root, read_only=False)
    writer = writable.slide_writer({**meta, "fingerprint": "0" * 64}, "cohort", "Z9")
    tiles = table.append_column(Col.SLIDE_ID, pa.array(["Z9"] * table.num_rows)).select(tile_schema().names)
    writer.append(tiles.cast(tile_schema()), np.ones((table.num_rows, 128), np.float32))
    writer.commit()
    s = open_store(root)
    assert s.sql("SELECT count(*) AS n FROM slides WHERE encoder = 'builtin'")["n"].iloc[0] == 3
    with pytest.raises(
        BadInput,
        match=r"embeddings_builtin: vectors of two encoder fingerprints, \w{12} and \w{12} \(slide cohort/\w+\)",
    ) as info:
        s.sql("SELECT tile_id, embedding FROM embeddings_builtin", output="arrow")
    one_line(info)


def test_encoders_sharing_an_sql_name_get_no_view_and_are_named(store_dir, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    shutil.copytree(root / "embeddings" / "encoder=test-vit", root / "embeddings" / "encoder=test_vit")
    s = open_store(root)
    views = s.sql("SELECT encoder, view FROM encoders WHERE encoder LIKE 'test%vit'")
    assert views.view.isna().all()
    with pytest.raises(BadInput, match=r"encoders test-vit, test_vit share one SQL name and have no view") as info:
        s.sql("SELECT * FROM embeddings")
    one_line(info)
