"""Fine-tuning OmiCLIP's image-text alignment on a user's paired reference spots.

OmiCLIP (Loki's CoCa ViT-L/14) embeds an H&E tile and its spot's gene sentence in one space,
and Loki predicts expression from image-to-text similarity. Loki says the model can be
fine-tuned on one's own data but publishes no recipe; this module is ours. It trains light
heads on *frozen* embeddings already in the store, the OmiCLIP image embedding of each
reference spot's tile and the OmiCLIP text embedding of the same spot's gene sentence, never
the towers themselves.

Design
------
Each tower gets a residual linear adapter initialised at the identity,
``z = normalize(u + W u + b)`` with ``u = normalize(x)`` and ``W``, ``b`` zero at start
(:class:`embedstore._text_aligner_nets.ResidualAdapter`). At step 0 the model *is* zero-shot
OmiCLIP: a pair scores the cosine of its two embeddings. Training starts from the pretrained
alignment, and since the zero-shot validation loss is recorded as epoch 0 and the identity is
returned unless a trained epoch beats it on the held-out patients, fine-tuning can never leave
the user worse off on validation than zero-shot. AdamW's weight decay pulls ``W`` and ``b``
toward zero, that is toward the identity, so the usual regulariser means "stay close to
OmiCLIP". ``W`` is full rank by default: a few reference slides hold thousands of spots, enough
to fit a ``D x D`` update under early stopping, and a full-rank map can undo any rotation
between the towers' spaces, which a low-rank one cannot. ``rank > 0`` swaps it for LoRA's
``u + B (A u) + b`` (``B`` zero-initialised, so still the identity at start) when the reference
is small. When the image and text dimensions differ there is no identity to start from; each
tower then gets a plain linear projection to the smaller of the two dimensions, the epoch-0
baseline is that random projection, and ``rank`` must be 0.

The loss is the symmetric CLIP InfoNCE (:class:`embedstore._aligner_nets.ClipLoss`) with a
learnable temperature, initialised at 0.01 (CoCa's learned logit scale sits near its cap of
100) and, as CLIP does, its log scale clamped to ``[0, log 100]`` after every step; the training
loop is the BLEEP aligner's (:func:`embedstore._training.train`: AdamW, early stopping with
``patience``, best epoch restored), validating on whole held-out patients (slides when there
are no patients; :func:`embedstore.aligner._split`). Arrays in, arrays out; a trained
:class:`TextAligner` is saved as a folder ``config.json`` + ``model.safetensors`` of kind
``"text_aligner"``. torch is imported only by the functions that train or load.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._atomic import read_kind
from embedstore._checkpoint import load_weights, read_checkpoint, save_checkpoint
from embedstore._optional import import_optional
from embedstore._params import Float, Int, Text, check_fields
from embedstore._progress import step
from embedstore._schema import parse_geometry
from embedstore.aligner import TRAINING_FIELD_RULES, _check_2d, _project_rows, _resolve, _split
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

KIND = "text_aligner"
NAME = "text aligner"  # in progress lines
MIN_IMPROVEMENT = 1e-4  # a validation loss must beat the best (zero-shot included) by this much
ZERO_SHOT_LINE = "%s epoch 0 (zero-shot): train %.4f val %.4f"
KEPT_ZERO_SHOT_LINE = (
    "%s: no epoch beat the zero-shot validation loss %.4f (best %.4f, epoch %d); keeping the zero-shot model"
)


@dataclass(frozen=True)
class TextAlignerConfig:
    """Architecture, training settings and provenance of a text aligner.

    ``image_dim`` and ``text_dim`` of 0 mean "take them from the arrays given to
    :func:`fit_text_aligner`". ``rank`` 0 is a full-rank adapter, ``rank > 0`` a low-rank one.
    ``temperature`` is the initial ``1 / logit_scale``, within the clamp ``[0.01, 1]``.
    ``encoder_name``, ``encoder_fingerprint`` (of the image embeddings), ``text_fingerprint`` (of
    the text embeddings) and ``geometry`` (the tile geometry of the image embeddings,
    :func:`embedstore._schema.geometry`) are recorded, not used in training.
    """

    image_dim: int = 0
    text_dim: int = 0
    rank: int = 0
    temperature: float = 0.01
    learn_temperature: bool = True
    lr: float = 1e-4
    weight_decay: float = 1e-2
    batch_size: int = 256
    max_epochs: int = 60
    patience: int = 5  # epochs without a better validation loss before stopping
    val_fraction: float = 0.2
    threads: int = 0  # torch CPU threads while training; 0 keeps torch's setting
    encoder_name: str = ""
    encoder_fingerprint: str = ""
    text_fingerprint: str = ""
    geometry: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "geometry", parse_geometry(self.geometry, "text aligner config key 'geometry'"))

    @property
    def dim(self) -> int:
        """Dimension of the aligned space (0 until the input dims are known)."""
        return self.image_dim if self.image_dim == self.text_dim else min(self.image_dim, self.text_dim)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "text aligner config") -> TextAlignerConfig:
        """Build from a dict; unknown keys are an error listing the valid ones."""
        if not isinstance(d, dict):
            msg = f"{where}: the settings must be a table of key = value, not {type(d).__name__}; re-save the text aligner"
            raise BadInput(msg)
        check_fields(cls, d, where, ranges=False, **FIELD_RULES)
        if d.get("geometry") is not None:
            d = {**d, "geometry": parse_geometry(d["geometry"], f"{where}: key 'geometry'")}
        return cls(**d)


# Ranges of the settings, checked wherever they are read (config.json files, training).
# image_dim and text_dim of 0 are filled from the data when training starts. The temperature
# starts inside the range the log scale is clamped to while training (logit scale 1 to 100).
FIELD_RULES = {
    "image_dim": Int(min=0),
    "text_dim": Int(min=0),
    "rank": Int(min=0),
    "temperature": Float(ge=0.01, le=1),
    **TRAINING_FIELD_RULES,
    "text_fingerprint": Text(),
}


def _new_model(cfg: TextAlignerConfig) -> Any:
    """An untrained (identity) ``TextAlignerModel`` shaped by ``cfg`` (imports torch)."""
    import_optional("torch", "the text aligner")
    from embedstore._text_aligner_nets import TextAlignerModel

    return TextAlignerModel(cfg.image_dim, cfg.text_dim, cfg.rank, cfg.temperature, cfg.learn_temperature)


def _check(a: np.ndarray, name: str, dim: int) -> np.ndarray:
    """A finite 2-d float32 array with ``dim`` columns, else one BadInput line."""
    a = _check_2d(a, name)
    if a.shape[1] != dim:
        msg = f"{name}: has {a.shape[1]} columns but the text aligner was trained on {dim}; use {name} from the same OmiCLIP tower as its training data"
        raise BadInput(msg)
    return a


class TextAligner:
    """A fine-tuned OmiCLIP alignment: projects image and text embeddings into one L2-normalised space.

    Attributes
    ----------
    config
        The :class:`TextAlignerConfig` (input dims, fingerprints, settings).
    model
        The torch ``TextAlignerModel`` (eval mode).
    history
        One dict per epoch, ``epoch`` 0 being the zero-shot model before any step (its
        ``train_loss`` measured like a validation pass), then ``epoch`` k after k epochs;
        ``train_loss``, ``val_loss``, ``seconds``. Empty after loading.
    best_epoch
        The epoch whose weights the model holds: 0 when zero-shot was kept. None after loading.
    val_rows
        Row indices held out for validation (whole groups when groups were given). Empty after loading.
    val_groups
        The held-out groups, sorted; empty without groups and after loading.
    """

    def __init__(
        self,
        config: TextAlignerConfig,
        model: Any,
        history: list[dict[str, float]] | None = None,
        *,
        best_epoch: int | None = None,
        val_rows: np.ndarray | None = None,
        val_groups: tuple[Any, ...] = (),
    ) -> None:
        self.config = config
        self.model = model.eval()
        self.history = history or []
        self.best_epoch = best_epoch
        self.val_rows = np.zeros(0, dtype=np.int64) if val_rows is None else val_rows
        self.val_groups = tuple(val_groups)

    @property
    def dim(self) -> int:
        """Dimension of the aligned space."""
        return self.config.dim

    def project_images(self, emb: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """OmiCLIP image embeddings (N, image_dim) -> (N, dim) float32, L2-normalised."""
        emb = _check(emb, "image embeddings", self.config.image_dim)
        return _project_rows(emb, self.model.encode_image, self.dim, batch_size)

    def project_text(self, emb: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """OmiCLIP text embeddings of gene sentences (N, text_dim) -> (N, dim) float32, L2-normalised."""
        emb = _check(emb, "text embeddings", self.config.text_dim)
        return _project_rows(emb, self.model.encode_text, self.dim, batch_size)

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into the folder ``path``."""
        return save_text_aligner(self, path)


