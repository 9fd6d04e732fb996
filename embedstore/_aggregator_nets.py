"""The learned aggregator's torch module (EGN-style exemplar attention).

Import this module lazily (inside the functions that train or load the aggregator): it imports torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ExemplarAttention"]


class ExemplarAttention(nn.Module):
    """Attention of the query over its k exemplars (EGN's exemplar learning, simplified).

    score_j = <Wq q, Wk key_j + We expr_j> / sqrt(h) + a * sim_j ; the prediction is the
    softmax(score)-weighted mean of the exemplars' expression, plus an optional
    correction MLP (initialised to 0, so training starts from similarity weighting).
    The arguments are the fields of the same name of
    ``embedstore.aggregate.LearnedAggregatorConfig``.
    """

    def __init__(self, key_dim: int, n_genes: int, hidden: int, residual: bool, dropout: float) -> None:
        super().__init__()
        self.q = nn.Linear(key_dim, hidden)
        self.k = nn.Linear(key_dim, hidden)
        self.e = nn.Linear(n_genes, hidden)
        self.sim_scale = nn.Parameter(torch.tensor(10.0))
        self.drop = nn.Dropout(dropout)
        self.register_buffer("expr_mean", torch.zeros(n_genes))
        self.register_buffer("expr_std", torch.ones(n_genes))
        self.residual = residual
        if residual:
            self.res = nn.Sequential(nn.Linear(key_dim + n_genes, hidden), nn.GELU(), nn.Linear(hidden, n_genes))
            nn.init.zeros_(self.res[2].weight)
            nn.init.zeros_(self.res[2].bias)
        self.scale = 1 / math.sqrt(hidden)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, expr: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        z = (expr - self.expr_mean) / self.expr_std
        kk = self.drop(self.k(keys) + self.e(z))  # (B, k, h)
        logits = torch.einsum("bh,bkh->bk", self.q(q), kk) * self.scale + self.sim_scale * sims
        w = torch.softmax(logits, dim=-1)
        pred = torch.einsum("bk,bkg->bg", w, expr)
        if self.residual:
            pred = pred + self.res(torch.cat([q, (pred - self.expr_mean) / self.expr_std], dim=-1))
        return pred
