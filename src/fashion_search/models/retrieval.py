"""The retrieval model: backbone + fusion, batched encoders, and the identity an index records."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from fashion_search.data.pixels import PixelPipeline
from fashion_search.models.backbone import ClipBackbone, autocast
from fashion_search.models.features import QueryFeatures
from fashion_search.models.fusion import Fusion
from fashion_search.models.openclip_import import open_clip


class RetrievalModel(nn.Module):
    """Encodes images and texts into one normalised space and composes queries from them."""

    # What runs the towers (runtime/exported.py has the exported ones); an index records both.
    runtime = "torch"
    precision = "fp32"

    def __init__(self, backbone: ClipBackbone, fusion: Fusion, checkpoint_sha256: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.fusion = fusion
        self.checkpoint_sha256 = checkpoint_sha256

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def identity(self) -> dict:
        """What an index records so that a query is never embedded by a different model."""
        return {
            "model": self.backbone.spec.model,
            "pretrained": self.backbone.spec.pretrained,
            "fusion": self.fusion.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "dim": self.dim,
            "preprocess": self.backbone.preprocess_cfg,
            "runtime": self.runtime,
            "precision": self.precision,
        }

    def image_transform(self):
        """PIL image -> normalised tensor, exactly as the model was configured (no augmentation)."""
        return open_clip.transform.image_transform_v2(
            open_clip.transform.PreprocessCfg(**self.backbone.preprocess_cfg), is_train=False
        )

    @functools.cached_property
    def pixel_pipeline(self) -> PixelPipeline:
        """image_transform() split into uint8 geometry (CPU) and normalisation (model's device)."""
        pipeline = PixelPipeline.from_transform(self.image_transform())
        if pipeline is None:
            raise ValueError("the model's image transform does not end in ToTensor + Normalize")
        return pipeline

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels on the model's device as the image tower takes them: the transform's float output as
        is, or its uint8 geometry (pixel_pipeline, what the loaders ship) normalised there."""
        pixels = pixels.to(self.device, non_blocking=True)
        return self.pixel_pipeline.normalise(pixels) if pixels.dtype == torch.uint8 else pixels

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images -> (n, dim) float32 on the CPU.

        `pixels` is either the transform's float output or its uint8 geometry (pixel_pipeline), which
        is normalised here on the model's device.
        """
        self.eval()
        with autocast(self.device):
            feats = self.backbone.image_features(self.model_input(pixels))
        return feats.float().cpu()

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        transform = self.image_transform()
        out = [
            self.encode_pixels(torch.stack([transform(im) for im in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> (n, dim) float32; over-long texts are truncated to the model's context."""
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.backbone.tokenize(list(texts[i : i + batch_size])).to(self.device)
            with autocast(self.device):
                out.append(self.backbone.text_features(tokens).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)

    # -- the query side: what the fusion consumes (pooled embeddings, plus tokens when it reads them) --
    def image_query_features(self, pixels: torch.Tensor) -> QueryFeatures:
        """Differentiable (training): model-input pixels -> the fusion's image input."""
        if self.fusion.uses_tokens:
            return self.backbone.image_query_features(pixels)
        return QueryFeatures(self.backbone.image_features(pixels))

    def text_query_features(self, tokens: torch.Tensor) -> QueryFeatures:
        """Differentiable (training): token ids -> the fusion's text input."""
        if self.fusion.uses_tokens:
            return self.backbone.text_query_features(tokens)
        return QueryFeatures(self.backbone.text_features(tokens))

    @torch.inference_mode()
    def encode_query_pixels(self, pixels: torch.Tensor) -> QueryFeatures:
        """Like encode_pixels, for a query image: what compose() needs of it, float32 on the CPU."""
        if not self.fusion.uses_tokens:
            return QueryFeatures(self.encode_pixels(pixels))
        self.eval()
        with autocast(self.device):
            feats = self.backbone.image_query_features(self.model_input(pixels))
        return feats.float().cpu()

    @torch.inference_mode()
    def encode_query_texts(self, texts: Sequence[str], batch_size: int = 64) -> QueryFeatures:
        """Like encode_texts, for query texts: what compose() needs of them, float32 on the CPU."""
        if not self.fusion.uses_tokens:
            return QueryFeatures(self.encode_texts(texts, batch_size))
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.backbone.tokenize(list(texts[i : i + batch_size])).to(self.device)
            with autocast(self.device):
                feats = self.backbone.text_query_features(tokens).float().cpu()
            # Padding is dropped past the longest text: a cached query holds its own tokens only.
            length = int(feats.token_mask().sum(1).max())
            out.append(QueryFeatures(feats.pooled, feats.tokens[:, :length], feats.mask[:, :length]))
        return QueryFeatures.cat(out)

    @torch.inference_mode()
    def compose(
        self,
        image_emb: torch.Tensor | QueryFeatures,
        text_emb: torch.Tensor | QueryFeatures,
        text_weight: float | None = None,
    ) -> torch.Tensor:
        """Fuse image and text embeddings (or query features) into query embeddings (w=0 image only,
        w=1 text only)."""
        self.eval()
        dev = self.device
        image, text = QueryFeatures.of(image_emb).to(dev), QueryFeatures.of(text_emb).to(dev)
        return self.fusion(image, text, text_weight).float().cpu()
