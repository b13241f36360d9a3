"""Fusion of an image and a text embedding into one query: a registry of `sum`, `combiner`, `attention`.

Every fusion has one signature, `(image_emb, text_emb, text_weight) -> query_emb` (L2-normalised), and
honours the text weight the same way: w=0 returns the image embedding (pure image search), w=1 the text
embedding (pure text search), and the default w=0.5 is exactly what the fusion was trained for.
The embeddings are tensors or `QueryFeatures`; a fusion with `uses_tokens` (attention) needs the
latter, with token features from the towers (`RetrievalModel.encode_query_pixels` / `_texts`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fashion_search.errors import FashionSearchError
from fashion_search.models.features import QueryFeatures

DEFAULT_TEXT_WEIGHT = 0.5
_FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(name: str) -> Callable[[type[Fusion]], type[Fusion]]:
    def decorate(cls: type[Fusion]) -> type[Fusion]:
        cls.name = name
        _FUSIONS[name] = cls
        return cls

    return decorate


def list_fusions() -> list[str]:
    return sorted(_FUSIONS)


def create_fusion(name: str, dim: int, **kwargs) -> Fusion:
    if name not in _FUSIONS:
        raise FashionSearchError(f"unknown fusion {name!r} (known: {', '.join(list_fusions())})")
    return _FUSIONS[name](dim, **kwargs)


def check_text_weight(text_weight: float | None) -> float:
    w = DEFAULT_TEXT_WEIGHT if text_weight is None else float(text_weight)
    if not 0.0 <= w <= 1.0:
        raise FashionSearchError(f"text weight must be in [0, 1], got {text_weight}")
    return w


class Fusion(nn.Module):
    """Base class: subclasses implement `fuse` (the trained combination at the default weight)."""

    name = "base"
    uses_tokens = False  # True: reads the towers' token features, not only the pooled embeddings

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def config(self) -> dict:
        """Constructor arguments, stored in checkpoints so the fusion can be rebuilt."""
        return {"dim": self.dim}

    def fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        image: torch.Tensor | QueryFeatures,
        text: torch.Tensor | QueryFeatures,
        text_weight: float | None = None,
    ) -> torch.Tensor:
        w = check_text_weight(text_weight)
        image_f, text_f = QueryFeatures.of(image).normalised(), QueryFeatures.of(text).normalised()
        if w in (0.0, 1.0):  # exact, not merely rank-equivalent
            return image_f.pooled if w == 0.0 else text_f.pooled
        if self.uses_tokens:
            return self.weighted_tokens(image_f, text_f, w)
        return self.weighted(image_f.pooled, text_f.pooled, w)

    def weighted_tokens(self, image: QueryFeatures, text: QueryFeatures, w: float) -> torch.Tensor:
        """The query at weight w in (0, 1) for a fusion that reads token features."""
        raise NotImplementedError

    def weighted(self, image: torch.Tensor, text: torch.Tensor, w: float) -> torch.Tensor:
        """The query at weight w in (0, 1), from normalised embeddings."""
        fused = self.fuse(image, text)
        # The slider walks a path image -> trained fusion -> text; its midpoint is the trained point.
        if w <= DEFAULT_TEXT_WEIGHT:
            a = w / DEFAULT_TEXT_WEIGHT
            return F.normalize((1 - a) * image + a * fused, dim=-1)
        a = (w - DEFAULT_TEXT_WEIGHT) / (1 - DEFAULT_TEXT_WEIGHT)
        return F.normalize((1 - a) * fused + a * text, dim=-1)


@register_fusion("sum")
class SumFusion(Fusion):
    """The parameter-free baseline: normalise(image + text); the weight interpolates linearly."""

    def fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(image + text, dim=-1)

    def weighted(self, image: torch.Tensor, text: torch.Tensor, w: float) -> torch.Tensor:
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


# Registered last: the attention fusion subclasses Fusion, so its module imports this one.
from fashion_search.models import attention as _attention  # noqa: E402, F401
