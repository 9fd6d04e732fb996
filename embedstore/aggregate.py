"""Aggregators: the k retrieved exemplars' expression -> one predicted profile.

Every aggregator works on arrays: ``sims`` (N, k) cosine similarities of the query to its k
neighbours, and ``neighbour_expr`` (N, k, G) their log-normalised expression. The learned
one also reads the query's key (N, d) and the neighbours' keys (N, k, d). They never
search; ``predict.py``/``index.py`` retrieve and pass the arrays in.

Registered names (``AGGREGATORS``, :func:`create_aggregator`):

- ``mean``: plain mean of the top k (BLEEP).
- ``softmax``: weights ``softmax(sims / tau)`` (Loki-like similarity weighting).
- ``idw``: inverse-distance weights ``1 / (1 - sims + eps)`` (mclSTExp).
- ``loki``: weights are the similarities themselves, ``sum_j s_j e_j / sum_j s_j`` (Loki's
  ``predex`` rule, over the top k; :func:`embedstore.loki.predict_exact` is the rule over every
  reference spot).
- ``learned``: EGN-style exemplar attention, trained with :func:`fit_learned_aggregator`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._checkpoint import load_weights, read_checkpoint, save_checkpoint
from embedstore._optional import import_optional
from embedstore._params import Float, Int, check_fields
from embedstore._registry import Registry
from embedstore.errors import BadInput

AGGREGATORS = Registry("aggregator")
KIND = "aggregator.learned"


def _check(sims: np.ndarray, neighbour_expr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = np.asarray(sims, dtype=np.float64)
    neighbour_expr = np.asarray(neighbour_expr, dtype=np.float32)
    if sims.ndim != 2 or neighbour_expr.ndim != 3 or neighbour_expr.shape[:2] != sims.shape:
        msg = f"aggregator: sims {sims.shape} and neighbour_expr {neighbour_expr.shape} must be (N, k) and (N, k, G)"
        raise BadInput(msg)
    if not np.isfinite(sims).all():
        msg = "aggregator: sims has NaN/inf (a neighbour was missing); search with a larger nprobe/efSearch or a smaller k"
        raise BadInput(msg)
    return sims, neighbour_expr


def _weighted(w: np.ndarray, neighbour_expr: np.ndarray) -> np.ndarray:
    w = w / w.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkg->ng", w.astype(np.float32), neighbour_expr)


def mean(sims: np.ndarray, neighbour_expr: np.ndarray) -> np.ndarray:
    """Unweighted mean of the k neighbours' expression, (N, G) float32 (BLEEP)."""
    sims, neighbour_expr = _check(sims, neighbour_expr)
    return neighbour_expr.mean(axis=1, dtype=np.float64).astype(np.float32)


def softmax(sims: np.ndarray, neighbour_expr: np.ndarray, tau: float = 0.1) -> np.ndarray:
    """Similarity-softmax weighted mean: ``w_j ∝ exp(s_j / tau)``, (N, G) float32.

    Parameters
    ----------
    sims, neighbour_expr
        (N, k) similarities and (N, k, G) expression of the neighbours.
    tau
        Temperature; small values approach the top-1 neighbour, large ones the mean.
    """
    if tau <= 0:
        msg = f"softmax aggregator: tau={tau} must be positive"
        raise BadInput(msg)
    sims, neighbour_expr = _check(sims, neighbour_expr)
    z = sims / tau
    return _weighted(np.exp(z - z.max(axis=1, keepdims=True)), neighbour_expr)


