"""The Fashion-IQ evaluation protocol (CLIP4Cir's validate.py), for any fusion, on real or synthetic data.

Per category: the gallery is every present image of `image_splits/split.{cat}.{split}.json`; the query
text joins the two captions as "Cap1 and cap2"; the reference stays in the gallery; one target per
query. The reported average is the plain mean over categories. Missing or undecodable images skip
their triplets, which are counted, never fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fashion_search.data.fashioniq import FashionIQ, Triplet, join_captions, join_captions_reversed
from fashion_search.data.loading import embed_paths, iter_embedded
from fashion_search.errors import FashionSearchError
from fashion_search.evaluation.metrics import (
    DEFAULT_KS,
    average_metrics,
    recalls,
    selection_score,
    target_ranks,
)
from fashion_search.models.fusion import SumFusion
from fashion_search.models.retrieval import RetrievalModel

JOININGS = ("standard", "both")
KEYS = tuple(f"R@{k}" for k in DEFAULT_KS)


def compose_queries(
    model: RetrievalModel,
    ref: torch.Tensor,
    ref_paths: Sequence[Path],
    texts: list[str],
    batch_size: int = 64,
    workers: int | None = None,
) -> torch.Tensor:
    """model.compose over (reference, text) pairs, given the references' pooled embeddings and files.

    A fusion that reads token features gets each reference re-encoded with its tokens, batch by batch,
    and only the fused queries are kept: a split's worth of tokens would not fit in memory.
    """
    if not model.fusion.uses_tokens:
        return model.compose(ref, model.encode_texts(texts))
    out = torch.empty(len(texts), model.dim)
    for indices, feats, failed in iter_embedded(
        model, ref_paths, batch_size, workers, progress=False, encode=model.encode_query_pixels
    ):
        if failed:  # it decoded for the gallery a moment ago
            i, reason = failed[0]
            raise FashionSearchError(f"reference image {ref_paths[i]} no longer decodes: {reason}")
        out[indices] = model.compose(feats, model.encode_query_texts([texts[i] for i in indices]))
    return out


def _queries(
    model: RetrievalModel,
    ref: torch.Tensor,
    texts: list[str],
    texts_rev: list[str] | None,
    joining: str,
    ref_paths: Sequence[Path] = (),
    batch_size: int = 64,
    workers: int | None = None,
):
    """Query embeddings for every mode; `both` averages the two caption orders (used by some papers)."""
    txt = model.encode_texts(texts)
    modes = {"image_only": ref, "text_only": txt}
    baseline = SumFusion(model.dim)
    composed = compose_queries(model, ref, ref_paths, texts, batch_size, workers)
    summed = baseline(ref, txt)
    if joining == "both" and texts_rev is not None:
        txt_rev = model.encode_texts(texts_rev)
        rev = compose_queries(model, ref, ref_paths, texts_rev, batch_size, workers)
        composed = F.normalize(composed + rev, dim=-1)
        summed = F.normalize(summed + baseline(ref, txt_rev), dim=-1)
        modes["text_only"] = F.normalize(txt + txt_rev, dim=-1)
    modes["composed"] = composed
    if model.fusion.name != "sum":
        modes["sum"] = summed
    return modes


def evaluate_category(
    model: RetrievalModel,
    data: FashionIQ,
    category: str,
    split: str = "val",
    joining: str = "standard",
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    group_by: Callable[[Triplet], str] | None = None,
) -> dict[str, dict]:
    """Recall@K per mode for one category: {mode: {"R@1".., "queries", "gallery", "skipped"}}, plus
    "groups": {label: {"R@1".., "queries"}} over the queries `group_by` labels alike, when given."""
    present, _missing = data.gallery(category, split)
    paths = [data.image_path(i) for i in present]
    ok, gallery_emb, _failed = embed_paths(
        model, paths, batch_size=batch_size, workers=workers, progress=progress, desc=f"{category} gallery"
    )
    gallery_ids = [present[i] for i in ok]
    position = {image_id: n for n, image_id in enumerate(gallery_ids)}
    triplets, skipped = data.usable_triplets(category, split)
    # A triplet whose reference or target did not decode, or whose target is outside the split's
    # gallery, cannot be scored; it is skipped and counted like a missing image.
    usable = [t for t in triplets if t.target in position and t.reference in position]
    skipped += len(triplets) - len(usable)
    counts = {"queries": len(usable), "gallery": len(gallery_ids), "skipped": skipped}
    if not usable:
        return {mode: {**{k: 0.0 for k in KEYS}, **counts} for mode in _mode_names(model)}
    ref = gallery_emb[[position[t.reference] for t in usable]]
    texts = [join_captions(*t.captions) for t in usable]
    texts_rev = [join_captions_reversed(*t.captions) for t in usable] if joining == "both" else None
    targets = np.array([position[t.target] for t in usable])
    results = {}
    ref_paths = [data.image_path(t.reference) for t in usable]
    labels = np.array([group_by(t) for t in usable]) if group_by else None
    for mode, queries in _queries(
        model, ref, texts, texts_rev, joining, ref_paths, batch_size, workers
    ).items():
        ranks = target_ranks((queries @ gallery_emb.T).numpy(), targets)
        results[mode] = {**recalls(ranks), **counts}
        if labels is not None:
            results[mode]["groups"] = {
                str(g): {**recalls(ranks[labels == g]), "queries": int((labels == g).sum())}
                for g in sorted(set(labels.tolist()))
            }
    return results


def _pooled_groups(rows: list[dict]) -> dict[str, dict]:
    """Each group's recalls over all its queries, whatever their category (groups can be small)."""
    pooled: dict[str, dict] = {}
    for row in rows:
        for g, r in row.get("groups", {}).items():
            acc = pooled.setdefault(g, {k: 0.0 for k in KEYS} | {"queries": 0})
            for k in KEYS:
                acc[k] += r[k] * r["queries"]
            acc["queries"] += r["queries"]
    return {
        g: {k: (acc[k] / acc["queries"] if k in KEYS else acc[k]) for k in acc} for g, acc in pooled.items()
    }


