"""One optimisation step: embed, the composed + CLIP loss over the (gathered) batch, backward, update.

Two ways to get the gradients, with the same result:
- plain: the whole batch through the encoders with the graph kept;
- cached (`grad_cache_chunk`, GradCache, Gao et al. 2021): the batch is embedded in chunks without a
  graph, the loss over the whole batch gives the gradients of the embeddings, and each chunk is run
  again with the graph to push those gradients into the encoders. Memory then grows with the chunk, not
  the batch, while the in-batch negatives stay those of the whole batch.
Under torchrun the loss takes its negatives from every rank (training/distributed.py).
"""

from __future__ import annotations

import contextlib

import torch

from fashion_search.config import TrainConfig
from fashion_search.models.retrieval import RetrievalModel
from fashion_search.training import distributed as dist
from fashion_search.training.augment import augment_pixels
from fashion_search.training.losses import clip_loss, composed_loss


def _mixed_precision(cfg: TrainConfig, device: torch.device):
    # bf16 only: unlike inference (models.backbone.autocast), training has no GradScaler, so fp16 could underflow.
    if cfg.amp and device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _tokens(model: RetrievalModel, batch: dict) -> torch.Tensor:
    tokens = batch.get("tokens")
    return model.backbone.tokenize(batch["text"]) if tokens is None else tokens


