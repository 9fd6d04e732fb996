"""Expression normalisation and gene panels (arrays in, arrays out).

Counts are normalised per spot to ``target_sum`` and log1p-transformed, as scanpy's
``normalize_total`` + ``log1p``. Gene panels are chosen on the *reference* only and
then applied to every other data set by name, so a query never influences the panel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from embedstore.errors import BadInput

LOG = logging.getLogger(__name__)

PANEL_METHODS = ("hvg", "mean", "list")


def normalize_log1p(X: Any, target_sum: float = 1e4) -> Any:
    """Library-size normalise each row to ``target_sum`` and apply ``log1p``.

    Parameters
    ----------
    X
        Raw counts, spots x genes: a NumPy array or a SciPy sparse matrix.
    target_sum
        Total each row is scaled to before the log.

    Returns
    -------
    float32 array of the same kind (sparse stays CSR, zeros stay zeros). Rows that sum to 0
    stay 0 rather than becoming NaN.
    """
    if target_sum <= 0:
        msg = f"target_sum={target_sum}: must be positive; use e.g. 1e4"
        raise BadInput(msg)
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        totals = np.asarray(X.sum(axis=1)).ravel()
        _check_counts(X.data, totals)
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
        # scale the stored values row by row without densifying
        X.data *= np.repeat(scale, np.diff(X.indptr)).astype(np.float32)
        np.log1p(X.data, out=X.data)
        return X
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        msg = f"expression matrix: expected 2 dimensions (spots, genes), got shape {X.shape}; pass a 2-d array"
        raise BadInput(msg)
    totals = X.sum(axis=1)
    _check_counts(X, totals)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(X * scale[:, None]).astype(np.float32)


def _check_counts(values: np.ndarray, totals: np.ndarray) -> None:
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        msg = "expression matrix: has negative or non-finite values; pass raw counts (already-logged data cannot be re-normalised)"
        raise BadInput(msg)


@dataclass(frozen=True)
class Panel:
    """An ordered list of genes and how it was chosen.

    Attributes
    ----------
    genes
        Gene names in the order of every expression column that uses the panel.
    method
        ``"hvg"`` (highest variance of log-normalised values), ``"mean"`` (highest mean of
        log-normalised values) or ``"list"`` (given by the user).
    params
        Settings of the selection (``n``, ``target_sum``, number of reference spots ...).
    """

    genes: tuple[str, ...]
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))
        if len(set(self.genes)) != len(self.genes):
            msg = f"gene panel: has duplicate genes {_dupes(self.genes)[:10]}; give each gene once"
            raise BadInput(msg)
        if self.method not in PANEL_METHODS:
            msg = f"gene panel: unknown method {self.method!r}; use one of {', '.join(PANEL_METHODS)}"
            raise BadInput(msg)

    def __len__(self) -> int:
        return len(self.genes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: genes, method, params."""
        d = asdict(self)
        d["genes"] = list(self.genes)
        return d

    def to_json(self) -> str:
        """The panel as a JSON string (see :meth:`from_json`)."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "panel") -> Panel:
        """Rebuild a panel from :meth:`to_dict` output; ``where`` names the source in errors."""
        unknown = set(d) - {"genes", "method", "params"}
        if unknown or "genes" not in d:
            msg = f"{where}: not a gene panel (keys {sorted(d)}); expected genes, method, params"
            raise BadInput(msg)
        return cls(tuple(d["genes"]), d.get("method", "list"), dict(d.get("params", {})))

    @classmethod
    def from_json(cls, text: str, where: str = "panel.json") -> Panel:
        """Parse :meth:`to_json` output."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            msg = f"{where}: not valid JSON ({e}); rewrite it with Panel.to_json()"
            raise BadInput(msg) from e
        if not isinstance(d, dict):
            msg = f"{where}: expected a JSON object with genes, method, params"
            raise BadInput(msg)
        return cls.from_dict(d, where)


