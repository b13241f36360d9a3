"""Contrastive losses: the composed loss (fused query vs. batch targets) and the CLIP image-text loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positives(row_keys: list[str], col_keys: list[str], device: torch.device) -> torch.Tensor:
    # The same target image can appear twice in a batch: both columns are positives, never negatives.
    index = {k: n for n, k in enumerate(sorted(set(row_keys) | set(col_keys)))}
    rows = torch.tensor([index[k] for k in row_keys], device=device)
    cols = torch.tensor([index[k] for k in col_keys], device=device)
    return (rows[:, None] == cols[None, :]).float()


def multi_positive_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a uniform distribution over each row's positives."""
    target = positives / positives.sum(dim=1, keepdim=True).clamp_min(1.0)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def composed_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor,
    target_ids: list[str],
    query_ids: list[str] | None = None,
) -> torch.Tensor:
    """Each fused query must pick its own target among the batch's targets (temperature = 1/scale).

    `targets` may be every rank's targets (`query_ids` then names the local queries' targets): a target
    id that appears anywhere in the gathered batch is a positive for every query that wants it.
    """
    logits = logit_scale * queries @ targets.T
    rows = target_ids if query_ids is None else query_ids
    return multi_positive_cross_entropy(logits, _positives(rows, target_ids, queries.device))


def clip_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: list[str],
    all_images: torch.Tensor | None = None,
    all_texts: torch.Tensor | None = None,
    all_ids: list[str] | None = None,
) -> torch.Tensor:
    """The symmetric CLIP loss between images and the texts paired with them.

    With `all_*` (every rank's rows), the local images are scored against all texts and the local texts
    against all images; the mean of that over ranks is the loss of the whole gathered batch.
    """
    if all_images is None:
        all_images, all_texts, all_ids = images, texts, image_ids
    i2t = logit_scale * images @ all_texts.T
    t2i = logit_scale * texts @ all_images.T
    pos = _positives(image_ids, all_ids, images.device)
    return 0.5 * (multi_positive_cross_entropy(i2t, pos) + multi_positive_cross_entropy(t2i, pos))