def _mode_names(model: RetrievalModel) -> list[str]:
    names = ["composed", "image_only", "text_only"]
    return names + (["sum"] if model.fusion.name != "sum" else [])


def evaluate(
    model: RetrievalModel,
    data_root: str | Path,
    split: str = "val",
    categories: Sequence[str] | None = None,
    joining: str = "standard",
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    group_by: Callable[[Triplet], str] | None = None,
) -> dict:
    """The full protocol; returns the `eval --json` document (recalls in percent).

    `group_by` labels each query (say, by how many attributes it changes): every mode's rows and its
    average then carry "groups", the recalls of each label's queries (pooled over the categories)."""
    if joining not in JOININGS:
        raise FashionSearchError(f"unknown caption joining {joining!r} (known: {', '.join(JOININGS)})")
    if split == "test":
        raise FashionSearchError(
            "test captions have no targets: use --submission to write a ranked file instead"
        )
    data = FashionIQ(data_root)
    available = data.categories(split)
    cats = list(categories) if categories else available
    unknown = [c for c in cats if c not in available]
    if unknown:
        raise FashionSearchError(f"no {split} captions for {', '.join(unknown)} in {data_root}")
    per_cat = {
        c: evaluate_category(model, data, c, split, joining, batch_size, workers, progress, group_by)
        for c in cats
    }
    # A category none of whose queries has its images cannot be scored: averaged in as zeros it would
    # pull the mean down by a third (images for one category only is a common partial download).
    scored = [c for c in cats if per_cat[c]["composed"]["queries"] > 0]
    if not scored:
        skipped = sum(per_cat[c]["composed"]["skipped"] for c in cats)
        raise NothingToScore(
            f"no {split} query of {', '.join(cats)} can be scored: none has its reference and target images "
            f"under {Path(data_root) / 'images'} ({skipped} skipped); fetch them (fashion-search "
            "download-fashioniq) or check --data"
        )
    modes: dict[str, dict] = {}
    for mode in _mode_names(model):
        rows = {c: per_cat[c][mode] for c in cats}
        avg = average_metrics([rows[c] for c in scored], KEYS)
        for key in ("queries", "gallery", "skipped"):
            avg[key] = int(sum(r[key] for r in rows.values()))
        if group_by is not None:
            avg["groups"] = _pooled_groups([rows[c] for c in scored])
        modes[mode] = {**rows, "average": avg}
    return {
        "split": split,
        "categories": cats,
        "protocol": {
            "joining": joining,
            "reference_in_gallery": True,
            "gallery": "full split",
            "average": "mean over the categories with queries",
        },
        "unscored_categories": [c for c in cats if c not in scored],
        "model": model.identity(),
        "modes": modes,
        "selection_score": selection_score(modes["composed"]["average"]),
    }


