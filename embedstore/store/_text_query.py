"""Zero-shot text queries: a gene sentence or marker list -> a vector of a store's image space.

A CLIP/CoCa encoder such as OmiCLIP maps a tile and the gene sentence of its spot into one
space, so the tiles nearest the text embedding of ``"ERBB2 GRB7 KRT19"`` are those whose
morphology goes with those genes. The text tower is rebuilt from what the store records of
the image embeddings (encoder name and weights), and its checkpoint must be the one the images
were embedded with (the image fingerprint it would give). Used by :func:`embedstore.search`
(``text=``) and the SQL table function ``text_tiles``. The encoder code is imported only when a
text is encoded, so the store stays free of torch.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from embedstore.errors import BadInput, FingerprintMismatch

TEXT_SUFFIX = "-text"  # the text embeddings of encoder E are stored as encoder E-text
# A word of a query shaped like a gene symbol (HGNC ERBB2, C1orf112; MGI Krt19): a letter, then
# letters and digits, with at least one capital or digit.
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_SPLIT = re.compile(r"[\s,;]+")

_ENCODERS: dict[tuple[str, str | None, str], Any] = {}
_LOCK = threading.Lock()


def recorded_weights(source: str | None) -> str | None:
    """The ``weights=`` argument that loads the weights an encoder's metadata says it used.

    ``"none"`` and ``"random-init(...)"`` (weight-free and test encoders) give None, as does a
    store that records nothing; ``"file:/path"`` gives the path; hub and local-dir sources are
    passed as they are.
    """
    if not source or source == "none" or source.startswith("random-init"):
        return None
    return source.removeprefix("file:")


def image_encoder(names: list[str], encoder: str | None, where: Any) -> str:
    """The image encoder a text query searches: ``encoder``, or the store's only one besides text tables."""
    if encoder is not None:
        return encoder
    images = [n for n in names if not n.endswith(TEXT_SUFFIX)]
    if len(images) != 1:
        msg = f"{where}: holds {len(images)} image encoders ({', '.join(images) or 'none'}); name the one to search with --encoder / encoder := ..."
        raise BadInput(msg)
    return images[0]


def measured_genes(st: Any) -> set[str] | None:
    """Genes measured in a store's ST sections (None when it holds no expression)."""
    if not any((st.root / "spots").glob("cohort=*/slide_id=*")):
        return None
    return set(st.sql("SELECT DISTINCT gene FROM expression", output="numpy")["gene"].tolist())


def query_words(text: str, known_genes: set[str] | None) -> list[str]:
    """The gene symbols of a query, in order, once each; one line when none is a known gene.

    ``known_genes`` are the genes measured in the store (``None``: the store holds no
    expression, and words are only checked to look like gene symbols).
    """
    words = list(dict.fromkeys(w for w in _SPLIT.split(str(text)) if w))
    if known_genes is not None:
        kept = [w for w in words if w in known_genes]
        what = "a gene measured in this store"
    else:
        kept = [w for w in words if _SYMBOL.match(w) and any(c.isupper() or c.isdigit() for c in w)]
        what = "shaped like a gene symbol"
    if not kept:
        msg = f"text {str(text)[:80]!r}: no word is {what}; give gene symbols such as 'ERBB2 GRB7 KRT19' (a gene sentence or marker list)"
        raise BadInput(msg)
    return kept


def text_vector(
    meta: dict[str, Any],
    text: str,
    known_genes: set[str] | None,
    where: Any,
    weights: str | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """The text embedding of ``text`` by the text tower of the checkpoint the store's images came from; ``(D,)`` float32.

    Parameters
    ----------
    meta
        The image embeddings' encoder metadata (name, fingerprint, weights).
    text
        Gene symbols separated by spaces (or commas), e.g. a marker list.
    known_genes
        Genes measured in the store, or ``None`` (see :func:`query_words`).
    where
        The store, for messages.
    weights
        Where the weights are; by default where the store records the images' came from.

    Raises
    ------
    FingerprintMismatch
        The text tower built here is not from the checkpoint the images were embedded with.
    """
    from embedstore.encoders import create_text_encoder

    words = query_words(text, known_genes)
    chosen = weights if weights is not None else recorded_weights(meta.get("weights"))
    key = (str(meta["name"]), chosen, device)
    with _LOCK:  # DuckDB may call from several threads; build each text tower once per process
        if key not in _ENCODERS:
            _ENCODERS[key] = create_text_encoder(meta["name"], weights=chosen, device=device)
        enc = _ENCODERS[key]
    own = meta.get("encoder_fingerprint", meta["fingerprint"])  # without a stain setting hashed in
    if enc.image_fingerprint != own:
        msg = (
            f"{where}: the {meta['name']} text tower built here (weights {enc.weights_source}) belongs to image "
            f"fingerprint {enc.image_fingerprint}, but the images were embedded with {own}; pass "
            "the weights they were embedded with (weights=, --weights)"
        )
        raise FingerprintMismatch(msg)
    return enc.encode([" ".join(words)])[0]
