"""What a fusion consumes of a query image or text: its pooled embedding, plus token features when asked.

The catalog index only ever holds pooled embeddings; token features exist on the query side alone, for
a fusion that reads them (`attention`), and are what the engine caches per query image and text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class QueryFeatures:
    """pooled (n, dim); tokens (n, T, dim) in the joint space, or None; mask (n, T), True on real tokens
    (text padding is False), or None when every token is real."""

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def of(cls, value: QueryFeatures | torch.Tensor) -> QueryFeatures:
        """A plain embedding tensor is features without tokens (what `sum` and `combiner` read)."""
        return value if isinstance(value, QueryFeatures) else cls(value)

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def _map(self, fn) -> QueryFeatures:
        def opt(t):
            return None if t is None else fn(t)

        return QueryFeatures(fn(self.pooled), opt(self.tokens), opt(self.mask))

    def to(self, device: torch.device | str) -> QueryFeatures:
        return self._map(lambda t: t.to(device))

    def float(self) -> QueryFeatures:
        return QueryFeatures(
            self.pooled.float(), None if self.tokens is None else self.tokens.float(), self.mask
        )

    def cpu(self) -> QueryFeatures:
        return self._map(lambda t: t.cpu())

    def __getitem__(self, rows) -> QueryFeatures:
        return self._map(lambda t: t[rows])

    def chunk(self, parts: int) -> list[QueryFeatures]:
        size = -(-len(self) // parts)
        return [self[i : i + size] for i in range(0, len(self), size)]

    def split(self, sizes: Sequence[int]) -> list[QueryFeatures]:
        """Consecutive row blocks of the given sizes (like torch.split)."""
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self[a : a + n] for a, n in zip(starts, sizes, strict=True)]

    def normalised(self) -> QueryFeatures:
        return QueryFeatures(F.normalize(self.pooled, dim=-1), self.tokens, self.mask)

    def token_mask(self) -> torch.Tensor:
        """(n, T) bool, True on real tokens; every token is real when no mask was given."""
        assert self.tokens is not None
        if self.mask is not None:
            return self.mask
        return torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)

    @staticmethod
    def cat(parts: Sequence[QueryFeatures]) -> QueryFeatures:
        """Row-wise concatenation; token sequences of different lengths are padded (masked out)."""
        pooled = torch.cat([p.pooled for p in parts])
        if any(p.tokens is None for p in parts):
            return QueryFeatures(pooled)
        length = max(p.tokens.shape[1] for p in parts)
        tokens = torch.cat([F.pad(p.tokens, (0, 0, 0, length - p.tokens.shape[1])) for p in parts])
        mask = torch.cat([F.pad(p.token_mask(), (0, length - p.tokens.shape[1])) for p in parts])
        return QueryFeatures(pooled, tokens, mask)