class NothingToScore(FashionSearchError):
    """No query of the asked categories has its images (training then keeps its last epoch)."""


def format_table(result: dict) -> str:
    """A terminal table: one row per mode and category, recalls in percent."""
    cats = result["categories"] + ["average"]
    lines = [
        f"{'mode':11s} {'category':9s} " + " ".join(f"{k:>6s}" for k in KEYS) + "  queries gallery skipped"
    ]
    for mode, rows in result["modes"].items():
        for c in cats:
            r = rows[c]
            vals = " ".join(f"{r[k]:6.2f}" for k in KEYS)
            lines.append(f"{mode:11s} {c:9s} {vals}  {r['queries']:7d} {r['gallery']:7d} {r['skipped']:7d}")
    return "\n".join(lines)


def by_changes_line(result: dict) -> str:
    """'composed R@10 by attributes changed: 1 -> 85.6 (412 queries), ...' from an evaluate(group_by=...)."""
    groups = result["modes"]["composed"]["average"].get("groups", {})
    parts = [f"{g} -> {r['R@10']:.1f} ({r['queries']} queries)" for g, r in sorted(groups.items())]
    return "composed R@10 by attributes changed: " + ", ".join(parts)


def rank_submission(
    model: RetrievalModel,
    data_root: str | Path,
    split: str = "test",
    categories: Sequence[str] | None = None,
    top: int = 50,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """For splits without targets (test): the top-ranked gallery ids of every composed query."""
    data = FashionIQ(data_root)
    cats = list(categories) if categories else data.categories(split)
    out: dict = {"split": split, "model": model.identity(), "categories": {}}
    for category in cats:
        present, _ = data.gallery(category, split)
        ok, gallery_emb, _ = embed_paths(
            model,
            [data.image_path(i) for i in present],
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            desc=f"{category} gallery",
        )
        gallery_ids = [present[i] for i in ok]
        position = {image_id: n for n, image_id in enumerate(gallery_ids)}
        triplets, skipped = data.usable_triplets(category, split)
        usable = [t for t in triplets if t.reference in position]
        rows = []
        if usable:
            ref = gallery_emb[[position[t.reference] for t in usable]]
            texts = [join_captions(*t.captions) for t in usable]
            ref_paths = [data.image_path(t.reference) for t in usable]
            queries = compose_queries(model, ref, ref_paths, texts, batch_size, workers)
            scores = queries @ gallery_emb.T
            best = torch.topk(scores, min(top, len(gallery_ids)), dim=1).indices.tolist()
            rows = [
                {
                    "candidate": t.reference,
                    "captions": list(t.captions),
                    "ranking": [gallery_ids[j] for j in idx],
                }
                for t, idx in zip(usable, best)
            ]
        out["categories"][category] = {
            "queries": rows,
            "gallery": len(gallery_ids),
            "skipped": skipped + len(triplets) - len(usable),
        }
    return out
