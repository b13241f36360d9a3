"""Losses, the hard-negative sampler, the training dataset and the optimiser."""

import torch
import torch.nn.functional as F

from fashion_search.data.fashioniq import Triplet
from fashion_search.training.augment import PairAugment
from fashion_search.training.data import GroupedBatchSampler, related_groups
from fashion_search.training.losses import clip_loss, composed_loss


def test_composed_loss_prefers_matching_targets():
    torch.manual_seed(0)
    targets = F.normalize(torch.randn(8, 16), dim=-1)
    ids = [str(i) for i in range(8)]
    good = composed_loss(targets, targets, torch.tensor(20.0), ids)
    bad = composed_loss(targets.roll(1, 0), targets, torch.tensor(20.0), ids)
    assert good < 0.1 < bad


def test_duplicate_targets_are_not_negatives():
    t = F.normalize(torch.randn(1, 16), dim=-1).repeat(2, 1)
    # Two queries with the same target image: both columns are correct, so loss can reach ~log(1).
    loss = composed_loss(t, t, torch.tensor(50.0), ["a", "a"])
    assert loss < 0.7  # log(2) would be the floor if the twin counted as a negative


def test_clip_loss_symmetric_and_finite():
    x = F.normalize(torch.randn(4, 8), dim=-1)
    assert torch.isfinite(clip_loss(x, x, torch.tensor(10.0), list("abcd")))


def test_related_groups_are_connected_components():
    ts = [
        Triplet("dress", "a", "b", ("", "")),
        Triplet("dress", "b", "c", ("", "")),
        Triplet("dress", "x", "y", ("", "")),
    ]
    g = related_groups(ts)
    assert g[0] == g[1] != g[2]


def test_sampler_covers_each_item_once_with_groups_together():
    groups = [i // 8 for i in range(64)]
    sampler = GroupedBatchSampler(groups, batch_size=16, per_group=4, seed=1)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(64)) and len(batches) == len(sampler) == 4
    # each batch holds chunks of 4 from the same group
    for b in batches:
        assert all(len({groups[i] for i in b[j : j + 4]}) == 1 for j in range(0, 16, 4))
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch, deterministically
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_similarity_groups_put_look_alike_targets_together(tmp_path, micro_model):
    import json

    from conftest import write_image
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.training.data import similarity_groups

    root = tmp_path / "data"
    for sub in ("captions", "image_splits"):
        (root / sub).mkdir(parents=True)
    ids = []
    for n in range(16):
        colour = (230, 20, 20) if n < 8 else (20, 20, 230)
        write_image(root / "images" / f"I{n:02d}.jpg", colour, size=(32, 32))
        ids.append(f"I{n:02d}")
    triplets = [Triplet("dress", ids[(n + 1) % 16], ids[n], ("x", "y")) for n in range(16)]
    (root / "image_splits" / "split.dress.train.json").write_text(json.dumps(ids))
    (root / "captions" / "cap.dress.train.json").write_text(json.dumps([]))
    groups = similarity_groups(micro_model, FashionIQ(root), triplets, group_size=8, seed=0)
    assert len(set(groups[:8])) == 1 and len(set(groups[8:])) == 1 and groups[0] != groups[8]


