"""Training configuration: a frozen dataclass, loadable from YAML, overridable from the CLI, dumped with runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from fashion_search.errors import FashionSearchError
from fashion_search.models import COMPACT_MODELS


def _holds(rule, value) -> bool:
    try:
        return bool(rule(value))  # NaN fails every comparison, so it is refused too
    except TypeError:  # a YAML value of the wrong type
        return False


_FLOAT_OPTIONS = (
    "lr",
    "lr_fusion",
    "layer_decay",
    "weight_decay",
    "warmup_ratio",
    "grad_clip",
    "clip_loss_weight",
    "temperature",
    "warmup_epochs",
    "color_jitter",
    "stop_at_loss",
)
RECIPES_DIR = Path(__file__).parent / "recipes"


def default_pretrained(model: str) -> str:
    """The weights a model gets when `--pretrained` is not given: OpenAI's for an OpenCLIP architecture
    (what users of CLIP expect, and never random weights by accident), none for the project's compact
    configs, which have no published weights, and none for hf-hub:/local-dir: names, whose weights come
    with the name."""
    if model in COMPACT_MODELS or model.startswith(("hf-hub:", "local-dir:")):
        return "none"
    return "openai"


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Defaults are the recipe for ViT-B-32 with OpenAI weights."""

    data: str = ""
    out: str = ""
    model: str = "ViT-B-32"
    pretrained: str = ""  # "": default_pretrained(model)
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
    warmup_epochs: float | None = None  # when set, the warmup in epochs (replaces warmup_ratio)
    grad_clip: float = 1.0
    temperature: float | None = None  # None: CLIP's learnable temperature; a number: fixed at it
    clip_loss_weight: float = 0.5  # the standard CLIP image-text loss beside the composed loss
    hard_negatives: int = 4  # triplets per related group placed together in a batch
    # From the second epoch on, regroup triplets by k-means over the current model's target embeddings
    # (about this many targets per cluster; 0 = keep the reference-target components).
    mine_hard_negatives: int = 0
    # Per triplet, this many other images of its target's related group as extra negatives of the
    # composed loss only (look-mates: the same look, other attributes); 0 = in-batch negatives alone.
    group_negatives: int = 0
    # From the second epoch on, draw those negatives from the target's this-many look-mates most like it
    # under the current model (re-mined every epoch); 0 = from its whole group.
    group_negative_pool: int = 0
    patience: int = 3  # early stopping: epochs without a better mean(R@10, R@50)
    augment: bool = True
    # Hue and saturation jitter (saturation ±s, hue ±s/4 of the colour wheel), the same for reference and
    # target. 0 by default: a hue shift makes a caption like "is red" false (docs/TRAINING.md).
    color_jitter: float = 0.0
    stop_at_loss: float | None = None  # stop once an epoch's mean training loss is at or below it
    seed: int = 0
    workers: int = 2
    device: str | None = None
    amp: bool = True
    eval_batch_size: int = 128
    max_steps_per_epoch: int | None = None
    # Memory for large backbones and batches (docs/TRAINING.md, "Bigger backbones"): recompute the
    # towers' activations in backward, and/or GradCache with chunks of this many triplets (0 = off).
    grad_checkpointing: bool = False
    grad_cache_chunk: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pretrained:
            object.__setattr__(self, "pretrained", default_pretrained(self.model))
        if self.max_steps_per_epoch == 0:  # 0 has always meant "no cap", as None does
            object.__setattr__(self, "max_steps_per_epoch", None)
        for name in _FLOAT_OPTIONS:  # PyYAML reads 1e-4 (no dot) as a string
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    object.__setattr__(self, name, float(value))
                except ValueError:
                    raise FashionSearchError(
                        f"bad training option: {name} must be a number, got {value!r}"
                    ) from None
        problems = [
            f"--{name.replace('_', '-')} {rule}, got {getattr(self, name)}"
            for name, rule, ok in (
                (
                    "batch_size",
                    "must be at least 2 (a triplet's negatives are the other targets in its batch)",
                    lambda v: v >= 2,
                ),
                ("epochs", "must be at least 1", lambda v: v >= 1),
                ("lr", "must be > 0", lambda v: v > 0),
                ("lr_fusion", "must be > 0", lambda v: v > 0),
                ("layer_decay", "must be in (0, 1]", lambda v: 0 < v <= 1),
                ("weight_decay", "must be >= 0", lambda v: v >= 0),
                ("warmup_ratio", "must be in [0, 1]", lambda v: 0 <= v <= 1),
                ("warmup_epochs", "must be >= 0", lambda v: v is None or v >= 0),
                ("grad_clip", "must be > 0", lambda v: v > 0),
                ("temperature", "must be > 0", lambda v: v is None or v > 0),
                ("color_jitter", "must be in [0, 1]", lambda v: 0 <= v <= 1),
                ("stop_at_loss", "must be > 0", lambda v: v is None or v > 0),
                ("clip_loss_weight", "must be >= 0", lambda v: v >= 0),
                ("hard_negatives", "must be >= 0", lambda v: v >= 0),
                ("mine_hard_negatives", "must be >= 0", lambda v: v >= 0),
                ("group_negatives", "must be >= 0", lambda v: v >= 0),
                ("group_negative_pool", "must be >= 0", lambda v: v >= 0),
                ("patience", "must be at least 1", lambda v: v >= 1),
                ("workers", "must be >= 0", lambda v: v >= 0),
                ("eval_batch_size", "must be at least 1", lambda v: v >= 1),
                ("max_steps_per_epoch", "must be at least 1", lambda v: v is None or v >= 1),
                ("grad_cache_chunk", "must be >= 0", lambda v: v >= 0),
            )
            if not _holds(ok, getattr(self, name))
        ]
        if problems:
            raise FashionSearchError("bad training option: " + "; ".join(problems))

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
    def load(cls, path: str | Path, base: dict | None = None, **overrides) -> TrainConfig:
        """A YAML file's options over `base` (a recipe's), flags (`overrides`, None = not given) over both."""
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            reason = " ".join(str(exc).split())  # PyYAML's message spans lines; the CLI's is one
            raise FashionSearchError(f"cannot read config {path}: {reason}") from None
        if not isinstance(values, dict):
            raise FashionSearchError(f"config {path} must be a mapping of option: value")
        values = {**(base or {}), **values}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def to_yaml(self) -> str:
        """What RUN/config.yaml holds (and `train --print-config` prints)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def dump(self, path: str | Path) -> None:
        from fashion_search.atomic import atomic_open

        with atomic_open(path, "w") as fh:  # a kill mid-write must not leave a config --resume cannot read
            fh.write(self.to_yaml())


def list_recipes() -> list[str]:
    """The recipes shipped in the package (`train --recipe NAME`)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict:
    """A shipped recipe's options; flags and --config override them."""
    path = RECIPES_DIR / f"{name}.yaml"
    if name not in list_recipes():
        raise FashionSearchError(f"unknown recipe {name!r} (known: {', '.join(list_recipes())})")
    values = yaml.safe_load(path.read_text()) or {}
    TrainConfig.from_dict(values)  # a broken recipe fails here, naming its option, not mid-run
    return values


