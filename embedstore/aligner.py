"""Contrastive image-expression aligner on frozen embeddings (BLEEP style).

open_clip's split: the model and the loss (``embedstore._aligner_nets``) and the training
(:func:`fit`, on the shared loop of ``embedstore._training``) are separate. Training takes arrays
(stored embeddings and log-normalised panel expression), never encoders or paths.
A trained :class:`Aligner` is saved as a folder ``config.json`` + ``model.safetensors``.
torch is imported only by the functions that train or load, so importing this module stays light.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_checkpoint, save_checkpoint
from embedstore._optional import import_optional
from embedstore._params import Float, Int, Text, check_fields
from embedstore._schema import parse_geometry
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)
MIN_PROJECT_ROWS = 32

KIND = "aligner"


@dataclass(frozen=True)
class AlignerConfig:
    """Architecture, training settings and provenance of an aligner.

    ``image_dim`` and ``n_genes`` of 0 mean "take them from the arrays given to :func:`fit`".
    ``encoder_fingerprint``, ``geometry`` (the tile geometry of the training embeddings,
    :func:`embedstore._schema.geometry`) and ``genes`` are recorded, not used in training: the
    index checks them against the embeddings and panel it is given.
    """

    image_dim: int = 0
    n_genes: int = 0
    proj_dim: int = 256
    expr_hidden: int = 0  # >0: an MLP layer (Linear+GELU) before the expression head
    dropout: float = 0.1
    temperature: float = 0.07  # initial 1/logit_scale
    learn_temperature: bool = True
    soft_targets: bool = False  # BLEEP's targets softmax(logit_scale * (img_sim + expr_sim) / 2)
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 60
    patience: int = 5  # epochs without a better validation loss before stopping
    val_fraction: float = 0.2
    threads: int = 0  # torch CPU threads while training; 0 keeps torch's setting (1 is fastest on busy machines)
    encoder_name: str = ""
    encoder_fingerprint: str = ""
    geometry: dict[str, Any] | None = None
    genes: tuple[str, ...] = ()
    panel_method: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))
        object.__setattr__(self, "geometry", parse_geometry(self.geometry, "aligner config key 'geometry'"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        d = asdict(self)
        d["genes"] = list(self.genes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "aligner config") -> AlignerConfig:
        """Build from a dict; unknown keys are an error listing the valid ones."""
        if not isinstance(d, dict):
            msg = f"{where}: the settings must be a table of key = value, not {type(d).__name__}; re-save the aligner"
            raise BadInput(msg)
        check_fields(cls, d, where, ranges=False, **FIELD_RULES)
        if d.get("geometry") is not None:
            d = {**d, "geometry": parse_geometry(d["geometry"], f"{where}: key 'geometry'")}
        return cls(**{k: (tuple(v) if k == "genes" else v) for k, v in d.items()})


# Ranges of the settings, checked wherever they are read (recipes, evaluate, config.json files).
# image_dim and n_genes of 0 are filled from the data when training starts.
# The training settings and provenance every contrastive head shares (this aligner and the text aligner).
TRAINING_FIELD_RULES = {
    "lr": Float(gt=0),
    "weight_decay": Float(ge=0),
    "batch_size": Int(min=2),
    "max_epochs": Int(min=1),
    "patience": Int(min=1),
    "val_fraction": Float(ge=0, lt=1),
    "threads": Int(min=0),
    "encoder_name": Text(),
    "encoder_fingerprint": Text(),
}
FIELD_RULES = {
    "image_dim": Int(min=0),
    "n_genes": Int(min=0),
    "proj_dim": Int(min=1),
    "expr_hidden": Int(min=0),
    "dropout": Float(ge=0, lt=1),
    "temperature": Float(gt=0),
    **TRAINING_FIELD_RULES,
    "panel_method": Text(),
}


def _new_model(cfg: AlignerConfig) -> Any:
    """An untrained ``AlignerModel`` shaped by ``cfg`` (imports torch)."""
    import_optional("torch", "the aligner")
    from embedstore._aligner_nets import AlignerModel

    return AlignerModel(
        cfg.image_dim, cfg.n_genes, cfg.proj_dim, cfg.expr_hidden, cfg.dropout, cfg.temperature, cfg.learn_temperature
    )


def _check_2d(a: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2:
        msg = f"{name}: expected a 2-d array (rows, features), got shape {a.shape}"
        raise BadInput(msg)
    if dim is not None and a.shape[1] != dim:
        msg = f"{name}: has {a.shape[1]} columns but the aligner was trained on {dim}; use embeddings/panel of the same encoder and genes"
        raise BadInput(msg)
    if not np.isfinite(a).all():
        msg = f"{name}: contains NaN or infinite values; clean the input first"
        raise BadInput(msg)
    return a


def _project_rows(x: np.ndarray, fn: Any, dim: int, batch_size: int) -> np.ndarray:
    """``normalize(fn(rows))`` in batches, as (N, dim) float32; a row's result never depends on its batch.

    Shared by the aligners: ``fn`` maps a float32 tensor of rows to their (unnormalised) projections.
    """
    torch = import_optional("torch", "the aligner")
    out = np.empty((x.shape[0], dim), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch_size):
            chunk = x[s : s + batch_size]
            n = chunk.shape[0]
            # CPU matrix kernels round differently for a handful of rows: pad short batches,
            # so streaming a slide in row groups equals projecting it in one call, bit for bit.
            if n < MIN_PROJECT_ROWS:
                chunk = np.concatenate([chunk, np.zeros((MIN_PROJECT_ROWS - n, chunk.shape[1]), chunk.dtype)])
            z = fn(torch.from_numpy(np.ascontiguousarray(chunk)))[:n]
            out[s : s + n] = torch.nn.functional.normalize(z, dim=-1).numpy()
    return out


class Aligner:
    """A trained aligner: projects image embeddings and expression into one L2-normalised space.

    Attributes
    ----------
    config
        The :class:`AlignerConfig` (input dims, encoder fingerprint, gene panel, settings).
    model
        The torch ``AlignerModel`` (eval mode).
    history
        Per-epoch training and validation losses (empty after loading).
    """

    def __init__(self, config: AlignerConfig, model: Any, history: list[dict[str, float]] | None = None) -> None:
        self.config = config
        self.model = model.eval()
        self.history = history or []

    @property
    def dim(self) -> int:
        """Dimension of the aligned space."""
        return self.config.proj_dim

    def _project(self, x: np.ndarray, fn: Any, batch_size: int) -> np.ndarray:
        """Rows projected in batches; a row's result never depends on the batch it came in."""
        return _project_rows(x, fn, self.dim, batch_size)

    def project_images(self, emb: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Image embeddings (N, image_dim) -> (N, proj_dim) float32, L2-normalised."""
        emb = _check_2d(emb, "image embeddings", self.config.image_dim)
        return self._project(emb, self.model.encode_image, batch_size)

    def project_expression(self, expr: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Log-normalised panel expression (N, n_genes) -> (N, proj_dim) float32, L2-normalised."""
        expr = _check_2d(expr, "expression", self.config.n_genes)
        return self._project(expr, self.model.encode_expression, batch_size)

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into the folder ``path``."""
        return save_aligner(self, path)


def _split(n: int, groups: np.ndarray | None, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of validation rows: whole groups (slides/patients) when given."""
    val = np.zeros(n, dtype=bool)
    if val_fraction <= 0 or n < 4:
        return val
    if groups is not None:
        uniq = np.unique(groups)
        if len(uniq) >= 2:
            # add shuffled groups until about val_fraction of the rows are held out, keeping one for training
            for g in rng.permutation(uniq)[:-1]:
                if val.mean() >= val_fraction:
                    break
                val |= groups == g
            return val
        LOG.warning("aligner.fit: only one group; validating on random rows instead of held-out groups")
    val[rng.choice(n, size=max(1, round(n * val_fraction)), replace=False)] = True
    return val


def fit(
    image_emb: np.ndarray,
    expr: np.ndarray,
    groups: np.ndarray | None = None,
    cfg: AlignerConfig | None = None,
    seed: int = 0,
) -> Aligner:
    """Train the aligner on frozen image embeddings and log-normalised panel expression.

    Parameters
    ----------
    image_emb
        (N, D) embeddings of the reference spots' tiles.
    expr
        (N, G) log-normalised expression of the same spots over the panel (``cfg.genes``).
    groups
        (N,) slide or patient of each row; whole groups are held out for validation. ``None``
        holds out random rows.
    cfg
        Settings; ``image_dim``/``n_genes`` are filled from the arrays.
    seed
        Seeds the split, initialisation, shuffling and dropout.

    Returns
    -------
    The :class:`Aligner` at the epoch with the lowest validation loss (early stopping after
    ``cfg.patience`` epochs without improvement), with its ``history``.
    """
    torch = import_optional("torch", "aligner.fit")
    cfg = cfg or AlignerConfig()
    image_emb = _check_2d(image_emb, "image embeddings")
    expr = _check_2d(expr, "expression")
    n = image_emb.shape[0]
    if expr.shape[0] != n or (groups is not None and len(groups) != n):
        msg = (
            f"aligner.fit: image embeddings ({n} rows), expression ({expr.shape[0]}) and groups must have the same rows"
        )
        raise BadInput(msg)
    if cfg.genes and len(cfg.genes) != expr.shape[1]:
        msg = f"aligner.fit: config has {len(cfg.genes)} panel genes but expression has {expr.shape[1]} columns"
        raise BadInput(msg)
    if n < 2:
        msg = "aligner.fit: needs at least 2 rows"
        raise BadInput(msg)
    cfg = AlignerConfig.from_dict({**cfg.to_dict(), "image_dim": image_emb.shape[1], "n_genes": expr.shape[1]})
    rng = np.random.default_rng(seed)
    val = _split(n, None if groups is None else np.asarray(groups), cfg.val_fraction, rng)
    tr_idx, va_idx = np.flatnonzero(~val), np.flatnonzero(val)
    torch.manual_seed(seed)
    model = _new_model(cfg)
    from embedstore._aligner_nets import ClipLoss
    from embedstore._training import train

    loss_fn = ClipLoss(cfg.soft_targets)
    # standardise on the training rows only; the statistics travel in the checkpoint
    for name, a in (("image", image_emb), ("expr", expr)):
        getattr(model, f"{name}_mean").copy_(torch.from_numpy(a[tr_idx].mean(0)))
        getattr(model, f"{name}_std").copy_(torch.from_numpy(np.maximum(a[tr_idx].std(0), 1e-6)))
    X, Y = torch.from_numpy(image_emb), torch.from_numpy(expr)

    def batch_loss(rows: np.ndarray) -> Any:
        return loss_fn(model.encode_image(X[rows]), model.encode_expression(Y[rows]), model.logit_scale.exp())

    def clamp_temperature() -> None:
        with torch.no_grad():  # as CLIP does, so the temperature cannot collapse
            model.logit_scale.clamp_(0, math.log(100))

    history = train(
        model,
        batch_loss,
        tr_idx,
        va_idx,
        name="aligner",
        seed=seed,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=max(2, min(cfg.batch_size, len(tr_idx))),
        max_epochs=cfg.max_epochs,
        patience=cfg.patience,
        min_improvement=1e-4,
        min_batch=2,  # a contrastive batch needs negatives
        after_step=clamp_temperature,
        threads=cfg.threads,
    )
    return Aligner(cfg, model, history)


def save_aligner(aligner: Aligner, path: str | Path) -> Path:
    """Save ``aligner`` as a folder: ``config.json`` + ``model.safetensors`` (no pickle).

    Parameters
    ----------
    aligner
        The trained aligner.
    path
        Folder to write; an existing aligner there is replaced in one atomic swap, anything
        else (user files, a store) is refused untouched.
    """
    return save_checkpoint(path, KIND, aligner.config.to_dict(), aligner.model)


def _resolve(path: str | Path) -> Path:
    """A local folder, or ``hf-hub:org/repo[@revision]`` fetched with huggingface_hub."""
    s = str(path)
    if not s.startswith("hf-hub:"):
        p = Path(s)
        if not p.is_dir():
            msg = (
                f"{p}: aligner folder not found; pass a folder with {CONFIG_FILE} and {WEIGHTS_FILE} or hf-hub:org/repo"
            )
            raise BadInput(msg)
        return p
    hub = import_optional("huggingface_hub", "load_aligner from the hub")
    repo, _, revision = s.removeprefix("hf-hub:").partition("@")
    files = [
        hub.hf_hub_download(repo_id=repo, filename=f, revision=revision or None) for f in (CONFIG_FILE, WEIGHTS_FILE)
    ]
    parents = {Path(f).parent for f in files}
    if len(parents) != 1:
        msg = f"hf-hub:{repo}: {CONFIG_FILE} and {WEIGHTS_FILE} came to different folders; upload both to the repo root"
        raise BadInput(msg)
    return parents.pop()


def load_aligner(path: str | Path) -> Aligner:
    """Load an aligner from a local folder or ``"hf-hub:org/repo"``.

    Raises
    ------
    BadInput
        Naming the file when ``config.json`` or ``model.safetensors`` is missing, corrupted or
        does not match the config.
    """
    folder = _resolve(path)
    config, state, cfg_path, w_path = read_checkpoint(folder, KIND, "re-save the aligner with save_aligner")
    cfg = AlignerConfig.from_dict(config, str(cfg_path))
    model = load_weights(_new_model(cfg), state, cfg_path, w_path)
    return Aligner(cfg, model)


__all__ = [
    "Aligner",
    "AlignerConfig",
    "fit",
    "load_aligner",
    "save_aligner",
]
