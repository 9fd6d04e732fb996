"""The aligner's torch modules: two projection heads, the contrastive loss, and the model holding both.

Import this module lazily (inside the functions that train or load an aligner): it imports torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AlignerModel", "ClipLoss", "ExpressionEncoder", "ProjectionHead"]


class ProjectionHead(nn.Module):
    """BLEEP's head: Linear, GELU, Linear, Dropout, residual, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(
        self, image_features: torch.Tensor, expr_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
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
    """Both heads, the temperature and the input standardisation (as buffers, so they are saved).

    The arguments are the fields of the same name of ``embedstore.aligner.AlignerConfig``.
    """

    def __init__(
        self,
        image_dim: int,
        n_genes: int,
        proj_dim: int,
        expr_hidden: int,
        dropout: float,
        temperature: float,
        learn_temperature: bool,
    ) -> None:
        super().__init__()
        self.image_head = ProjectionHead(image_dim, proj_dim, dropout)
        self.expr_encoder = ExpressionEncoder(n_genes, proj_dim, expr_hidden, dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature)
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.register_buffer("expr_mean", torch.zeros(n_genes))
        self.register_buffer("expr_std", torch.ones(n_genes))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head((x - self.image_mean) / self.image_std)

    def encode_expression(self, x: torch.Tensor) -> torch.Tensor:
        return self.expr_encoder((x - self.expr_mean) / self.expr_std)
