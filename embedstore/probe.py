"""The HEST-Benchmark linear probe: standard scaling, PCA to 256 components, ridge.

Matches HEST's settings (``alpha = 100 / (n_features * n_genes)``, ``solver="lsqr"``,
no intercept) with one deliberate change: targets are centred on the training mean and
the mean is added back. PCA output is centred on the training set, so this equals ridge
with an intercept; Pearson correlations are those HEST reports, and MSE/MAE become
meaningful instead of measuring a missing offset.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["RidgeProbe", "fit_ridge_probe"]


@dataclasses.dataclass
class RidgeProbe:
    """A fitted probe: scaler, PCA and ridge weights as plain arrays."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  # (n_components, n_features)
    pca_mean: np.ndarray
    coef: np.ndarray  # (n_components, n_genes)
    target_mean: np.ndarray

    def predict(self, emb: np.ndarray) -> np.ndarray:
        """Predicted expression ``(n, n_genes)`` for embeddings ``(n, n_features)``."""
        z = (np.asarray(emb, dtype=np.float64) - self.mean) / self.scale
        z = (z - self.pca_mean) @ self.components.T
        return (z @ self.coef + self.target_mean).astype(np.float32)


def fit_ridge_probe(emb: np.ndarray, expr: np.ndarray, n_components: int = 256, seed: int = 0) -> RidgeProbe:
    """Fit the HEST ridge probe on reference embeddings and log-normalised expression.

    Parameters
    ----------
    emb
        ``(n, n_features)`` image embeddings of the reference spots.
    expr
        ``(n, n_genes)`` log-normalised expression of the same spots.
    n_components
        PCA dimension (256 in HEST); capped at ``min(n, n_features)``.
    seed
        Random state for PCA's solver and ridge.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(emb, dtype=np.float64)
    y = np.asarray(expr, dtype=np.float64)
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    pca = PCA(n_components=min(n_components, *xs.shape), random_state=seed).fit(xs)
    z = pca.transform(xs)
    target_mean = y.mean(axis=0)
    alpha = 100.0 / (z.shape[1] * y.shape[1])  # HEST's choice
    ridge = Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=seed)
    ridge.fit(z, y - target_mean)
    return RidgeProbe(
        mean=scaler.mean_,
        scale=np.where(scaler.scale_ == 0, 1.0, scaler.scale_),
        components=pca.components_,
        pca_mean=pca.mean_,
        coef=np.asarray(ridge.coef_).reshape(y.shape[1], -1).T,
        target_mean=target_mean,
    )
