"""The only training loop: composed + CLIP loss, per-epoch validation, best checkpoint, --resume.

RUN/checkpoint.pt  the best model by mean(R@10, R@50) on val (what eval/index/serve load)
RUN/last.pt        the full training state after the last finished epoch (what --resume loads)
RUN/history.json   loss, lr and val recalls per epoch;  RUN/config.yaml  the resolved config
"""

from __future__ import annotations

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

from fashion_search.allocator import keep_freed_memory
from fashion_search.atomic import atomic_write_json, check_output_dir
from fashion_search.config import TrainConfig
from fashion_search.data.fashioniq import FashionIQ
from fashion_search.errors import FashionSearchError
from fashion_search.evaluation.fashioniq import NothingToScore, evaluate
from fashion_search.models.backbone import resolve_device
from fashion_search.models.checkpoint import atomic_torch_save, create_model, model_payload, read_checkpoint
from fashion_search.models.retrieval import RetrievalModel
from fashion_search.training import distributed as dist
from fashion_search.training.augment import PairAugment, working_size
from fashion_search.training.data import (
    GroupedBatchSampler,
    TripletDataset,
    collate_triplets,
    similar_look_mates,
    similarity_groups,
)
from fashion_search.training.optim import build_optimizer, cosine_with_warmup
from fashion_search.training.step import optimize_step, train_step