def test_training_loader_ships_uint8_and_tokens_equal_to_the_float_path(tmp_path, micro_model):
    """The loader's workers send uint8 pixels and token ids (a quarter of the bytes, no tokenising on the
    training thread); normalised on the device they are exactly what the float transform gave."""
    from torchvision import transforms as T

    from fashion_search.config import TrainConfig
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.data.synthetic import generate
    from fashion_search.training.augment import working_size
    from fashion_search.training.data import TripletDataset
    from fashion_search.training.loop import build_train_loader

    generate(tmp_path / "d", images_per_category=50, image_size=48, progress=False)
    data = FashionIQ(tmp_path / "d")
    cfg = TrainConfig(data=str(tmp_path / "d"), model="fs-micro", batch_size=8, workers=0, hard_negatives=2)
    dataset, sampler, loader = build_train_loader(micro_model, data, cfg, torch.device("cpu"))
    batch = next(iter(loader))
    assert batch["reference"].dtype == torch.uint8 and batch["tokens"].dtype == torch.long
    # Shipped at the augmentation's working size (the step resizes them to the model's input).
    size = working_size(micro_model.backbone.image_size)
    assert batch["reference"].shape[-2:] == (size, size)

    pipeline = micro_model.pixel_pipeline.at_size(size)
    float_transform = T.Compose(
        [*pipeline.geometry.transforms, T.ToTensor(), T.Normalize(pipeline.mean, pipeline.std)]
    )
    old = TripletDataset(
        data, "train", cfg.categories, float_transform, PairAugment(), cfg.seed, draft_size=size
    )
    first = next(iter(sampler))
    want = [old[i] for i in first]
    assert torch.equal(pipeline.normalise(batch["reference"]), torch.stack([w["reference"] for w in want]))
    assert torch.equal(pipeline.normalise(batch["target"]), torch.stack([w["target"] for w in want]))
    assert torch.equal(batch["tokens"], micro_model.backbone.tokenize([w["text"] for w in want]))


def test_training_decodes_jpegs_as_the_indexer_and_the_engine_do(tmp_path, micro_model):
    """Catalog photos and query uploads are decoded in JPEG draft mode (reduced DCT scale, never below
    the model's input); training must see those same pixels, not a full-size decode resized down."""
    from fashion_search.config import TrainConfig
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.data.images import load_image
    from fashion_search.data.loading import ImagePathsDataset
    from fashion_search.data.synthetic import generate
    from fashion_search.training.loop import build_train_loader

    generate(tmp_path / "d", images_per_category=50, image_size=160, progress=False)  # drafts to 40 px
    data = FashionIQ(tmp_path / "d")
    cfg = TrainConfig(data=str(tmp_path / "d"), model="fs-micro", batch_size=4, workers=0, augment=False)
    dataset, _, _ = build_train_loader(micro_model, data, cfg, torch.device("cpu"))
    item = dataset[0]
    path = data.image_path(dataset.triplets[0].reference)
    size = micro_model.backbone.image_size
    indexed = ImagePathsDataset([path], micro_model.pixel_pipeline, size, device_jpegs=False)[0][1]
    assert torch.equal(item["reference"], indexed)
    assert load_image(path, draft_size=(size, size)).size[0] < 160  # the draft did apply


def test_the_losses_are_computed_in_float32_outside_mixed_precision(micro_model, monkeypatch):
    # On a GPU the towers run under bf16 autocast; the losses' logits must not (their steps near a logit
    # scale of 100 would be 0.5). CPU autocast stands in for CUDA's here.
    from fashion_search.config import TrainConfig
    from fashion_search.training import loop, step

    monkeypatch.setattr(
        step, "_mixed_precision", lambda cfg, device: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    seen = []

    def spy(loss):
        def wrapped(a, b, scale, ids, **kwargs):
            seen.append((loss.__name__, torch.is_autocast_enabled("cpu"), a.dtype, b.dtype))
            return loss(a, b, scale, ids, **kwargs)

        return wrapped

    monkeypatch.setattr(step, "composed_loss", spy(composed_loss))
    monkeypatch.setattr(step, "clip_loss", spy(clip_loss))
    size = micro_model.backbone.image_size
    batch = {
        "reference": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8),
        "target": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8),
        "text": ["is red", "is blue"],
        "target_id": ["a", "b"],
    }
    loss = loop.train_step(micro_model, batch, TrainConfig(clip_loss_weight=0.5), torch.device("cpu"))
    assert {name for name, *_ in seen} == {"composed_loss", "clip_loss"}
    assert all(not autocast and a == b == torch.float32 for _, autocast, a, b in seen), seen
    assert loss.dtype == torch.float32


