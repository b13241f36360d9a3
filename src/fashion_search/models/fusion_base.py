"""The fusion base class and registry; the fusions themselves are in fusion.py (and attention.py).

See fusion.py for the contract every fusion keeps.
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

    def weighted(self, image: torch.Tensor, text: torch.Tensor, w: float, fuse=None) -> torch.Tensor:
        """The query at weight w in (0, 1), from normalised embeddings. `fuse` replaces self.fuse (an
        exported fusion graph runs it; the slider's path stays this one function)."""
        fused = (fuse or self.fuse)(image, text)
        # The slider walks a path image -> trained fusion -> text; its midpoint is the trained point.
        if w <= DEFAULT_TEXT_WEIGHT:
            a = w / DEFAULT_TEXT_WEIGHT
            return F.normalize((1 - a) * image + a * fused, dim=-1)
        a = (w - DEFAULT_TEXT_WEIGHT) / (1 - DEFAULT_TEXT_WEIGHT)
        return F.normalize((1 - a) * fused + a * text, dim=-1)