__all__ = ["TrainResult", "build_train_loader", "optimize_step", "train", "train_step"]

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
    """The training data pipeline (benchmarks/bench_train.py measures this same loader): decode + uint8
    geometry (at the augmentation's working size) + the paired augmentation's parameters + tokenising in
    the workers, hard-negative batches; train_step augments, resizes and normalises on the device."""
    size, pipeline = model.backbone.image_size, model.pixel_pipeline
    if cfg.augment and pipeline.resize_and_crop() is not None:
        # Shipped larger than the model's input, so that the step's affine does not blur it.
        size = working_size(size)
        pipeline = pipeline.at_size(size)
    dataset = TripletDataset(
        data,
        "train",
        cfg.categories,
        pipeline.to_uint8,
        PairAugment(color=cfg.color_jitter) if cfg.augment else None,
        cfg.seed,
        draft_size=size,
        group_negatives=cfg.group_negatives,
    )
    dataset.preload()
    sampler = GroupedBatchSampler(
        dataset.groups,
        cfg.batch_size,
        cfg.hard_negatives,
        cfg.seed,
        drop_last=True,
        num_replicas=dist.world_size(),
        rank=dist.rank(),
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


def _start_run(cfg: TrainConfig, resume: bool) -> bool:
    """Check and prepare RUN (rank 0 only); returns whether there is a last.pt to resume from."""
    if resume and not (Path(cfg.out) / "last.pt").exists():
        if not (Path(cfg.out) / "config.yaml").exists():
            raise FashionSearchError(
                f"--resume: {cfg.out} holds no run to continue; leave out --resume to start one"
            )
        # Stopped before its first epoch ended (a preempted job that always passes --resume): begin again.
        log.warning("--resume: %s saved no epoch yet; starting it from the first", cfg.out)
        resume = False
    _prepare_run_dir(cfg, resume)
    return resume


def _restore_rng(state: dict, cfg: TrainConfig) -> None:
    per_rank = state.get("torch_rng_ranks")
    if per_rank and len(per_rank) == dist.world_size():
        torch.set_rng_state(per_rank[dist.rank()])
    elif dist.is_main():
        torch.set_rng_state(state["torch_rng"])
    else:  # resumed with another number of processes: fresh, distinct dropout streams
        torch.manual_seed(cfg.seed + 7919 * dist.rank())


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune on the train split, validate each epoch, keep the best checkpoint.

    Under torchrun (WORLD_SIZE > 1) each process trains on its share of every batch with the negatives
    of all of them; rank 0 alone validates and writes RUN, and its decisions are broadcast.
    """
    if not cfg.out:
        raise FashionSearchError("--out RUN is required")
    keep_freed_memory()  # a step's activations reused from the heap, not re-faulted every step
    joined = dist.initialized()  # a caller that set up the process group itself keeps it
    device = dist.init(resolve_device(cfg.device))
    try:
        return _train(cfg, resume, progress, device)
    finally:
        if not joined:
            dist.shutdown()


def _check_memory_options(model: RetrievalModel, cfg: TrainConfig) -> None:
    batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if cfg.grad_cache_chunk and batch_norm:
        # Each chunk would normalise with its own batch statistics: not the whole batch's gradients.
        raise FashionSearchError(
            f"--grad-cache-chunk needs towers without batch norm; {cfg.model} has BatchNorm layers "
            "(use a ViT backbone, or a batch that fits without caching)"
        )
    if cfg.grad_checkpointing:
        if batch_norm:  # open_clip checkpoints transformer towers only
            log.warning(
                "%s: gradient checkpointing covers the text tower only, not the ResNet image tower", cfg.model
            )
        model.backbone.clip.set_grad_checkpointing(True)


def _train(cfg: TrainConfig, resume: bool, progress: bool, device: torch.device) -> TrainResult:
    resume = dist.on_main(lambda: _start_run(cfg, resume))
    run = Path(cfg.out)
    main = dist.is_main()
    progress = progress and main
    data = FashionIQ(cfg.data)
    _seed_everything(cfg.seed)
    model = create_model(cfg.model, cfg.pretrained, fusion=cfg.fusion, device=device)
    _check_memory_options(model, cfg)
    dist.broadcast_parameters(model)
    if dist.rank() > 0:  # the same weights, but each rank its own dropout masks
        torch.manual_seed(cfg.seed + 7919 * dist.rank())
    dataset, sampler, loader = build_train_loader(model, data, cfg, device)
    steps_per_epoch = min(len(sampler), cfg.max_steps_per_epoch or len(sampler))
    optimizer = build_optimizer(model, cfg)
    scheduler = cosine_with_warmup(optimizer, cfg.epochs * steps_per_epoch, warmup_fraction(cfg))
    history: list[dict] = []
    start_epoch, best_score, best_epoch, stale = 0, -1.0, -1, 0
    if resume:  # every rank loads last.pt: RUN must be on a filesystem all nodes see
        state = read_checkpoint(run / "last.pt")
        _check_same_architecture(state, cfg, run)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state, cfg)
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        best_score, best_epoch, stale = state["best_score"], state["best_epoch"], state["stale"]
    if main:
        cfg.dump(run / "config.yaml")
    categories = [c for c in cfg.categories if c in data.categories("val")]

    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience or _loss_reached(cfg, history):
            break
        started = time.perf_counter()
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        if cfg.mine_hard_negatives and epoch > 0:
            sampler.groups = dist.on_main(
                functools.partial(
                    similarity_groups,
                    model,
                    data,
                    dataset.triplets,
                    cfg.mine_hard_negatives,
                    cfg.seed + epoch,
                )
            )
        if cfg.group_negatives and cfg.group_negative_pool and epoch > 0:
            dataset.negative_pools = dist.on_main(
                functools.partial(similar_look_mates, model, dataset, cfg.group_negative_pool)
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
            sizes = dist.batch_sizes(batch["size"])  # one number per rank: every rank skips together
            if min(sizes) < 1 or sum(sizes) < 2:  # a contrastive batch needs negatives
                continue
            batch["rank_sizes"] = sizes
            losses.append(optimize_step(model, batch, cfg, device, optimizer, scheduler))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        bar.close()
        skipped = [s for part in dist.all_gather_objects(skipped) for s in part]
        if not losses:  # no checkpoint of a model that never trained
            raise FashionSearchError(
                f"epoch {epoch + 1} trained no step: no batch held 2 usable triplets "
                f"({len(skipped)} skipped for unreadable images, e.g. {skipped[:1]})"
            )
        # Each rank's loss is weighted by its share of the batch: their mean is the whole batch's loss.
        loss = dist.all_reduce_sum([float(np.sum(losses))])[0] / (dist.world_size() * len(losses))
        record = {
            "epoch": epoch + 1,
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - started, 2),
            "skipped": {"triplets": len(skipped), "examples": skipped[:5]},
        }
        rng_states = dist.all_gather_objects(torch.get_rng_state())

        record, categories, best_score, best_epoch, stale = dist.on_main(
            functools.partial(
                _finish_epoch,
                model,
                cfg,
                EpochState(history, categories, best_score, best_epoch, stale),
                record,
                torch_rng=rng_states,
                optimizer=optimizer,
                scheduler=scheduler,
            )
        )
        history.append(record)
        if progress:
            val = record.get("val", {}).get("composed", {})
            print(
                f"epoch {epoch + 1}: loss {record['loss']:.4f}  val composed R@10 {val.get('R@10', 0):.2f} "
                f"R@50 {val.get('R@50', 0):.2f}  ({record['seconds']:.0f}s)",
                flush=True,
            )
    if main:
        atomic_write_json(run / "history.json", _history_doc(cfg, best_epoch, history, finished=True))
    dist.barrier()  # no rank leaves before the run's files are complete
    return TrainResult(run, best_score, best_epoch, len(history), history)


def warmup_fraction(cfg: TrainConfig) -> float:
    """The share of all steps spent warming up: warmup_epochs of the epochs when given, else warmup_ratio."""
    return cfg.warmup_ratio if cfg.warmup_epochs is None else min(1.0, cfg.warmup_epochs / cfg.epochs)


def _loss_reached(cfg: TrainConfig, history: list[dict]) -> bool:
    """The stop_at_loss rule, read from the history so that a resumed run obeys it too."""
    last = history[-1].get("loss") if history else None
    return cfg.stop_at_loss is not None and last is not None and last <= cfg.stop_at_loss


@dataclass
class EpochState:
    """What the early-stopping decision and the saved run carry from epoch to epoch."""

    history: list[dict]
    categories: list[str]
    best_score: float
    best_epoch: int
    stale: int


def _finish_epoch(
    model: RetrievalModel,
    cfg: TrainConfig,
    state: EpochState,
    record: dict,
    torch_rng: list[torch.Tensor],
    optimizer,
    scheduler,
) -> tuple[dict, list[str], float, int, int]:
    """Rank 0's end of an epoch: validate, keep the best checkpoint, save last.pt and history.json.
    Returns (record, categories still validated, best score, best epoch, stale epochs)."""
    run, epoch = Path(cfg.out), record["epoch"] - 1
    categories, best, best_at, stale = state.categories, state.best_score, state.best_epoch, state.stale
    result = _validate(model, cfg, categories)
    # Rank 0's RNG state after validation, which draws from it (its loader's seed): a resumed run
    # must continue from exactly where the uninterrupted one is. The other ranks do not validate.
    torch_rng = [torch.get_rng_state(), *torch_rng[1:]]
    if result is not None:
        record["val"] = {mode: rows["average"] for mode, rows in result["modes"].items()}
        record["score"] = result["selection_score"]
    else:  # nothing to validate on: keep the last epoch
        categories = []
        record["score"] = float(epoch)
    if record["score"] > best:
        best, best_at, stale = record["score"], epoch + 1, 0
        atomic_torch_save(
            model_payload(model, config=cfg.to_dict(), epoch=epoch + 1, metrics=record),
            run / "checkpoint.pt",
        )
    else:
        stale += 1
    history = [*state.history, record]
    atomic_torch_save(
        model_payload(
            model,
            config=cfg.to_dict(),
            epoch=epoch,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            torch_rng=torch_rng[0],
            # one state per rank: each rank's dropout stream continues where it was
            torch_rng_ranks=torch_rng if len(torch_rng) > 1 else None,
            history=history,
            best_score=best,
            best_epoch=best_at,
            stale=stale,
        ),
        run / "last.pt",
    )
    atomic_write_json(run / "history.json", _history_doc(cfg, best_at, history, finished=False))
    return record, categories, best, best_at, stale


def _history_doc(cfg: TrainConfig, best_epoch: int, history: list[dict], finished: bool) -> dict:
    return {"config": cfg.to_dict(), "best_epoch": best_epoch, "finished": finished, "epochs": history}
