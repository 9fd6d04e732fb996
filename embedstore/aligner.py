"""Contrastive image-expression aligner on frozen embeddings (BLEEP style).

open_clip's split: the model (:class:`ProjectionHead`, :class:`ExpressionEncoder`), the loss
(:class:`ClipLoss`) and the training loop (:func:`fit`) are separate. The loop takes arrays
(stored embeddings and log-normalised panel expression), never encoders or paths.
A trained :class:`Aligner` is saved as a folder ``config.json`` + ``model.safetensors``.
torch is imported lazily, so the ``nn.Module`` classes are built on first use.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_checkpoint, save_checkpoint
from embedstore._optional import import_optional
from embedstore._params import Float, Int, Text, check_fields
from embedstore._schema import parse_geometry
from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

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
FIELD_RULES = {
    "image_dim": Int(min=0),
    "n_genes": Int(min=0),
    "proj_dim": Int(min=1),
    "expr_hidden": Int(min=0),
    "dropout": Float(ge=0, lt=1),
    "temperature": Float(gt=0),
    "lr": Float(gt=0),
    "weight_decay": Float(ge=0),
    "batch_size": Int(min=2),
    "max_epochs": Int(min=1),
    "patience": Int(min=1),
    "val_fraction": Float(ge=0, lt=1),
    "threads": Int(min=0),
    "encoder_name": Text(),
    "encoder_fingerprint": Text(),
    "panel_method": Text(),
}


@cache
def _modules() -> dict[str, type]:
    """Define the torch modules on first use (keeps ``import embedstore.aligner`` torch-free)."""
    torch = import_optional("torch", "the aligner")
    nn = torch.nn
    F = torch.nn.functional

    class ProjectionHead(nn.Module):
        """BLEEP's head: Linear, GELU, Linear, Dropout, residual, LayerNorm."""

        def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1) -> None:
            super().__init__()
            self.projection = nn.Linear(in_dim, out_dim)
            self.gelu = nn.GELU()
            self.fc = nn.Linear(out_dim, out_dim)
            self.dropout = nn.Dropout(dropout)
            self.layer_norm = nn.LayerNorm(out_dim)

        def forward(self, x):
            projected = self.projection(x)
            x = self.dropout(self.fc(self.gelu(projected)))
            return self.layer_norm(x + projected)

    class ExpressionEncoder(nn.Module):
        """Log-normalised panel expression -> projection (optionally through an MLP layer)."""

        def __init__(self, n_genes: int, out_dim: int = 256, hidden: int = 0, dropout: float = 0.1) -> None:
            super().__init__()
            self.mlp = (
                nn.Sequential(nn.Linear(n_genes, hidden), nn.GELU(), nn.Dropout(dropout)) if hidden else nn.Identity()
            )
            self.head = ProjectionHead(hidden or n_genes, out_dim, dropout)

        def forward(self, x):
            return self.head(self.mlp(x))

    class ClipLoss(nn.Module):
        """Symmetric cross-entropy on ``logit_scale * a @ b.T`` (open_clip ``ClipLoss``).

        With ``soft_targets`` the targets are BLEEP's
        ``softmax(logit_scale * (a @ a.T + b @ b.T) / 2)`` instead of the identity.
        Features are L2-normalised inside.
        """

        def __init__(self, soft_targets: bool = False) -> None:
            super().__init__()
            self.soft_targets = soft_targets

        def forward(self, image_features, expr_features, logit_scale):
            a = F.normalize(image_features, dim=-1)
            b = F.normalize(expr_features, dim=-1)
            logits = logit_scale * a @ b.T
            if self.soft_targets:
                with torch.no_grad():
                    targets = F.softmax(logit_scale * (a @ a.T + b @ b.T) / 2, dim=-1)
                # the similarity matrices are symmetric, so targets.T is the other direction's target
                return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2
            labels = torch.arange(a.shape[0], device=a.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    class AlignerModel(nn.Module):
        """Both heads, the temperature and the input standardisation (as buffers, so they are saved)."""

        def __init__(self, cfg: AlignerConfig) -> None:
            super().__init__()
            self.image_head = ProjectionHead(cfg.image_dim, cfg.proj_dim, cfg.dropout)
            self.expr_encoder = ExpressionEncoder(cfg.n_genes, cfg.proj_dim, cfg.expr_hidden, cfg.dropout)
            self.logit_scale = nn.Parameter(
                torch.tensor(math.log(1 / cfg.temperature)), requires_grad=cfg.learn_temperature
            )
            self.register_buffer("image_mean", torch.zeros(cfg.image_dim))
            self.register_buffer("image_std", torch.ones(cfg.image_dim))
            self.register_buffer("expr_mean", torch.zeros(cfg.n_genes))
            self.register_buffer("expr_std", torch.ones(cfg.n_genes))

        def encode_image(self, x):
            return self.image_head((x - self.image_mean) / self.image_std)

        def encode_expression(self, x):
            return self.expr_encoder((x - self.expr_mean) / self.expr_std)

    classes = (ProjectionHead, ExpressionEncoder, ClipLoss, AlignerModel)
    for cls in classes:  # readable reprs and error messages: embedstore.aligner.ClipLoss
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


def __getattr__(name: str) -> Any:
    # ProjectionHead, ExpressionEncoder, ClipLoss, AlignerModel are built lazily (torch is heavy)
    if name in ("ProjectionHead", "ExpressionEncoder", "ClipLoss", "AlignerModel"):
        return _modules()[name]
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


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
        torch = import_optional("torch", "the aligner")
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, x.shape[0], batch_size):
                z = fn(torch.from_numpy(x[s : s + batch_size]))
                out[s : s + batch_size] = torch.nn.functional.normalize(z, dim=-1).numpy()
        return out

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
    m = _modules()
    model = m["AlignerModel"](cfg)
    loss_fn = m["ClipLoss"](cfg.soft_targets)
    # standardise on the training rows only; the statistics travel in the checkpoint
    for name, a in (("image", image_emb), ("expr", expr)):
        getattr(model, f"{name}_mean").copy_(torch.from_numpy(a[tr_idx].mean(0)))
        getattr(model, f"{name}_std").copy_(torch.from_numpy(np.maximum(a[tr_idx].std(0), 1e-6)))
    from embedstore._adamw import AdamW

    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    X, Y = torch.from_numpy(image_emb), torch.from_numpy(expr)
    gen = torch.Generator().manual_seed(seed)
    bs = max(2, min(cfg.batch_size, len(tr_idx)))

    def run_epoch(idx: np.ndarray, train: bool) -> float:
        model.train(train)
        order = idx[torch.randperm(len(idx), generator=gen).numpy()] if train else idx
        total, count = 0.0, 0
        for s in range(0, len(order), bs):
            b = order[s : s + bs]
            if len(b) < 2:  # a contrastive batch needs negatives
                continue
            with torch.set_grad_enabled(train):
                loss = loss_fn(model.encode_image(X[b]), model.encode_expression(Y[b]), model.logit_scale.exp())
            if train:
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():  # clamp as CLIP does, so the temperature cannot collapse
                    model.logit_scale.clamp_(0, math.log(100))
            total += float(loss.detach()) * len(b)
            count += len(b)
        return total / max(count, 1)

    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        _train(cfg, run_epoch, tr_idx, va_idx, model, history, t0)
    finally:
        torch.set_num_threads(prev_threads)
    return Aligner(cfg, model, history)


