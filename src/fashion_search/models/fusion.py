"""Fusion of an image and a text embedding into one query: a registry of `sum`, `combiner`, `attention`.

Every fusion has one signature, `(image_emb, text_emb, text_weight) -> query_emb` (L2-normalised), and
honours the text weight the same way: w=0 returns the image embedding (pure image search), w=1 the text
embedding (pure text search), and the default w=0.5 is exactly what the fusion was trained for.
The embeddings are tensors or `QueryFeatures`; a fusion with `uses_tokens` (attention) needs the
latter, with token features from the towers (`RetrievalModel.encode_query_pixels` / `_texts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The registry and the base class live in fusion_base (attention.py subclasses it too); importing
# the attention module here registers it, so every fusion is known wherever this module is.
from fashion_search.models.attention import AttentionFusion
from fashion_search.models.fusion_base import (
    DEFAULT_TEXT_WEIGHT,
    Fusion,
    check_text_weight,
    create_fusion,
    list_fusions,
    register_fusion,
)

__all__ = [
    "DEFAULT_TEXT_WEIGHT",
    "AttentionFusion",
    "Combiner",
    "Fusion",
    "SumFusion",
    "check_text_weight",
    "create_fusion",
    "list_fusions",
    "register_fusion",
]


@register_fusion("sum")
class SumFusion(Fusion):
    """The parameter-free baseline: normalise(image + text); the weight interpolates linearly."""

    def fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(image + text, dim=-1)

    def weighted(self, image: torch.Tensor, text: torch.Tensor, w: float, fuse=None) -> torch.Tensor:
        # Parameter-free: no graph to run, so an exported runtime's `fuse` is not needed here.
        return F.normalize((1 - w) * image + w * text, dim=-1)


@register_fusion("combiner")
class Combiner(Fusion):
    """A learned gated fusion in the spirit of CLIP4Cir's Combiner (Baldrati et al., 2022).

    Both embeddings are projected and mixed by an MLP; a learned gate blends the raw text and image
    embeddings; the MLP's output is added as a residual. The residual layer starts at zero, so an
    untrained combiner behaves like a gated sum instead of a random projection.
    """

    def __init__(
        self, dim: int, proj_dim: int | None = None, hidden_dim: int | None = None, dropout: float = 0.1
    ):
        super().__init__(dim)
        self.proj_dim = proj_dim or 2 * dim
        self.hidden_dim = hidden_dim or 4 * dim
        self.dropout_p = dropout
        self.text_proj = nn.Linear(dim, self.proj_dim)
        self.image_proj = nn.Linear(dim, self.proj_dim)
        self.mix = nn.Linear(2 * self.proj_dim, self.hidden_dim)
        self.out = nn.Linear(self.hidden_dim, dim)
        self.gate = nn.Sequential(
            nn.Linear(2 * self.proj_dim, self.hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(self.hidden_dim, 1),
        )
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return {
            "dim": self.dim,
            "proj_dim": self.proj_dim,
            "hidden_dim": self.hidden_dim,
            "dropout": self.dropout_p,
        }

    def fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = self.drop(F.relu(self.text_proj(text)))
        i = self.drop(F.relu(self.image_proj(image)))
        joint = torch.cat([t, i], dim=-1)
        residual = self.out(self.drop(F.relu(self.mix(joint))))
        g = torch.sigmoid(self.gate(joint))
        return F.normalize(residual + g * text + (1 - g) * image, dim=-1)