def embed(
    model: RetrievalModel,
    reference: torch.Tensor,
    target: torch.Tensor,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    negatives: torch.Tensor | None = None,
    augment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(fused query, target image, text) embeddings in float32, and the group negatives' if given.
    `augment` holds each triplet's augmentation (training/augment.py) for its uint8 pixels."""
    # Each part goes to the device on its own: concatenating the loader's pinned tensors on the host
    # would make an unpinned copy, and its transfer synchronous.
    parts = [reference, target] + ([] if negatives is None else [negatives])
    if augment is None:
        pixels = torch.cat([model.model_input(p) for p in parts])
    else:
        pixels = torch.cat([_augmented(model, p, augment, device) for p in parts])
    with _mixed_precision(cfg, device):
        # Pooled embeddings, plus token features when the fusion reads them (attention).
        ref, tgt, *neg = model.image_query_features(pixels).split([len(p) for p in parts])
        txt = model.text_query_features(tokens.to(device, non_blocking=True))
        query = model.fusion(ref, txt)
    out = (query.float(), tgt.pooled.float(), txt.pooled.float())
    return out + tuple(n.pooled.float() for n in neg)


def _augmented(model: RetrievalModel, pixels: torch.Tensor, augment: torch.Tensor, device) -> torch.Tensor:
    # A triplet's row of parameters serves each of its images: n references, n targets or n * k negatives.
    if pixels.dtype != torch.uint8:
        raise ValueError("augmentation needs the loader's uint8 pixels (pixel_pipeline.to_uint8)")
    rows = augment.repeat_interleave(len(pixels) // len(augment), dim=0)
    moved = pixels.to(device, non_blocking=True)
    # The loader ships them at the augmentation's working size; the model gets its own input size.
    augmented = augment_pixels(moved, rows.to(device, non_blocking=True), model.pixel_pipeline.resize_tensors)
    return model.pixel_pipeline.normalise(augmented)


def batch_loss(
    model: RetrievalModel,
    query: torch.Tensor,
    tgt: torch.Tensor,
    txt: torch.Tensor,
    batch: dict,
    cfg: TrainConfig,
    neg: torch.Tensor | None = None,
) -> torch.Tensor:
    """The composed (+ CLIP) loss of the local rows against the targets and texts of every rank.

    Group negatives (`neg`, with `batch["negative_ids"]`) are extra columns of the composed loss only:
    a look-mate is often a right answer to the caption alone, so the CLIP loss must not count it wrong.
    The losses run in float32, outside autocast: under it the logits' matmul would run in bf16, whose
    steps near a logit scale of 100 are 0.5 -- as large as the differences being learned. Each rank's
    loss is weighted by its share of the rows, so the mean over ranks is the loss of the whole batch.
    """
    if cfg.temperature is None:
        scale = model.backbone.logit_scale.exp().clamp(max=100.0)
    else:  # fixed: logit_scale gets no gradient, so the optimiser leaves it as it is
        scale = torch.tensor(1.0 / cfg.temperature, device=tgt.device)
    ids = batch["target_id"]
    if not dist.active():
        columns, column_ids = tgt, ids
        if neg is not None:
            columns, column_ids = torch.cat([tgt, neg]), list(ids) + list(batch["negative_ids"])
        loss = composed_loss(query, columns, scale, column_ids, query_ids=ids)
        if cfg.clip_loss_weight > 0:
            loss = loss + cfg.clip_loss_weight * clip_loss(tgt, txt, scale, ids)
        return loss
    sizes = batch.get("rank_sizes") or dist.batch_sizes(len(ids))
    all_ids = [i for part in dist.all_gather_objects(list(ids)) for i in part]
    all_tgt = dist.gather_with_grad(tgt, sizes)
    columns, column_ids = all_tgt, all_ids
    if neg is not None:
        per = len(batch["negative_ids"]) // max(1, len(ids))
        neg_ids = [i for part in dist.all_gather_objects(list(batch["negative_ids"])) for i in part]
        all_neg = dist.gather_with_grad(neg, [n * per for n in sizes])
        columns, column_ids = torch.cat([all_tgt, all_neg]), all_ids + neg_ids
    loss = composed_loss(query, columns, scale, column_ids, query_ids=ids)
    if cfg.clip_loss_weight > 0:
        all_txt = dist.gather_with_grad(txt, sizes)
        loss = loss + cfg.clip_loss_weight * clip_loss(tgt, txt, scale, ids, all_tgt, all_txt, all_ids)
    return loss * (len(ids) * len(sizes) / sum(sizes))


def train_step(model: RetrievalModel, batch: dict, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """One forward: fuse(reference, text) must find its target; the text must also match its target."""
    out = embed(
        model,
        batch["reference"],
        batch["target"],
        _tokens(model, batch),
        cfg,
        device,
        batch.get("negatives"),
        batch.get("augment"),
    )
    return batch_loss(model, *out[:3], batch, cfg, *out[3:])


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(
    model: RetrievalModel, batch: dict, cfg: TrainConfig, device: torch.device
) -> torch.Tensor:
    """GradCache: the gradients of the whole-batch loss, with the encoders' graph kept one chunk at a time.

    The fusion's dropout must drop the same units in both passes, or the cached embedding gradients
    would belong to another forward: each chunk's RNG state is saved before its first pass and restored
    before its second, and the RNG ends where the first pass left it.
    """
    n, size = len(batch["target_id"]), cfg.grad_cache_chunk
    tokens, negatives, augment = _tokens(model, batch), batch.get("negatives"), batch.get("augment")
    per = 0 if negatives is None else len(negatives) // n  # group negatives per row

    def chunk(a: int, b: int) -> tuple[torch.Tensor, ...]:
        neg = None if negatives is None else negatives[a * per : b * per]
        params = None if augment is None else augment[a:b]
        ref, tgt = batch["reference"][a:b], batch["target"][a:b]
        return embed(model, ref, tgt, tokens[a:b], cfg, device, neg, params)

    spans = [(a, min(a + size, n)) for a in range(0, n, size)]
    states, parts = [], []
    with torch.no_grad():
        for a, b in spans:
            states.append(_rng_state(device))
            parts.append(chunk(a, b))
    after = _rng_state(device)
    leaves = [torch.cat(p).requires_grad_() for p in zip(*parts)]
    loss = batch_loss(model, *leaves[:3], batch, cfg, *leaves[3:])
    loss.backward()  # gradients of the embeddings, and of the temperature directly
    grads = [leaf.grad for leaf in leaves]
    for (a, b), state in zip(spans, states):
        _set_rng_state(state, device)
        rows = [(a, b)] * 3 + [(a * per, b * per)] * (len(grads) - 3)
        torch.autograd.backward(chunk(a, b), [g[x:y] for g, (x, y) in zip(grads, rows)])
    _set_rng_state(after, device)
    return loss.detach()


def compute_gradients(model: RetrievalModel, batch: dict, cfg: TrainConfig, device: torch.device) -> float:
    """Fill .grad with the gradient of the batch loss (averaged over ranks); returns this rank's loss."""
    if cfg.grad_cache_chunk and len(batch["target_id"]) > cfg.grad_cache_chunk:
        loss = cached_backward(model, batch, cfg, device)
    else:
        loss = train_step(model, batch, cfg, device)
        loss.backward()
    dist.average_gradients(list(model.parameters()))
    return loss.item()


def optimize_step(
    model: RetrievalModel, batch: dict, cfg: TrainConfig, device: torch.device, optimizer, scheduler
) -> float:
    """One optimisation step (forward, backward, clipping, update, schedule); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = compute_gradients(model, batch, cfg, device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss
