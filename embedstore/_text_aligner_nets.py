"""The text aligner's torch modules: identity-initialised residual adapters on both OmiCLIP towers.

Import this module lazily (inside the functions that train or load a text aligner): it imports torch.
The design is argued in :mod:`embedstore.text_aligner`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ResidualAdapter", "TextAlignerModel"]


class ResidualAdapter(nn.Module):
    """``u -> u + W u + b`` with ``W`` and ``b`` zero at start: the identity until trained.

    With ``rank > 0`` the update is low-rank, ``u + B (A u) + b``, with ``A`` initialised as
    ``nn.Linear`` does and ``B``, ``b`` zero (LoRA's scheme), so it too starts as the identity.
    """

    def __init__(self, dim: int, rank: int = 0) -> None:
        super().__init__()
        if rank:
            self.delta: nn.Module = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))
            last = self.delta[1]
        else:
            self.delta = nn.Linear(dim, dim)
            last = self.delta
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.delta(u)


class TextAlignerModel(nn.Module):
    """Image and text adapters and the temperature; inputs are L2-normalised inside.

    When ``image_dim == text_dim`` both towers get a :class:`ResidualAdapter`, so the untrained
    model scores a pair by the cosine of its two embeddings: zero-shot OmiCLIP. Otherwise
    there is no identity to start from, and each tower gets a plain ``nn.Linear`` to
    ``min(image_dim, text_dim)`` (``rank`` must then be 0).
    The arguments are the fields of the same name of ``embedstore.text_aligner.TextAlignerConfig``.
    """

    def __init__(self, image_dim: int, text_dim: int, rank: int, temperature: float, learn_temperature: bool) -> None:
        super().__init__()
        if image_dim == text_dim:
            self.image_adapter: nn.Module = ResidualAdapter(image_dim, rank)
            self.text_adapter: nn.Module = ResidualAdapter(text_dim, rank)
        else:
            common = min(image_dim, text_dim)
            self.image_adapter = nn.Linear(image_dim, common)
            self.text_adapter = nn.Linear(text_dim, common)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_adapter(F.normalize(x, dim=-1))

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_adapter(F.normalize(x, dim=-1))