# A recipe for the compact model trained from scratch on the synthetic data on 2 CPU cores:
# random weights need a much higher learning rate and no layer decay.
DEMO_OVERRIDES = dict(
    model="fs-rn-tiny",  # a ResNet tower: learns garment shapes from scratch far faster than a ViT
    pretrained="none",
    lr=1e-3,
    lr_fusion=1e-3,
    layer_decay=1.0,
    clip_loss_weight=1.0,  # keeps image embeddings about attributes, so image-only search stays weak
    batch_size=64,
    # Random batches: on the demo data they learn faster than chunks of 4 look-mates (docs/TRAINING.md,
    # "What limits the demo's score"); such chunks leave fewer looks per batch, and a relative caption
    # ("is green") is more often true of a look-mate, which the CLIP loss then counts as a negative.
    hard_negatives=1,
    # ... and beside each target 3 of its look-mates, as negatives of the composed loss only: the look
    # is easy, the attributes within a look are what the demo's queries get wrong (docs/TRAINING.md).
    group_negatives=3,
    epochs=7,  # over 720 train images per category: the demo's 12-minute budget on 2 cores (docs/TRAINING.md)
    # No early stopping: the best epochs come at the end of the cosine schedule, and a patience of 4 ended
    # runs on other data seeds with a model from well before it (docs/TRAINING.md).
    patience=7,
    workers=1,
)
