"""What an encoder is: :class:`EncoderCfg`, the normalisation constants, and the fingerprint.

The fingerprint is the hash of the weight file's bytes (or of a test variant's seed) plus the
preprocessing fields of the cfg; stores, aligners and indexes compare it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedstore import _schema

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Fields of EncoderCfg that change the numbers an encoder produces; they feed the fingerprint.
PREPROCESSING_FIELDS = (
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


@dataclass(frozen=True)
class EncoderCfg:
    """What an encoder is: its weights' address, its preprocessing and its output.

    Parameters
    ----------
    name
        Registry name, e.g. ``"uni2-h"``.
    family
        Loader family: ``"builtin"``, ``"timm"``, ``"open_clip"``, ``"imagenet"``, ``"conch"``,
        ``"hf_transformers"``.
    architecture
        Architecture name in the family's library (timm model name, open_clip config name).
    hf_hub_id
        Hugging Face hub repository holding the weights, or ``None`` (built-in, test variants).
    filename
        Preferred weight file in that repository or folder.
    input_size
        Side of the square image the model sees, in pixels.
    resize_size
        Side the tile is resized to before a centre crop to ``input_size``; ``None`` means
        ``input_size`` (no crop).
    mean, std
        Per-channel normalisation of [0, 1] RGB.
    interpolation
        ``"bicubic"``, ``"bilinear"`` or ``"nearest"``, used when the tile size differs.
    target_mpp
        µm/px the model expects its tiles at (0.5 ≈ 20x).
    dim
        Embedding length.
    license, gated
        Licence of the weights; whether the hub repository requires accepting terms.
    pooling
        How tokens become one vector: ``"token"`` (class token, timm's default head),
        ``"cls_mean"`` (class token + mean of patch tokens), ``"avg"`` (global average),
        ``"pooled"`` (the library's own pooled output), ``"features"`` (hand-made features).
    normalize
        L2-normalise the output (CLIP-style models whose own ``encode_image`` does so).
    source
        Where default weights come from, for listings (``"hf-hub:org/repo"``, ``"package:..."``).
    requires
        Extra package needed beyond the core dependencies, or ``""``.
    seed
        Seed of the random initialisation of test variants (no weights).
    """

    name: str
    family: str
    architecture: str
    dim: int
    hf_hub_id: str | None = None
    filename: str = "model.safetensors"
    input_size: int = 224
    resize_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    target_mpp: float = 0.5
    license: str = "unknown"
    gated: bool = False
    pooling: str = "token"
    normalize: bool = False
    source: str = ""
    requires: str = ""
    seed: int | None = None

    def preprocessing(self) -> dict[str, Any]:
        """The fields that change the output, as a JSON-able dict (input of the fingerprint)."""
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in PREPROCESSING_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, streamed in 1 MiB blocks (cached per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def weights_fingerprint(cfg: EncoderCfg, weights_file: str | os.PathLike[str] | None) -> str:
    """Fingerprint of an encoder: hash of its weight bytes (or its seed) and its preprocessing."""
    # random test variants have no bytes: their architecture and seed identify them
    digest = f"random-init:{cfg.architecture}:seed={cfg.seed}" if weights_file is None else sha256_file(weights_file)
    return _schema.fingerprint(digest, cfg.preprocessing())