def test_group_negatives_are_look_mates_of_the_target_augmented_like_it(tmp_path, micro_model):
    """`--group-negatives N`: N other images of the triplet's related group ride along, with the
    target's augmentation, and the caption and augmentation are those of a run without them."""
    from fashion_search.config import TrainConfig
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.data.synthetic import generate
    from fashion_search.training.loop import build_train_loader

    generate(tmp_path / "d", images_per_category=50, image_size=48, progress=False)
    data = FashionIQ(tmp_path / "d")
    cfg = TrainConfig(data=str(tmp_path / "d"), model="fs-micro", batch_size=8, workers=0, group_negatives=3)
    dataset, sampler, loader = build_train_loader(micro_model, data, cfg, torch.device("cpu"))
    plain, _, _ = build_train_loader(
        micro_model, data, TrainConfig(**{**cfg.to_dict(), "group_negatives": 0}), torch.device("cpu")
    )
    batch = next(iter(loader))
    assert batch["negatives"].shape == (8 * 3, *batch["target"].shape[1:])
    assert len(batch["negative_ids"]) == 24
    first = next(iter(sampler))
    for row, i in enumerate(first):
        group = {
            x
            for t, g in zip(dataset.triplets, dataset.groups)
            if g == dataset.groups[i]
            for x in (t.reference, t.target)
        }
        mates = batch["negative_ids"][row * 3 : row * 3 + 3]
        assert set(mates) <= group - {dataset.triplets[i].target}
        same = plain[i]
        assert torch.equal(same["target"], batch["target"][row]) and same["text"] == batch["text"][row]
    # a negative that is the reference gets the reference's pixels: the same augmentation for all
    for row, i in enumerate(first):
        for k, mate in enumerate(batch["negative_ids"][row * 3 : row * 3 + 3]):
            if mate == dataset.triplets[i].reference:
                assert torch.equal(batch["negatives"][row * 3 + k], batch["reference"][row])


def test_group_negatives_are_columns_of_the_composed_loss_only():
    from fashion_search.config import TrainConfig
    from fashion_search.training.step import batch_loss

    class Scale:  # batch_loss reads only the temperature of the model
        class backbone:
            logit_scale = torch.tensor(2.0)

    torch.manual_seed(0)
    query, tgt, txt, neg = (F.normalize(torch.randn(n, 8), dim=-1) for n in (3, 3, 3, 6))
    cfg = TrainConfig(temperature=0.1, clip_loss_weight=0.0)
    batch = {"target_id": ["a", "b", "c"], "negative_ids": ["x", "y", "b", "z", "w", "v"]}
    got = batch_loss(Scale, query, tgt, txt, batch, cfg, neg)
    logits = 10.0 * query @ torch.cat([tgt, neg]).T
    positives = torch.zeros(3, 9)
    positives[0, 0] = positives[1, 1] = positives[1, 5] = positives[2, 2] = 1.0  # "b" twice: both right
    want = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(got, want)
    cfg = TrainConfig(temperature=0.1, clip_loss_weight=1.0)  # the CLIP loss ignores the negatives
    extra = batch_loss(Scale, query, tgt, txt, batch, cfg, neg) - got
    torch.testing.assert_close(extra, clip_loss(tgt, txt, torch.tensor(10.0), batch["target_id"]))


