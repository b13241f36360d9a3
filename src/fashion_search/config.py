"""Training configuration: a frozen dataclass, loadable from YAML, overridable from the CLI, dumped with runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from fashion_search.errors import FashionSearchError


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Defaults are the recipe for ViT-B-32 with OpenAI weights."""

    data: str = ""
    out: str = ""
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    fusion: str = "combiner"
    categories: tuple[str, ...] = ("dress", "shirt", "toptee")
    epochs: int = 10
    batch_size: int = 64
    # Learning rates: the pretrained towers move slowly, the fusion (new) fast; blocks nearer the
    # input get lr * layer_decay^depth (layer-wise decay) so low-level features are kept.
    lr: float = 2e-5
    lr_fusion: float = 5e-4
    layer_decay: float = 0.8
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    clip_loss_weight: float = 0.5  # the standard CLIP image-text loss beside the composed loss
    hard_negatives: int = 4  # triplets per related group placed together in a batch
    # From the second epoch on, regroup triplets by k-means over the current model's target embeddings
    # (about this many targets per cluster; 0 = keep the reference-target components).
    mine_hard_negatives: int = 0
    patience: int = 3  # early stopping: epochs without a better mean(R@10, R@50)
    augment: bool = True
    seed: int = 0
    workers: int = 2
    device: str | None = None
    amp: bool = True
    eval_batch_size: int = 128
    max_steps_per_epoch: int | None = None
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["categories"] = list(self.categories)
        return d

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FashionSearchError(f"unknown training option(s): {', '.join(unknown)}")
        values = dict(values)
        if isinstance(values.get("categories"), str):
            values["categories"] = tuple(c.strip() for c in values["categories"].split(",") if c.strip())
        elif values.get("categories") is not None:
            values["categories"] = tuple(values["categories"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> TrainConfig:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise FashionSearchError(f"cannot read config {path}: {exc}") from None
        if not isinstance(values, dict):
            raise FashionSearchError(f"config {path} must be a mapping of option: value")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# A recipe for the compact model trained from scratch on the synthetic data on 2 CPU cores:
# random weights need a much higher learning rate and no layer decay.
DEMO_OVERRIDES = dict(
    model="fs-tiny",
    pretrained="none",
    lr=1e-3,
    lr_fusion=1e-3,
    layer_decay=1.0,
    clip_loss_weight=1.0,  # keeps image embeddings about attributes, so image-only search stays weak
    batch_size=64,
    epochs=10,
    patience=4,
    workers=1,
)