def _mean_loss(model: Any, batch_loss: Any, idx: np.ndarray, batch_size: int) -> float:
    """The loss of ``idx`` in eval mode, batched exactly as :func:`embedstore._training.train` validates."""
    torch = import_optional("torch", "the text aligner")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(idx), batch_size):
            rows = idx[s : s + batch_size]
            if len(rows) < 2:
                continue
            total += float(batch_loss(rows)) * len(rows)
            count += len(rows)
    return total / max(count, 1)


def fit_text_aligner(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    groups: np.ndarray | None = None,
    cfg: TextAlignerConfig | None = None,
    seed: int = 0,
) -> TextAligner:
    """Fine-tune the image-text alignment on paired, frozen OmiCLIP embeddings of reference spots.

    Parameters
    ----------
    image_emb
        (N, D) OmiCLIP image embeddings of the reference spots' tiles.
    text_emb
        (N, D') OmiCLIP text embeddings of the same spots' gene sentences, row for row.
    groups
        (N,) patient of each row (slide when there are no patients); whole groups are held
        out for validation. ``None`` holds out random rows.
    cfg
        Settings; ``image_dim``/``text_dim`` are filled from the arrays.
    seed
        Seeds the split, initialisation and shuffling.

    Returns
    -------
    The :class:`TextAligner` at the epoch with the lowest validation loss, the zero-shot model
    (epoch 0) included: when no trained epoch beats zero-shot by more than 1e-4, the identity
    comes back unchanged and a warning says so. Without validation rows (``val_fraction`` 0,
    or fewer than 2 held out) the training loss stands in, as in :func:`embedstore._training.train`.
    """
    torch = import_optional("torch", "text_aligner.fit_text_aligner")
    cfg = cfg or TextAlignerConfig()
    image_emb = _check_2d(image_emb, "image embeddings")
    text_emb = _check_2d(text_emb, "text embeddings")
    n = image_emb.shape[0]
    if text_emb.shape[0] != n or (groups is not None and len(groups) != n):
        msg = (
            f"fit_text_aligner: image embeddings ({n} rows), text embeddings ({text_emb.shape[0]}) "
            f"and groups ({'none' if groups is None else len(groups)}) must have the same rows, one per reference spot"
        )
        raise BadInput(msg)
    for name, given, have in (
        ("image_dim", cfg.image_dim, image_emb.shape[1]),
        ("text_dim", cfg.text_dim, text_emb.shape[1]),
    ):
        if given and given != have:
            msg = f"fit_text_aligner: config {name} = {given} but the embeddings have {have} columns; set it to 0 or {have}"
            raise BadInput(msg)
    if n < 2:
        msg = "fit_text_aligner: needs at least 2 rows (a contrastive batch needs negatives)"
        raise BadInput(msg)
    if cfg.rank and image_emb.shape[1] != text_emb.shape[1]:
        msg = (
            f"fit_text_aligner: rank = {cfg.rank} needs image and text embeddings of one dimension "
            f"(got {image_emb.shape[1]} and {text_emb.shape[1]}); set rank = 0"
        )
        raise BadInput(msg)
    cfg = TextAlignerConfig.from_dict({**cfg.to_dict(), "image_dim": image_emb.shape[1], "text_dim": text_emb.shape[1]})
    rng = np.random.default_rng(seed)
    groups = None if groups is None else np.asarray(groups)
    val = _split(n, groups, cfg.val_fraction, rng)
    tr_idx, va_idx = np.flatnonzero(~val), np.flatnonzero(val)
    torch.manual_seed(seed)
    model = _new_model(cfg)
    from embedstore._aligner_nets import ClipLoss
    from embedstore._training import train

    loss_fn = ClipLoss()
    X, T = torch.from_numpy(image_emb), torch.from_numpy(text_emb)

    def batch_loss(rows: np.ndarray) -> Any:
        return loss_fn(model.encode_image(X[rows]), model.encode_text(T[rows]), model.logit_scale.exp())

    def clamp_temperature() -> None:
        with torch.no_grad():  # as CLIP does, so the temperature cannot collapse
            model.logit_scale.clamp_(0, math.log(100))

    batch_size = max(2, min(cfg.batch_size, len(tr_idx)))
    # epoch 0: the zero-shot model, its validation loss measured as train() measures every epoch's
    zero_train = _mean_loss(model, batch_loss, tr_idx, batch_size)
    zero_val = _mean_loss(model, batch_loss, va_idx, batch_size) if len(va_idx) >= 2 else zero_train
    step(ZERO_SHOT_LINE, NAME, zero_train, zero_val)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = train(
        model,
        batch_loss,
        tr_idx,
        va_idx,
        name=NAME,
        seed=seed,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=batch_size,
        max_epochs=cfg.max_epochs,
        patience=cfg.patience,
        min_improvement=MIN_IMPROVEMENT,
        min_batch=2,  # a contrastive batch needs negatives
        after_step=clamp_temperature,
        threads=cfg.threads,
    )
    history = [{"epoch": 0, "train_loss": zero_train, "val_loss": zero_val, "seconds": 0.0}]
    history += [{**h, "epoch": h["epoch"] + 1} for h in trained]
    # the epoch train() restored: the first to beat the best so far by MIN_IMPROVEMENT
    best, best_epoch = math.inf, 0
    for h in history[1:]:
        if h["val_loss"] < best - MIN_IMPROVEMENT:
            best, best_epoch = h["val_loss"], h["epoch"]
    if not best < zero_val - MIN_IMPROVEMENT:
        LOG.warning(KEPT_ZERO_SHOT_LINE, NAME, zero_val, best, best_epoch)
        model.load_state_dict(initial)
        best_epoch = 0
    val_groups = () if groups is None or not len(va_idx) else tuple(np.unique(groups[va_idx]).tolist())
    return TextAligner(cfg, model, history, best_epoch=best_epoch, val_rows=va_idx, val_groups=val_groups)