def test_preloaded_images_give_the_same_items_and_a_bad_file_is_still_reported(tmp_path, micro_model):
    """Decoded once in memory or decoded per item: the same pixels, augmentation, captions and negatives; a
    dataset over the budget is not preloaded, and an unreadable image is still a skipped item, not a crash."""
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.data.synthetic import generate
    from fashion_search.training.data import TripletDataset

    generate(tmp_path / "d", images_per_category=50, image_size=48, progress=False)
    data = FashionIQ(tmp_path / "d")

    def dataset():
        return TripletDataset(
            data,
            "train",
            ["dress"],
            micro_model.pixel_pipeline.to_uint8,
            PairAugment(),
            3,
            64,
            group_negatives=2,
        )

    plain, kept = dataset(), dataset()
    used = {i for t in kept.triplets for i in (t.reference, t.target)}
    assert kept.preload() == len(used) and set(kept.preloaded) == used
    size = micro_model.backbone.image_size  # kept at the model's input size, not the files' 48 px
    assert dataset().preload(max_bytes=size * size * 3 * len(used) - 1) == 0  # one image short of the budget
    for i in range(len(plain)):
        a, b = plain[i], kept[i]
        assert a["text"] == b["text"] and a["negative_ids"] == b["negative_ids"]
        for key in ("reference", "target", "negatives", "augment"):
            assert torch.equal(a[key], b[key])
    bad = kept.triplets[0].target
    data.image_path(bad).write_bytes(b"not an image")
    broken = dataset()
    assert broken.preload() == len(used) - 1 and bad not in broken.preloaded
    assert broken[0]["skipped"]["image"] == bad


def test_the_optimiser_is_fused_where_torch_can_and_updates_as_the_plain_adamw():
    """The fused AdamW (one kernel over every parameter) must take the plain per-tensor update's steps."""
    import copy

    from fashion_search.config import TrainConfig
    from fashion_search.models.checkpoint import create_model
    from fashion_search.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = create_model("fs-micro", "none", fusion="combiner", device="cpu")
    twin = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-3, lr_fusion=1e-3)
    fused = build_optimizer(model, cfg)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert fused.defaults["fused"]
    plain = torch.optim.AdamW(param_groups(twin, cfg), betas=(0.9, 0.98), eps=1e-6)
    for step in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad(set_to_none=True)
            gen = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_mined_look_mates_are_the_models_nearest_in_the_group_and_feed_the_negatives(tmp_path, micro_model):
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.data.synthetic import generate
    from fashion_search.training.augment import working_size
    from fashion_search.training.data import TripletDataset, similar_look_mates

    generate(tmp_path / "d", images_per_category=50, image_size=48, progress=False)
    data = FashionIQ(tmp_path / "d")

    def dataset():
        pipeline = micro_model.pixel_pipeline.to_uint8
        return TripletDataset(data, "train", ["dress"], pipeline, PairAugment(), 0, 64, group_negatives=2)

    kept, plain = dataset(), dataset()
    kept.preload()
    pools = similar_look_mates(micro_model, kept, k=2)
    from_files = similar_look_mates(micro_model, plain, k=2)  # the same pixels, batched differently
    assert sum(from_files[i] == p for i, p in pools.items()) >= 0.95 * len(pools) == 0.95 * len(from_files)
    group_of = {i: g for g, members in kept.group_images.items() for i in members}
    some = sorted(pools)[0]
    mates = [m for m in kept.group_images[group_of[some]] if m != some]
    vectors = micro_model.encode_pixels(torch.stack([kept.preloaded[i] for i in [some, *mates]]))
    nearest = (vectors[1:] @ vectors[0]).topk(2).indices.tolist()
    assert pools[some] == [mates[j] for j in nearest]
    assert all(
        len(p) == 2 and i not in p and {group_of[m] for m in p} == {group_of[i]} for i, p in pools.items()
    )
    kept.negative_pools = pools
    for i in range(len(kept)):
        assert set(kept[i]["negative_ids"]) <= set(pools[kept.triplets[i].target])

    # Training keeps its images at the augmentation's working size: mined at the model's size all the same.
    size = working_size(micro_model.backbone.image_size)
    at_working_size = TripletDataset(
        data, "train", ["dress"], micro_model.pixel_pipeline.at_size(size).to_uint8, PairAugment(), 0, size, 2
    )
    at_working_size.preload()
    assert next(iter(at_working_size.preloaded.values())).shape[-1] == size
    mined = similar_look_mates(micro_model, at_working_size, k=2)
    assert sum(mined[i] == p for i, p in pools.items()) >= 0.9 * len(pools) == 0.9 * len(mined)