def _train(
    cfg: AlignerConfig, run_epoch: Any, tr_idx: np.ndarray, va_idx: np.ndarray, model: Any, history: list, t0: float
) -> None:
    """Epoch loop with early stopping; leaves ``model`` at its best validation epoch."""
    best, best_state, stale = math.inf, None, 0
    for epoch in range(cfg.max_epochs):
        tr_loss = run_epoch(tr_idx, True)
        va_loss = run_epoch(va_idx, False) if len(va_idx) >= 2 else tr_loss
        history.append(
            {"epoch": epoch, "train_loss": tr_loss, "val_loss": va_loss, "seconds": time.perf_counter() - t0}
        )
        LOG.info("aligner epoch %d: train %.4f val %.4f (%.1fs)", epoch, tr_loss, va_loss, time.perf_counter() - t0)
        if va_loss < best - 1e-4:
            best, stale = va_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                LOG.info("aligner: early stop at epoch %d (best val %.4f)", epoch, best)
                break
    if best_state is not None:
        model.load_state_dict(best_state)


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
    model = load_weights(_modules()["AlignerModel"](cfg), state, cfg_path, w_path)
    return Aligner(cfg, model)


__all__ = [
    "Aligner",
    "AlignerConfig",
    "fit",
    "load_aligner",
    "save_aligner",
]