def _dupes(genes: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({g for g in genes if g in seen or seen.add(g)})


def _unpack(data: Any, genes: Sequence[str] | None) -> tuple[Any, list[str]]:
    # accept AnnData-like objects without importing anndata
    if genes is None and hasattr(data, "var_names") and hasattr(data, "X"):
        return data.X, [str(g) for g in data.var_names]
    if genes is None:
        msg = "expression matrix: gene names are missing; pass genes=... or an AnnData"
        raise BadInput(msg)
    genes = [str(g) for g in genes]
    if data.shape[1] != len(genes):
        msg = f"expression matrix: has {data.shape[1]} columns but {len(genes)} gene names; pass one name per column"
        raise BadInput(msg)
    dup = _dupes(genes)
    if dup:
        msg = f"expression matrix: duplicate gene names {dup[:10]}; make var_names unique first"
        raise BadInput(msg)
    return data, genes


def select_panel(
    data: Any,
    genes: Sequence[str] | None = None,
    method: str | Sequence[str] = "hvg",
    n: int = 250,
    *,
    include: Sequence[str] = (),
    target_sum: float = 1e4,
    normalized: bool = False,
) -> Panel:
    """Choose a gene panel on the reference data.

    Parameters
    ----------
    data
        Reference counts (spots x genes, dense or sparse) or an AnnData (then ``genes`` is
        ``var_names``).
    genes
        Column names of ``data``.
    method
        ``"hvg"``: the ``n`` genes with the highest variance of log-normalised values;
        ``"mean"``: the ``n`` genes with the highest mean log-normalised value;
        or a list of gene names (kept in the given order; all must be in ``data``).
    n
        Panel size for ``"hvg"`` and ``"mean"``.
    include
        Genes always in a ``"hvg"`` or ``"mean"`` panel: appended after the ``n`` chosen ones,
        in the given order, those already chosen left out (all must be in ``data``).
    target_sum, normalized
        Normalisation before ranking; set ``normalized=True`` when ``data`` is already
        log-normalised.

    Returns
    -------
    The :class:`Panel`. Ties are broken by the reference's column order.
    """
    X, names = _unpack(data, genes)
    if not isinstance(method, str):
        wanted = [str(g) for g in method]
        _check_measured(wanted, names)
        return Panel(tuple(wanted), "list", {"n": len(wanted)})
    extra = [str(g) for g in include]
    _check_measured(extra, names)
    if method not in ("hvg", "mean"):
        msg = f"panel method {method!r}: unknown; use 'hvg', 'mean' or a list of genes"
        raise BadInput(msg)
    if n <= 0:
        msg = f"panel size n={n}: must be positive"
        raise BadInput(msg)
    L = X if normalized else normalize_log1p(X, target_sum)
    mean = np.asarray(L.mean(axis=0), dtype=np.float64).ravel()
    if method == "mean":
        score = mean
    else:
        sq = L.multiply(L) if sp.issparse(L) else np.square(L, dtype=np.float64)
        score = np.asarray(sq.mean(axis=0), dtype=np.float64).ravel() - mean**2
    # stable sort on -score keeps the reference order among ties
    order = np.argsort(-score, kind="stable")[: min(n, len(names))]
    if len(names) < n:
        LOG.warning("panel: reference has only %d genes, fewer than n=%d; keeping all", len(names), n)
    params = {"n": int(n), "target_sum": float(target_sum), "n_spots": int(X.shape[0]), "normalized": normalized}
    if method == "hvg":
        params["score"] = "variance of log1p(normalised counts)"
    chosen = [names[i] for i in order]
    if extra:
        params["include"] = extra
    return Panel(tuple(dict.fromkeys([*chosen, *extra])), method, params)


def _check_measured(wanted: Sequence[str], names: Sequence[str]) -> None:
    """Raise BadInput naming the ``wanted`` genes absent from the reference's ``names``."""
    missing = sorted(set(wanted) - set(names))
    if missing:
        msg = f"gene list: {len(missing)} genes not in the reference: {missing[:20]}; remove them or use another reference"
        raise BadInput(msg)


def apply_panel(X: Any, genes: Sequence[str], panel: Panel | Sequence[str], missing: str = "error") -> np.ndarray:
    """Select the panel's genes from ``X``, in the panel's order.

    Parameters
    ----------
    X
        Spots x genes, dense or sparse (normalise before or after: selection is column-wise).
    genes
        Column names of ``X``.
    panel
        A :class:`Panel` or a list of gene names.
    missing
        ``"error"``: raise naming the panel genes absent from ``genes``; ``"zero"``: fill
        them with 0 and log a warning with their count.

    Returns
    -------
    Dense float32 array, spots x panel genes.
    """
    wanted = list(panel.genes) if isinstance(panel, Panel) else [str(g) for g in panel]
    X, names = _unpack(X, genes)
    if missing not in ("error", "zero"):
        msg = f"missing={missing!r}: unknown; use 'error' or 'zero'"
        raise BadInput(msg)
    pos = {g: i for i, g in enumerate(names)}
    absent = [g for g in wanted if g not in pos]
    if absent and missing == "error":
        msg = (
            f"expression data: {len(absent)} of {len(wanted)} panel genes are missing: {absent[:20]}"
            f"{' ...' if len(absent) > 20 else ''}; pass missing='zero' to fill them with 0, or choose the panel on genes both data sets share"
        )
        raise BadInput(msg)
    if absent:
        LOG.warning(
            "apply_panel: %d of %d panel genes missing, filled with 0: %s", len(absent), len(wanted), absent[:10]
        )
    present = [i for i, g in enumerate(wanted) if g in pos]
    cols = [pos[wanted[i]] for i in present]
    out = np.zeros((X.shape[0], len(wanted)), dtype=np.float32)
    sub = X[:, cols]
    out[:, present] = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return out
