"""The only training loop: composed + CLIP loss, per-epoch validation, best checkpoint, --resume.

RUN/checkpoint.pt  the best model by mean(R@10, R@50) on val (what eval/index/serve load)
RUN/last.pt        the full training state after the last finished epoch (what --resume loads)
RUN/history.json   loss, lr and val recalls per epoch;  RUN/config.yaml  the resolved config
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fashion_search.atomic import atomic_write_json, check_output_dir
from fashion_search.config import TrainConfig
from fashion_search.data.fashioniq import FashionIQ
from fashion_search.errors import FashionSearchError
from fashion_search.evaluation.fashioniq import NothingToScore, evaluate
from fashion_search.models.backbone import resolve_device
from fashion_search.models.checkpoint import atomic_torch_save, create_model, model_payload, read_checkpoint
from fashion_search.models.retrieval import RetrievalModel
from fashion_search.training.data import (
    GroupedBatchSampler,
    PairAugment,
    TripletDataset,
    collate_triplets,
    similarity_groups,
)
from fashion_search.training.losses import clip_loss, composed_loss
from fashion_search.training.optim import build_optimizer, cosine_with_warmup

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_score: float
    best_epoch: int
    epochs_run: int
    history: list[dict]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mixed_precision(cfg: TrainConfig, device: torch.device):
    # bf16 only: unlike inference (models.backbone.autocast), training has no GradScaler, so fp16 could underflow.
    if cfg.amp and device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: RetrievalModel, batch: dict, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """One forward: fuse(reference, text) must find its target; the text must also match its target."""
    backbone = model.backbone
    amp = _mixed_precision(cfg, device)
    # Each half goes to the device on its own: concatenating the loader's pinned tensors on the host
    # would make an unpinned copy, and its transfer synchronous.
    pixels = torch.cat([model.model_input(batch["reference"]), model.model_input(batch["target"])])
    tokens = batch.get("tokens")
    if tokens is None:
        tokens = backbone.tokenize(batch["text"])
    with amp:
        # Pooled embeddings, plus token features when the fusion reads them (attention).
        ref, tgt = model.image_query_features(pixels).chunk(2)
        txt = model.text_query_features(tokens.to(device, non_blocking=True))
        query = model.fusion(ref, txt)
    tgt, txt = tgt.pooled, txt.pooled
    # The losses in float32, outside autocast: under it the logits' matmul would run in bf16, whose
    # steps near a logit scale of 100 are 0.5 -- as large as the differences being learned.
    if cfg.temperature is None:
        scale = backbone.logit_scale.exp().clamp(max=100.0)
    else:  # fixed: logit_scale gets no gradient, so the optimiser leaves it as it is
        scale = torch.tensor(1.0 / cfg.temperature, device=tgt.device)
    loss = composed_loss(query.float(), tgt.float(), scale, batch["target_id"])
    if cfg.clip_loss_weight > 0:
        loss = loss + cfg.clip_loss_weight * clip_loss(tgt.float(), txt.float(), scale, batch["target_id"])
    return loss


def optimize_step(
    model: RetrievalModel, batch: dict, cfg: TrainConfig, device: torch.device, optimizer, scheduler
) -> float:
    """One optimisation step (forward, backward, clipping, update, schedule); returns the loss."""
    loss = train_step(model, batch, cfg, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def _validate(model: RetrievalModel, cfg: TrainConfig, categories: list[str]) -> dict | None:
    """The val evaluation, or None when there is nothing to score (no val captions, or none of their
    images present): the run then keeps its last epoch rather than stopping."""
    if not categories:
        return None
    try:
        return evaluate(
            model, cfg.data, "val", categories, batch_size=cfg.eval_batch_size, workers=0, progress=False
        )
    except NothingToScore as exc:
        log.warning("no validation: %s; the last epoch is kept", exc)
        return None


def _check_same_architecture(state: dict, cfg: TrainConfig, run: Path) -> None:
    """A resumed run must build the model its weights came from."""
    was = {"model": state["backbone"].get("model"), "fusion": state["fusion"].get("name")}
    now = {"model": cfg.model, "fusion": cfg.fusion}
    if was != now:
        raise FashionSearchError(
            f"--resume: {run} was trained with --model {was['model']} --fusion {was['fusion']}, not "
            f"--model {now['model']} --fusion {now['fusion']}; resume without changing them, or start a new --out"
        )


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    run = Path(cfg.out)
    check_output_dir(run)
    if run.exists() and (run / "last.pt").exists() and not resume:
        raise FashionSearchError(
            f"{run} already holds a training run: pass --resume to continue it, or a new --out"
        )
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob(".*.tmp"):  # a checkpoint write cut short by a kill; the real file is intact
        stale.unlink(missing_ok=True)
    return run


def build_train_loader(
    model: RetrievalModel, data: FashionIQ, cfg: TrainConfig, device: torch.device
) -> tuple[TripletDataset, GroupedBatchSampler, DataLoader]:
    """The training data pipeline (benchmarks/bench_train.py measures this same loader): decode + paired
    augmentation + uint8 geometry + tokenising in the workers, hard-negative batches; train_step
    normalises the pixels on the device."""
    dataset = TripletDataset(
        data,
        "train",
        cfg.categories,
        model.pixel_pipeline.to_uint8,
        PairAugment(color=cfg.color_jitter) if cfg.augment else None,
        cfg.seed,
        draft_size=model.backbone.image_size,
    )
    sampler = GroupedBatchSampler(
        dataset.groups, cfg.batch_size, cfg.hard_negatives, cfg.seed, drop_last=True
    )
    if len(sampler) == 0:
        raise FashionSearchError(
            f"only {len(dataset)} training triplets: fewer than one batch of {cfg.batch_size}"
        )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=functools.partial(collate_triplets, tokenize=model.backbone.tokenizer),
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    return dataset, sampler, loader


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune on the train split, validate each epoch, keep the best checkpoint."""
    if not cfg.out:
        raise FashionSearchError("--out RUN is required")
    if resume and not (Path(cfg.out) / "last.pt").exists():
        if not (Path(cfg.out) / "config.yaml").exists():
            raise FashionSearchError(
                f"--resume: {cfg.out} holds no run to continue; leave out --resume to start one"
            )
        # Stopped before its first epoch ended (a preempted job that always passes --resume): begin again.
        log.warning("--resume: %s saved no epoch yet; starting it from the first", cfg.out)
        resume = False
    run = _prepare_run_dir(cfg, resume)
    data = FashionIQ(cfg.data)
    device = resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    model = create_model(cfg.model, cfg.pretrained, fusion=cfg.fusion, device=device)
    dataset, sampler, loader = build_train_loader(model, data, cfg, device)
    steps_per_epoch = min(len(sampler), cfg.max_steps_per_epoch or len(sampler))
    optimizer = build_optimizer(model, cfg)
    scheduler = cosine_with_warmup(optimizer, cfg.epochs * steps_per_epoch, warmup_fraction(cfg))
    history: list[dict] = []
    start_epoch, best_score, best_epoch, stale = 0, -1.0, -1, 0
    if resume and (run / "last.pt").exists():
        state = read_checkpoint(run / "last.pt")
        _check_same_architecture(state, cfg, run)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        best_score, best_epoch, stale = state["best_score"], state["best_epoch"], state["stale"]
    cfg.dump(run / "config.yaml")
    categories = [c for c in cfg.categories if c in data.categories("val")]

    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience or _loss_reached(cfg, history):
            break
        started = time.perf_counter()
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        if cfg.mine_hard_negatives and epoch > 0:
            sampler.groups = similarity_groups(
                model, data, dataset.triplets, cfg.mine_hard_negatives, cfg.seed + epoch
            )
        model.train()
        losses, skipped = [], []
        bar = tqdm(
            loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress
        )
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            skipped.extend(batch["skipped"])
            if batch["size"] < 2:  # a contrastive batch needs negatives
                continue
            losses.append(optimize_step(model, batch, cfg, device, optimizer, scheduler))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        bar.close()
        if not losses:  # no checkpoint of a model that never trained
            raise FashionSearchError(
                f"epoch {epoch + 1} trained no step: no batch held 2 usable triplets "
                f"({len(skipped)} skipped for unreadable images, e.g. {skipped[:1]})"
            )
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)) if losses else None,
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - started, 2),
            "skipped": {"triplets": len(skipped), "examples": skipped[:5]},
        }
        result = _validate(model, cfg, categories)
        if result is not None:
            record["val"] = {mode: rows["average"] for mode, rows in result["modes"].items()}
            record["score"] = result["selection_score"]
        else:  # nothing to validate on: keep the last epoch
            categories = []
            record["score"] = float(epoch)
        history.append(record)
        if record["score"] > best_score:
            best_score, best_epoch, stale = record["score"], epoch + 1, 0
            atomic_torch_save(
                model_payload(model, config=cfg.to_dict(), epoch=epoch + 1, metrics=record),
                run / "checkpoint.pt",
            )
        else:
            stale += 1
        atomic_torch_save(
            model_payload(
                model,
                config=cfg.to_dict(),
                epoch=epoch,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                torch_rng=torch.get_rng_state(),
                history=history,
                best_score=best_score,
                best_epoch=best_epoch,
                stale=stale,
            ),
            run / "last.pt",
        )
        atomic_write_json(run / "history.json", _history_doc(cfg, best_epoch, history, finished=False))
        if progress:
            val = record.get("val", {}).get("composed", {})
            print(
                f"epoch {epoch + 1}: loss {record['loss']:.4f}  val composed R@10 {val.get('R@10', 0):.2f} "
                f"R@50 {val.get('R@50', 0):.2f}  ({record['seconds']:.0f}s)",
                flush=True,
            )
    atomic_write_json(run / "history.json", _history_doc(cfg, best_epoch, history, finished=True))
    return TrainResult(run, best_score, best_epoch, len(history), history)


def warmup_fraction(cfg: TrainConfig) -> float:
    """The share of all steps spent warming up: warmup_epochs of the epochs when given, else warmup_ratio."""
    return cfg.warmup_ratio if cfg.warmup_epochs is None else min(1.0, cfg.warmup_epochs / cfg.epochs)


def _loss_reached(cfg: TrainConfig, history: list[dict]) -> bool:
    """The stop_at_loss rule, read from the history so that a resumed run obeys it too."""
    last = history[-1].get("loss") if history else None
    return cfg.stop_at_loss is not None and last is not None and last <= cfg.stop_at_loss


def _history_doc(cfg: TrainConfig, best_epoch: int, history: list[dict], finished: bool) -> dict:
    return {"config": cfg.to_dict(), "best_epoch": best_epoch, "finished": finished, "epochs": history}
