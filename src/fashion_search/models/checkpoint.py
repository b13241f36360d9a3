"""Building retrieval models from a name or a checkpoint, and saving checkpoints atomically."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from fashion_search.atomic import atomic_open
from fashion_search.config import default_pretrained
from fashion_search.errors import FashionSearchError
from fashion_search.models.backbone import create_backbone, normalise_preprocess_cfg, resolve_device
from fashion_search.models.fusion import create_fusion
from fashion_search.models.retrieval import RetrievalModel

FORMAT = "fashion-search-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


def create_model(
    model: str = "ViT-B-32",
    pretrained: str = "none",
    fusion: str = "sum",
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    fusion_config: dict | None = None,
    init_weights: bool = True,
) -> RetrievalModel:
    """A retrieval model from an OpenCLIP architecture name and weight source (see `create_backbone`;
    `init_weights=False`: the backbone's weights are left for the caller to load)."""
    dev = resolve_device(device)
    backbone = create_backbone(model, pretrained, device=dev, cache_dir=cache_dir, init_weights=init_weights)
    config = dict(fusion_config or {})
    config.pop("dim", None)
    return RetrievalModel(backbone, create_fusion(fusion, backbone.dim, **config)).to(dev)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Accept a run directory (RUN/checkpoint.pt inside) or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FashionSearchError(
            f"no checkpoint at {path} (expected a run directory or a {CHECKPOINT_NAME} file)"
        )
    return p


def resolve_model(
    checkpoint: str | os.PathLike | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    fusion: str = "sum",
    device: str | torch.device | None = None,
    recorded: dict | None = None,
) -> RetrievalModel:
    """The model a command or an engine asks for: a fine-tuned `checkpoint`, else the architecture
    `model` with `pretrained` weights (its default weights when left out: never random by accident), else
    the model an index `recorded` (its manifest's "source", see model_source)."""
    if checkpoint and model:
        raise FashionSearchError("give either --checkpoint or --model, not both")
    if not checkpoint and not model and recorded:
        checkpoint = recorded.get("checkpoint")
        if not checkpoint:
            model, pretrained = recorded["model"], recorded.get("pretrained", "none")
            fusion = recorded.get("fusion", fusion)
    if checkpoint:
        return load_checkpoint(checkpoint, device=device)
    if not model:
        raise FashionSearchError("give --checkpoint RUN or --model NAME (with --pretrained TAG|FILE|none)")
    return create_model(model, pretrained or default_pretrained(model), fusion=fusion, device=device)


def model_source(model: RetrievalModel, checkpoint: str | os.PathLike | None = None) -> dict:
    """Where a model comes from, recorded in an index so that a later process rebuilds exactly it."""
    spec = model.backbone.spec
    return {
        "checkpoint": str(resolve_checkpoint_path(checkpoint).resolve()) if checkpoint else None,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "fusion": model.fusion.name,
    }


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict (weights, configs, training state), validated."""
    p = resolve_checkpoint_path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same to a user
        reason = " ".join(str(exc).split()) or "the file is empty or cut short"
        raise FashionSearchError(f"cannot read checkpoint {p}: {type(exc).__name__}: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FashionSearchError(f"{p} is not a fashion-search checkpoint")
    return payload


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None) -> RetrievalModel:
    """Rebuild the trained model; no download happens: the weights come from the checkpoint itself."""
    p = resolve_checkpoint_path(path)
    payload = read_checkpoint(p)
    try:
        model = model_from_payload(payload, device)
    except RuntimeError as exc:
        # The architecture is rebuilt from its name: a checkpoint from an older version of a packaged
        # config (fs-tiny's text context grew from 24 to 40 tokens) no longer fits it.
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise FashionSearchError(
            f"checkpoint {p} does not fit the current {payload['backbone']['model']} architecture "
            f"({first.strip()}); it was trained with another version of that model config: retrain it"
        ) from None
    model.checkpoint_sha256 = file_sha256(p)  # the identity an index records
    return model


def model_from_payload(payload: dict, device: str | torch.device | None = None) -> RetrievalModel:
    """The model a model_payload() describes, its weights loaded strictly (RuntimeError when they do not
    fit the architecture); nothing is downloaded."""
    model = create_model(
        payload["backbone"]["model"],
        "none",
        fusion=payload["fusion"]["name"],
        device=device,
        fusion_config=payload["fusion"]["config"],
        init_weights=False,  # every weight comes from the payload (a strict load)
    )
    model.backbone.spec = type(model.backbone.spec)(**payload["backbone"])
    model.backbone.preprocess_cfg = normalise_preprocess_cfg(payload["preprocess"])
    model.load_state_dict(payload["state_dict"])
    model.checkpoint_sha256 = payload.get("checkpoint_sha256")
    return model


def model_payload(model: RetrievalModel, **extra) -> dict:
    """Everything needed to rebuild `model`, plus any extra (training state, config, metrics)."""
    return {
        "format": FORMAT,
        "backbone": model.backbone.spec.to_dict(),
        "preprocess": model.backbone.preprocess_cfg,
        "fusion": {"name": model.fusion.name, "config": model.fusion.config()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def atomic_torch_save(payload: dict, path: str | os.PathLike) -> None:
    """torch.save without ever leaving half a checkpoint under the final name."""
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
