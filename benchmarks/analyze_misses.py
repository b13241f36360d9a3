"""Where a trained model's composed queries miss on the synthetic data (needs DATA/attributes.json), as JSON.

For every val query: the target's rank, and for the gallery items ranked above it whether they share the
target's attributes (a look confusion) or the reference's look / background (a change not applied).
Two conditional ranks separate the two skills: the target's rank among its look-mates (the look given:
are the attributes right?) and among the items with its attributes (the attributes given: is the look
right?); and, for look-mates one attribute off that outrank the target, which attribute, and whether the
text asked to change it or to keep it.
Also R@10 by the number of attributes a triplet changes, and how many joined captions exceed the model's
text context (the end of a cut caption is lost).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import common
import numpy as np

ATTRIBUTE_KEYS = ("colour", "length", "neckline", "pattern", "sleeve")


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--data", required=True, help="a `fashion-search synth` dataset (demo/data)")
    p.add_argument("--checkpoint", required=True, help="a run directory or checkpoint (demo/run)")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--contexts", default="24,40", help="text contexts (tokens) to count longer captions against"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    torch = common.import_torch(args.threads)
    from PIL import Image

    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.data.loading import embed_paths
    from fashion_search.evaluation.fashioniq import join_captions
    from fashion_search.models.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    data = FashionIQ(args.data)
    attrs = json.loads((Path(args.data) / "attributes.json").read_text())

    def garment(image_id: str) -> tuple:
        return tuple(attrs[image_id][k] for k in ATTRIBUTE_KEYS)

    above, hits_by_changes, lengths = Counter(), {}, []
    look_given, attributes_given, one_off = [], [], Counter()
    for category in data.categories(args.split):
        present, _ = data.gallery(category, args.split)
        ok, emb, _ = embed_paths(model, [data.image_path(i) for i in present], workers=0, progress=False)
        ids = [present[i] for i in ok]
        position = {x: n for n, x in enumerate(ids)}
        corner = {x: Image.open(data.image_path(x)).convert("RGB").getpixel((1, 1)) for x in ids}
        triplets = [t for t in data.usable_triplets(category, args.split)[0] if t.target in position]
        texts = [join_captions(*t.captions) for t in triplets]
        lengths += [len(model.backbone.tokenizer.encode(t)) + 2 for t in texts]  # + start/end
        with torch.inference_mode():
            queries = model.fusion(emb[[position[t.reference] for t in triplets]], model.encode_texts(texts))
        for t, row in zip(triplets, (queries @ emb.T).numpy(), strict=True):
            order = np.argsort(-row)
            rank = int(np.flatnonzero(order == position[t.target])[0])
            changes = sum(attrs[t.reference][k] != attrs[t.target][k] for k in ATTRIBUTE_KEYS)
            hits_by_changes.setdefault(changes, []).append(rank < 10)
            target_score = row[position[t.target]]
            look_mates = [n for n, x in enumerate(ids) if attrs[x]["family"] == attrs[t.target]["family"]]
            twins = [n for n, x in enumerate(ids) if garment(x) == garment(t.target)]
            look_given.append(int((row[look_mates] > target_score).sum()))
            attributes_given.append(int((row[twins] > target_score).sum()))
            for j in order[:rank]:
                x = ids[j]
                off = [k for k in ATTRIBUTE_KEYS if attrs[x][k] != attrs[t.target][k]]
                if len(off) == 1 and attrs[x]["family"] == attrs[t.target]["family"]:
                    asked = attrs[t.reference][off[0]] != attrs[t.target][off[0]]
                    one_off[f"{off[0]}/{'changed' if asked else 'kept'}"] += 1
                kind = "same_attributes" if garment(x) == garment(t.target) else "other_attributes"
                if attrs[x]["family"] == attrs[t.target]["family"]:
                    kind += "/same_look"
                elif corner[x] == corner[t.target]:
                    kind += "/same_background"
                else:
                    kind += "/other_background"
                above[kind] += 1
    total = sum(above.values())
    n_queries = len(look_given)

    def conditional(ranks: list[int]) -> dict:
        ranks = np.array(ranks)
        return {f"R@{k}": round(float(np.mean(ranks < k)) * 100, 1) for k in (1, 3)}

    results = {
        "items_ranked_above_missed_targets": dict(above),
        "share_above": {k: round(v / total, 3) for k, v in above.items()} if total else {},
        "look_given": conditional(look_given),
        "attributes_given": conditional(attributes_given),
        "look_mates_one_attribute_off_above_target_per_query": {
            k: round(v / n_queries, 3) for k, v in one_off.most_common()
        },
        "r10_by_changes": {
            str(n): round(float(np.mean(v)) * 100, 1) for n, v in sorted(hits_by_changes.items())
        },
        "text_context": model.backbone.context_length,
        "joined_caption_tokens": {"p50": float(np.median(lengths)), "max": max(lengths)},
        "joined_captions_longer_than": {
            n: round(float(np.mean(np.array(lengths) > n)), 3) for n in common.parse_int_list(args.contexts)
        },
    }
    common.emit("analyze_misses", args, load0, {"results": results, "goals": []})


if __name__ == "__main__":
    main()
