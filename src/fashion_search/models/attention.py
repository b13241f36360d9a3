"""The `attention` fusion: a small transformer over both towers' token features, a residual on `sum`.

The modification text has to say *where* it applies ("has longer sleeves"), which two pooled vectors
cannot: here the query token, the image's patch tokens and the text's word tokens attend to one another
(joint self-attention, so text attends to patches and patches to words). The query token's output
becomes a correction added to the sum's query through a zero-initialised layer, so an untrained
attention fusion ranks exactly as `sum` does and training can only move it from there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fashion_search.errors import FashionSearchError
from fashion_search.models.features import QueryFeatures
from fashion_search.models.fusion_base import Fusion, register_fusion


def _default_heads(dim: int) -> int:
    """About 64 channels per head (CLIP's own choice), and a head count that divides dim."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


@register_fusion("attention")
class AttentionFusion(Fusion):
    """Joint self-attention over [query; image pooled + patch tokens; text pooled + word tokens].

    The query token starts as normalise(image + text); its output, through a zero-initialised layer, is
    the correction added to the sum. The text weight walks the sum's own path (image -> sum -> text),
    with the correction scaled by 1 - |2w - 1|: absent at w = 0 and 1, whole at the trained w = 0.5.
    """

    uses_tokens = True

    def __init__(
        self,
        dim: int,
        layers: int = 2,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
    ):
        super().__init__(dim)
        self.layers, self.heads = layers, heads or _default_heads(dim)
        self.mlp_ratio, self.dropout_p = mlp_ratio, dropout
        if dim % self.heads:
            raise FashionSearchError(f"attention fusion: {self.heads} heads do not divide dim {dim}")
        # Projected tokens have no common scale with the unit-norm pooled vectors: one norm per source.
        self.query_norm, self.image_norm, self.text_norm = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
        )
        self.type_embedding = nn.Parameter(torch.randn(3, dim) * 0.02)  # query, image, text
        block = nn.TransformerEncoderLayer(
            dim,
            self.heads,
            int(dim * mlp_ratio),
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)  # the starting point is `sum`, exactly
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return {
            "dim": self.dim,
            "layers": self.layers,
            "heads": self.heads,
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout_p,
        }

    def correction(self, image: QueryFeatures, text: QueryFeatures) -> torch.Tensor:
        """(n, dim): what attention over the tokens adds to the sum's query at the trained weight."""
        if image.tokens is None or text.tokens is None:
            raise FashionSearchError(
                "the attention fusion reads token features: compose QueryFeatures from "
                "RetrievalModel.encode_query_pixels / encode_query_texts, not pooled embeddings"
            )
        i, t = image.pooled, text.pooled
        query = self.query_norm(F.normalize(i + t, dim=-1))[:, None] + self.type_embedding[0]
        img = self.image_norm(torch.cat([i[:, None], image.tokens.to(i.dtype)], 1)) + self.type_embedding[1]
        txt = self.text_norm(torch.cat([t[:, None], text.tokens.to(t.dtype)], 1)) + self.type_embedding[2]
        real = torch.ones(len(i), 1, dtype=torch.bool, device=i.device)
        keep = torch.cat([real, real, image.token_mask(), real, text.token_mask()], 1)
        hidden = self.encoder(torch.cat([query, img, txt], 1), src_key_padding_mask=~keep)
        return self.out(self.out_norm(hidden[:, 0]))

    def weighted_tokens(self, image: QueryFeatures, text: QueryFeatures, w: float) -> torch.Tensor:
        along_sum = (1 - w) * image.pooled + w * text.pooled
        reach = 1.0 - abs(2.0 * w - 1.0)
        return F.normalize(F.normalize(along_sum, dim=-1) + reach * self.correction(image, text), dim=-1)