def save_text_aligner(aligner: TextAligner, path: str | Path) -> Path:
    """Save ``aligner`` as a folder: ``config.json`` + ``model.safetensors`` (no pickle).

    Parameters
    ----------
    aligner
        The fine-tuned text aligner.
    path
        Folder to write; an existing text aligner there is replaced in one atomic swap,
        anything else (a BLEEP aligner, user files, a store) is refused untouched.
    """
    return save_checkpoint(path, KIND, aligner.config.to_dict(), aligner.model)


def load_text_aligner(path: str | Path) -> TextAligner:
    """Load a text aligner from a local folder or ``"hf-hub:org/repo[@revision]"``.

    Raises
    ------
    BadInput
        The folder holds another kind of checkpoint (a BLEEP ``aligner``), or ``config.json`` or
        ``model.safetensors`` is missing, corrupted or does not match the config; the line names
        the file.
    """
    folder = _resolve(path)
    kind = read_kind(folder)
    if kind is not None and kind != KIND:
        hint = "load it with embedstore.aligner.load_aligner" if kind == "aligner" else "pass a text aligner folder"
        msg = f"{folder}: holds an embedstore {kind!r} checkpoint, not a {KIND!r}; {hint}"
        raise BadInput(msg)
    config, state, cfg_path, w_path = read_checkpoint(folder, KIND, "re-save the text aligner with save_text_aligner")
    cfg = TextAlignerConfig.from_dict(config, str(cfg_path))
    model = load_weights(_new_model(cfg), state, cfg_path, w_path)
    return TextAligner(cfg, model)


__all__ = [
    "TextAligner",
    "TextAlignerConfig",
    "fit_text_aligner",
    "load_text_aligner",
    "save_text_aligner",
]
