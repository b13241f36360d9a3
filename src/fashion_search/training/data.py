"""Training triplets: a dataset of model-size pixels with their paired augmentation drawn, and a hard-negative
batch sampler."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from fashion_search.data.fashioniq import FashionIQ, Triplet, training_caption
from fashion_search.data.images import load_image
from fashion_search.errors import FashionSearchError, ImageDecodeError
from fashion_search.training.augment import PairAugment

# Training images are kept in memory, decoded and at the augmentation's working size, when all of them fit
# in this many bytes (the demo's 2,160 at 96 px take 60 MB; Fashion-IQ's 40k+ at 336 px would not, and are
# decoded per item).
PRELOAD_BYTES = 1 << 30


class TripletDataset(Dataset):
    """Item i -> dict(reference, target pixels, caption, target id[, augment][, group negatives]), or a
    `skipped` record if an image is bad.

    `transform` gives the pixels' geometry (a pixel pipeline's uint8 `to_uint8`: the model's input size,
    or the augmentation's larger working size, training/augment.py). With
    `augment`, the item carries its triplet's augmentation parameters (training/augment.py), which the
    training step applies to all of the item's images alike. With `group_negatives` N, it also carries N
    other images of its related group (the target's look-mates on Fashion-IQ-style data), augmented like
    the target so that only the garment tells them apart: extra negatives for the composed loss.
    """

    def __init__(
        self,
        data: FashionIQ,
        split: str,
        categories: Sequence[str],
        transform,
        augment: PairAugment | None = None,
        seed: int = 0,
        draft_size: int | None = None,
        group_negatives: int = 0,
    ):
        self.data, self.transform, self.augment, self.seed = data, transform, augment, seed
        self.group_negatives = group_negatives
        # JPEGs decoded at a reduced DCT scale, never below the model's input size: as the indexer and
        # the engine decode catalog and query photos, so training sees the pixels serving sees (and a
        # large JPEG decodes several times faster).
        self.draft = (draft_size, draft_size) if draft_size else None
        self.triplets: list[Triplet] = []
        self.skipped = 0
        for cat in categories:
            usable, skipped = data.usable_triplets(cat, split)
            self.triplets.extend(usable)
            self.skipped += skipped
        if not self.triplets:
            raise FashionSearchError(f"no usable {split} triplets for {', '.join(categories)} in {data.root}")
        self.groups = related_groups(self.triplets)
        members: dict[int, set[str]] = {}
        for t, g in zip(self.triplets, self.groups):
            members.setdefault(g, set()).update((t.reference, t.target))
        self.group_images = {g: sorted(ids) for g, ids in members.items()}
        self.preloaded: dict[str, torch.Tensor] = {}
        # {target: the look-mates its group negatives are drawn from}, when mined (similar_look_mates);
        # a target not in it draws from its whole group.
        self.negative_pools: dict[str, list[str]] = {}
        self.epoch = 0

    def preload(self, max_bytes: int = PRELOAD_BYTES) -> int:
        """Decode every image the triplets use once, here, through `transform`, when they all fit
        in `max_bytes`; returns how many are kept. Each epoch's loader workers are forked from this
        process and read them from its memory instead of decoding and resizing the same files again. An
        image that fails to decode is left out and reported when an item needs it."""
        ids = sorted({i for t in self.triplets for i in (t.reference, t.target)})
        total = 0
        for image_id in ids:
            try:
                pixels = self._decode(image_id)
            except (ImageDecodeError, OSError):
                continue
            size = pixels.numel() * pixels.element_size()
            total += size
            # Judged on the first image too: a dataset that cannot stay is not decoded in vain.
            if total > max_bytes or (not self.preloaded and size * len(ids) > max_bytes):
                break
            self.preloaded[image_id] = pixels
        return len(self.preloaded)

    def _decode(self, image_id: str) -> torch.Tensor:
        return self.transform(load_image(self.data.image_path(image_id), draft_size=self.draft))

    def _pixels(self, image_id: str) -> torch.Tensor:
        pixels = self.preloaded.get(image_id)
        return self._decode(image_id) if pixels is None else pixels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.triplets)

    def _negative_ids(self, i: int, rng: random.Random) -> list[str]:
        t = self.triplets[i]
        pool = self.negative_pools.get(t.target) or [
            x for x in self.group_images[self.groups[i]] if x != t.target
        ]
        if not pool:  # a group of one pair: any other target of the split
            pool = [x.target for x in self.triplets if x.target != t.target]
        return [rng.choice(pool) for _ in range(self.group_negatives)]

    def __getitem__(self, i: int):
        t = self.triplets[i]
        # Seeded by (seed, epoch, item): identical across worker counts and after --resume.
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        params = None if self.augment is None else self.augment.draw(rng)  # before the caption's draw
        ids = [t.reference, t.target]
        if self.group_negatives:
            # Drawn from their own stream, so the caption and augmentation stay those of a run without.
            ids += self._negative_ids(i, random.Random(f"negatives:{self.seed}:{self.epoch}:{i}"))
        pixels = []
        for image_id in ids:
            try:
                pixels.append(self._pixels(image_id))
            except (ImageDecodeError, OSError) as exc:
                # Reported, not fatal: the loop counts these per epoch in history.json.
                return {"skipped": {"image": image_id, "reason": str(exc) or type(exc).__name__}}
        item = {
            "reference": pixels[0],
            "target": pixels[1],
            "text": training_caption(*t.captions, rng),
            "target_id": t.target,
        }
        if params is not None:
            item["augment"] = params
        if self.group_negatives:
            item["negatives"] = torch.stack(pixels[2:])
            item["negative_ids"] = ids[2:]
        return item


def collate_triplets(batch: list[dict], tokenize=None) -> dict:
    """Stack the good items; `skipped` lists the triplets dropped for an unreadable image.

    With `tokenize` (the model's tokenizer: `functools.partial(collate_triplets, tokenize=...)`), the
    captions are tokenised here, in the loader's worker processes, instead of on the training thread,
    where on a GPU it would be a sizeable share of each step.
    """
    good = [b for b in batch if "skipped" not in b]
    out: dict = {"skipped": [b["skipped"] for b in batch if "skipped" in b], "size": len(good)}
    if good:
        out.update(
            reference=torch.stack([b["reference"] for b in good]),
            target=torch.stack([b["target"] for b in good]),
            text=[b["text"] for b in good],
            target_id=[b["target_id"] for b in good],
        )
        if "augment" in good[0]:
            out["augment"] = torch.stack([b["augment"] for b in good])
        if "negatives" in good[0]:  # row-major: row r's negatives are rows r*N .. r*N+N-1
            out["negatives"] = torch.cat([b["negatives"] for b in good])
            out["negative_ids"] = [i for b in good for i in b["negative_ids"]]
        if tokenize is not None:
            out["tokens"] = tokenize(out["text"])
    return out


def related_groups(triplets: Sequence[Triplet]) -> list[int]:
    """Connected components of the image graph (reference-target edges): near-duplicate looks."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for t in triplets:
        parent[find(t.reference)] = find(t.target)
    roots: dict[str, int] = {}
    return [roots.setdefault(find(t.reference), len(roots)) for t in triplets]


def similarity_groups(
    model, data: FashionIQ, triplets: Sequence[Triplet], group_size: int, seed: int = 0
) -> list[int]:
    """Group triplets whose targets look alike to the current model: mined hard negatives.

    The targets are embedded and clustered (k-means, about `group_size` targets per cluster); batches
    drawn from these groups put each target beside the images the model confuses it with, which the
    reference-target graph alone cannot find (the same garment in another look, say).
    """
    import faiss

    from fashion_search.data.loading import embed_paths

    targets = sorted({t.target for t in triplets})
    ok, emb, _ = embed_paths(model, [data.image_path(i) for i in targets], workers=0, progress=False)
    vectors = emb.numpy().astype("float32")
    n_clusters = max(1, len(ok) // max(1, group_size))
    if n_clusters < 2:
        return related_groups(triplets)
    kmeans = faiss.Kmeans(vectors.shape[1], n_clusters, niter=10, seed=seed, spherical=True)
    kmeans.train(vectors)
    _, assignment = kmeans.index.search(vectors, 1)
    cluster = {targets[i]: int(c) for i, c in zip(ok, assignment[:, 0])}
    # A target that failed to embed keeps a group of its own.
    return [cluster.get(t.target, n_clusters + n) for n, t in enumerate(triplets)]


def similar_look_mates(model, dataset: TripletDataset, k: int, batch_size: int = 256) -> dict[str, list[str]]:
    """{image: the k other images of its related group that the current model finds most like it}.

    Mined hard negatives within the group: on Fashion-IQ-style data a target's look-mates share its look
    and differ in a few attributes, and the ones the model cannot yet tell from it (a neckline apart,
    say) teach it more than a random one. Images kept in memory are embedded from there.
    """
    from fashion_search.data.loading import embed_paths

    ids = sorted({i for members in dataset.group_images.values() for i in members})
    if all(i in dataset.preloaded for i in ids):
        chunks = [ids[a : a + batch_size] for a in range(0, len(ids), batch_size)]
        # Kept at the augmentation's working size when augmenting: resized to the model's, as uint8.
        resize = model.pixel_pipeline.resize_tensors
        vectors = [
            model.encode_pixels(
                resize(torch.stack([dataset.preloaded[i] for i in c])).round_().to(torch.uint8)
            )
            for c in chunks
        ]
        found = dict(zip(ids, torch.cat(vectors)))
    else:
        paths = [dataset.data.image_path(i) for i in ids]
        ok, emb, _ = embed_paths(model, paths, workers=0, progress=False)
        found = {ids[j]: emb[n] for n, j in enumerate(ok)}
    pools: dict[str, list[str]] = {}
    for members in dataset.group_images.values():
        have = [m for m in members if m in found]
        if len(have) < 2:
            continue
        vectors = torch.stack([found[m] for m in have])
        similarity = vectors @ vectors.T
        similarity.fill_diagonal_(float("-inf"))  # never its own negative
        nearest = similarity.topk(min(k, len(have) - 1), dim=1).indices
        pools.update({m: [have[c] for c in row] for m, row in zip(have, nearest.tolist())})
    return pools


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches built from chunks of `per_group` triplets of one related group: hard negatives in-batch.

    Each epoch shuffles groups and items deterministically from (seed, epoch); every triplet is seen
    once per epoch. Under torchrun (`num_replicas` > 1) every rank draws the same global batches of
    `batch_size` and yields its contiguous share: the concatenated shares are exactly the batch one
    process would draw, and since the loss gathers every rank's targets, a group whose chunk spans two
    ranks still meets its hard negatives in the same contrastive batch.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        per_group: int = 4,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size % num_replicas:
            raise FashionSearchError(
                f"--batch-size {batch_size} (the whole contrastive batch) must divide evenly among "
                f"{num_replicas} processes"
            )
        self.groups, self.batch_size, self.per_group = list(groups), batch_size, max(1, per_group)
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"sampler:{self.seed}:{self.epoch}")
        members: dict[int, list[int]] = {}
        for i, g in enumerate(self.groups):
            members.setdefault(g, []).append(i)
        chunks = []
        for items in members.values():
            rng.shuffle(items)
            chunks.extend(items[j : j + self.per_group] for j in range(0, len(items), self.per_group))
        rng.shuffle(chunks)
        flat = [i for chunk in chunks for i in chunk]
        batches = [flat[j : j + self.batch_size] for j in range(0, len(flat), self.batch_size)]
        # Sharded, a short last batch is always dropped: every rank must take part in every step.
        if (self.drop_last or self.num_replicas > 1) and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if self.num_replicas == 1:
            return iter(self._batches())
        per = self.batch_size // self.num_replicas
        return iter(b[self.rank * per : (self.rank + 1) * per] for b in self._batches())

    def __len__(self) -> int:
        n = len(self.groups) // self.batch_size
        return n if self.drop_last or self.num_replicas > 1 else -(-len(self.groups) // self.batch_size)