def idw(sims: np.ndarray, neighbour_expr: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Inverse-distance weighted mean: distance ``d_j = 1 - s_j`` (cosine), ``w_j ∝ 1/(d_j + eps)``.

    Parameters
    ----------
    sims, neighbour_expr
        (N, k) cosine similarities and (N, k, G) expression of the neighbours.
    eps
        Keeps an exact duplicate (d = 0) from taking all the weight by division by zero.
    """
    if eps <= 0:
        msg = f"idw aggregator: eps={eps} must be positive"
        raise BadInput(msg)
    sims, neighbour_expr = _check(sims, neighbour_expr)
    d = np.clip(1.0 - sims, 0.0, None)  # rounding can push cos sim a hair above 1
    return _weighted(1.0 / (d + eps), neighbour_expr)


def loki(sims: np.ndarray, neighbour_expr: np.ndarray) -> np.ndarray:
    """Loki's similarity-weighted mean: ``w_j = s_j`` (raw cosine similarities, not exponentiated).

    Loki (``predex``) divides ``sims @ expression`` by the row sums of ``sims``; a row whose
    similarities sum to zero (no meaningful weights) falls back to the plain mean.
    """
    sims, neighbour_expr = _check(sims, neighbour_expr)
    total = sims.sum(axis=1, keepdims=True)
    flat = np.abs(total) < 1e-12
    w = np.where(flat, 1.0, sims) / np.where(flat, sims.shape[1], total)
    return np.einsum("nk,nkg->ng", w.astype(np.float32), neighbour_expr)


class Aggregator:
    """A named aggregator with fixed parameters; call it on (sims, neighbour_expr).

    Attributes
    ----------
    name, params
        Registry name and keyword parameters (go into an index manifest).
    needs_keys
        True when ``__call__`` also needs ``query_keys`` and ``neighbour_keys``.
    """

    needs_keys = False

    def __init__(self, name: str, fn: Any, **params: Any) -> None:
        self.name, self.fn, self.params = name, fn, params

    def __call__(
        self,
        sims: np.ndarray,
        neighbour_expr: np.ndarray,
        query_keys: np.ndarray | None = None,
        neighbour_keys: np.ndarray | None = None,
    ) -> np.ndarray:
        """Predicted expression (N, G) float32."""
        return self.fn(sims, neighbour_expr, **self.params)

    def __repr__(self) -> str:
        return f"Aggregator({self.name!r}, {self.params})"


@AGGREGATORS.register("mean", params="", source="BLEEP")
def _mean() -> Aggregator:
    return Aggregator("mean", mean)


@AGGREGATORS.register("softmax", params="tau=0.1", source="Loki-like")
def _softmax(tau: float = 0.1) -> Aggregator:
    return Aggregator("softmax", softmax, tau=float(tau))


@AGGREGATORS.register("idw", params="eps=1e-3", source="mclSTExp")
def _idw(eps: float = 1e-3) -> Aggregator:
    return Aggregator("idw", idw, eps=float(eps))


@AGGREGATORS.register("loki", params="", source="Loki predex (image-text similarity weights)")
def _loki() -> Aggregator:
    return Aggregator("loki", loki)


@AGGREGATORS.register("learned", params="path", source="EGN-style exemplar attention")
def _learned(path: str | Path) -> LearnedAggregator:
    return load_learned_aggregator(path)


def create_aggregator(name: str, **params: Any) -> Aggregator:
    """Build the aggregator registered as ``name`` (``mean``, ``softmax``, ``idw``, ``loki``, ``learned``)."""
    return AGGREGATORS.create(name, **params)


def list_aggregators():  # -> pandas.DataFrame
    """Registered aggregators and their metadata, one row each."""
    return AGGREGATORS.to_dataframe()


# ---------------------------------------------------------------- learned (EGN-style)


@dataclass(frozen=True)
class LearnedAggregatorConfig:
    """Architecture and training settings of the exemplar-attention aggregator.

    ``key_dim`` and ``n_genes`` of 0 are filled from the arrays given to the fit.
    """

    key_dim: int = 0
    n_genes: int = 0
    hidden: int = 128
    residual: bool = True  # add a correction MLP on top of the attention-weighted mean
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 50
    patience: int = 5
    val_fraction: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "aggregator config") -> LearnedAggregatorConfig:
        """Build from a dict; unknown keys are an error listing the valid ones."""
        if not isinstance(d, dict):
            msg = (
                f"{where}: the settings must be a table of key = value, not {type(d).__name__}; re-save the aggregator"
            )
            raise BadInput(msg)
        check_fields(cls, d, where, ranges=False, **LEARNED_FIELD_RULES)
        return cls(**d)


# Ranges of the settings, checked wherever they are read (key_dim and n_genes of 0 are filled by the fit).
LEARNED_FIELD_RULES = {
    "key_dim": Int(min=0),
    "n_genes": Int(min=0),
    "hidden": Int(min=1),
    "dropout": Float(ge=0, lt=1),
    "lr": Float(gt=0),
    "weight_decay": Float(ge=0),
    "batch_size": Int(min=1),
    "max_epochs": Int(min=1),
    "patience": Int(min=1),
    "val_fraction": Float(ge=0, lt=1),
}


def _new_model(cfg: LearnedAggregatorConfig) -> Any:
    """An untrained ``ExemplarAttention`` shaped by ``cfg`` (imports torch)."""
    import_optional("torch", "the learned aggregator")
    from embedstore._aggregator_nets import ExemplarAttention

    return ExemplarAttention(cfg.key_dim, cfg.n_genes, cfg.hidden, cfg.residual, cfg.dropout)


class LearnedAggregator(Aggregator):
    """EGN-style exemplar-attention aggregator (a trained torch module).

    Call it with ``query_keys`` (N, d) and ``neighbour_keys`` (N, k, d) besides the sims and
    neighbour expression. Save with :meth:`save`, load with :func:`load_learned_aggregator`.
    """

    needs_keys = True

    def __init__(self, config: LearnedAggregatorConfig, model: Any, history: list[dict[str, float]] | None = None):
        super().__init__("learned", None)
        self.config, self.model, self.history = config, model.eval(), history or []

    def __call__(
        self,
        sims: np.ndarray,
        neighbour_expr: np.ndarray,
        query_keys: np.ndarray | None = None,
        neighbour_keys: np.ndarray | None = None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Predicted expression (N, G) float32."""
        torch = import_optional("torch", "the learned aggregator")
        sims, neighbour_expr = _check(sims, neighbour_expr)
        if query_keys is None or neighbour_keys is None:
            msg = "learned aggregator: needs query_keys (N, d) and neighbour_keys (N, k, d); pass them from the index search"
            raise BadInput(msg)
        q, nk = _check_keys(query_keys, neighbour_keys, sims.shape, self.config.key_dim)
        if neighbour_expr.shape[2] != self.config.n_genes:
            msg = f"learned aggregator: trained on {self.config.n_genes} genes, got {neighbour_expr.shape[2]}; use the index's panel"
            raise BadInput(msg)
        out = np.empty((sims.shape[0], self.config.n_genes), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(out), batch_size):
                sl = slice(s, s + batch_size)
                t = [
                    torch.from_numpy(np.ascontiguousarray(a[sl], dtype=np.float32))
                    for a in (q, nk, neighbour_expr, sims)
                ]
                out[sl] = self.model(*t).numpy()
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into the folder ``path``."""
        return save_checkpoint(path, KIND, self.config.to_dict(), self.model)


def _check_keys(query_keys: Any, neighbour_keys: Any, nk_shape: tuple[int, ...], dim: int | None = None):
    q = np.asarray(query_keys, dtype=np.float32)
    nk = np.asarray(neighbour_keys, dtype=np.float32)
    n, k = nk_shape
    if q.shape[:1] != (n,) or q.ndim != 2 or nk.shape[:2] != (n, k) or nk.ndim != 3 or nk.shape[2] != q.shape[1]:
        msg = (
            f"learned aggregator: query_keys {q.shape} and neighbour_keys {nk.shape} must be ({n}, d) and ({n}, {k}, d)"
        )
        raise BadInput(msg)
    if dim and q.shape[1] != dim:
        msg = f"learned aggregator: trained on {dim}-d keys, got {q.shape[1]}-d; use the index it was trained with"
        raise BadInput(msg)
    return q, nk


def fit_learned_aggregator(
    query_keys: np.ndarray,
    neighbour_keys: np.ndarray,
    neighbour_expr: np.ndarray,
    sims: np.ndarray,
    target_expr: np.ndarray,
    cfg: LearnedAggregatorConfig | None = None,
    seed: int = 0,
) -> LearnedAggregator:
    """Train the exemplar-attention aggregator by MSE to the reference's own expression.

    Parameters
    ----------
    query_keys
        (N, d) keys of the reference queries (aligned image embeddings).
    neighbour_keys, neighbour_expr, sims
        (N, k, d), (N, k, G), (N, k): the retrieved exemplars, found with the query's own
        slide (or patient) *excluded*, as at prediction time on a new slide.
    target_expr
        (N, G) the queries' measured log-normalised expression.
    cfg
        Settings; ``key_dim``/``n_genes`` are filled from the arrays.
    seed
        Seeds the validation split, initialisation and shuffling.

    Returns
    -------
    The :class:`LearnedAggregator` at the epoch with the lowest validation MSE; its ``history``
    holds each epoch's ``train_loss`` and ``val_loss`` (MSE).
    """
    torch = import_optional("torch", "fit_learned_aggregator")
    sims, neighbour_expr = _check(sims, neighbour_expr)
    q, nk = _check_keys(query_keys, neighbour_keys, sims.shape)
    target = np.asarray(target_expr, dtype=np.float32)
    if target.shape != (sims.shape[0], neighbour_expr.shape[2]):
        msg = f"fit_learned_aggregator: target_expr {target.shape} must be (N, G) = {(sims.shape[0], neighbour_expr.shape[2])}"
        raise BadInput(msg)
    cfg = cfg or LearnedAggregatorConfig()
    cfg = LearnedAggregatorConfig.from_dict({**cfg.to_dict(), "key_dim": q.shape[1], "n_genes": target.shape[1]})
    n = len(target)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = round(n * cfg.val_fraction) if n >= 10 else 0
    va_idx, tr_idx = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    model = _new_model(cfg)
    model.expr_mean.copy_(torch.from_numpy(target[tr_idx].mean(0)))
    model.expr_std.copy_(torch.from_numpy(np.maximum(target[tr_idx].std(0), 1e-3)))
    T = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (q, nk, neighbour_expr, sims, target)]
    from embedstore._training import train

    def batch_loss(rows: np.ndarray) -> Any:
        b = torch.from_numpy(rows)
        return torch.nn.functional.mse_loss(model(*(t[b] for t in T[:4])), T[4][b])

    history = train(
        model,
        batch_loss,
        tr_idx,
        va_idx,
        name="learned aggregator",
        seed=seed,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        max_epochs=cfg.max_epochs,
        patience=cfg.patience,
        min_improvement=1e-6,
    )
    return LearnedAggregator(cfg, model, history)


def load_learned_aggregator(path: str | Path) -> LearnedAggregator:
    """Load a :class:`LearnedAggregator` folder (``config.json`` + ``model.safetensors``).

    Raises
    ------
    BadInput
        Naming the file when either is missing or corrupted.
    """
    config, state, cfg_path, w_path = read_checkpoint(Path(path), KIND, "re-save it with LearnedAggregator.save")
    cfg = LearnedAggregatorConfig.from_dict(config, str(cfg_path))
    model = load_weights(_new_model(cfg), state, cfg_path, w_path)
    return LearnedAggregator(cfg, model)
