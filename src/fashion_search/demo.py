"""The offline end-to-end demo: synth -> train the compact model -> evaluate -> index (with a product
catalog CSV) -> web UI.

Every stage leaves its artifact under DIR and is skipped on a second run when that artifact exists,
so `make demo` is slow once and quick afterwards.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

from fashion_search.atomic import atomic_open, atomic_write_json
from fashion_search.config import DEMO_OVERRIDES, TrainConfig
from fashion_search.errors import FashionSearchError

# Train images per category: 720 make train lines of 65+ garments, which vary all five attributes
# within a look as val looks do (360 made lines of 60 varying four). At the same number of steps
# (7 epochs against 14) that lifts composed R@10 by about 10 points (docs/TRAINING.md, "The train
# split moves the score most").
DEMO_TRAIN_IMAGES = 720
# Val (and test) gallery per category: large enough that R@50 is not 100 by default and a seed's
# R@10 is measured on 500 queries per category (Fashion-IQ's galleries hold 3,817-6,346 images).
DEMO_EVAL_GALLERY = 1000
DEMO_IMAGES_PER_CATEGORY = DEMO_TRAIN_IMAGES + 2 * DEMO_EVAL_GALLERY
DEMO_SEED = 0
DEMO_BRANDS = ("Acme", "Zed", "Moda", "Nord", "Lumen")
# Price bands per category; each product's price is drawn once inside its band.
_PRICES = {"dress": (35, 140), "shirt": (20, 80), "toptee": (12, 45)}
_IN_STOCK_SHARE = 0.8
_WORDS = {  # attribute values as a shop writes them in a title ("" = left out)
    "pattern": {"solid": "", "stripes": "striped", "dots": "polka-dot", "checks": "checked"},
    "sleeve": {"sleeveless": "sleeveless", "short": "short-sleeve", "long": "long-sleeve"},
    "length": {
        "mini": "mini",
        "knee": "knee-length",
        "maxi": "maxi",
        "cropped": "cropped",
        "regular": "",
        "long": "longline",
    },
    "category": {"dress": "dress", "shirt": "shirt", "toptee": "top"},
}
CATALOG_COLUMNS = (
    "image",
    "product_id",
    "title",
    "brand",
    "price",
    "in_stock",
    "colour",
    "sleeve",
    "length",
    "pattern",
    "neckline",
)


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    # Hard links keep the catalog free (no copies) and, unlike symlinks, stay inside the catalog root.
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_catalog(data_dir: Path, catalog: Path, split: str = "val") -> int:
    """The demo's shop catalog: the split's gallery, one sub-folder per category (for the filter)."""
    from fashion_search.data.fashioniq import FashionIQ

    data = FashionIQ(data_dir)
    count = 0
    for category in data.categories(split):
        present, _ = data.gallery(category, split)
        for image_id in present:
            src = data.image_path(image_id)
            _link_or_copy(src, catalog / category / src.name)
            count += 1
    return count


def product_title(category: str, attrs: dict[str, str]) -> str:
    """A shop's title for a synthetic garment: "Red striped long-sleeve maxi dress"."""
    words = [
        attrs["colour"],
        _WORDS["pattern"][attrs["pattern"]],
        _WORDS["sleeve"][attrs["sleeve"]],
        _WORDS["length"][attrs["length"]],
        _WORDS["category"][category],
    ]
    return " ".join(w for w in words if w).capitalize()


def write_catalog_metadata(data_dir: Path, catalog: Path, out: Path, seed: int = DEMO_SEED) -> int:
    """Write the demo catalog's product CSV (one row per image under `catalog`); returns the products.

    A product is one garment (a line of the generator with one set of attributes) and its photos are
    that garment in the families' different looks, as a shop has several photos of one product. Price,
    brand and stock are drawn per product from a generator seeded by (seed, product number): the same
    file on every run, whatever the Python hash seed.
    """
    import numpy as np

    from fashion_search.data.synthetic_draw import ATTRIBUTES

    attributes = json.loads((data_dir / "attributes.json").read_text(encoding="utf-8"))
    items = []
    for path in sorted(catalog.glob("*/*")):
        record = attributes.get(path.stem)
        if record is not None:
            items.append((f"{path.parent.name}/{path.name}", record))
    keys = sorted({(r["category"], r["line"], *(r[a] for a in ATTRIBUTES)) for _, r in items})
    products = {}
    for n, key in enumerate(keys):
        rng = np.random.default_rng([seed, n])
        low, high = _PRICES[key[0]]
        products[key] = {
            "product_id": f"{key[0][0].upper()}{n + 1:04d}",
            "brand": DEMO_BRANDS[int(rng.integers(len(DEMO_BRANDS)))],
            "price": f"{int(rng.integers(low, high + 1)) - 0.01:.2f}",
            "in_stock": "true" if rng.random() < _IN_STOCK_SHARE else "false",
        }
    with atomic_open(out, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=CATALOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for image_id, r in items:
            attrs = {a: r[a] for a in ATTRIBUTES}
            product = products[(r["category"], r["line"], *attrs.values())]
            writer.writerow(
                {"image": image_id, "title": product_title(r["category"], attrs), **product, **attrs}
            )
    return len(products)


def demo_config(directory: Path) -> TrainConfig:
    return TrainConfig(
        data=str(directory / "data"), out=str(directory / "run"), fusion="combiner", **DEMO_OVERRIDES
    )


# Where and how fast a run trains, not what it learns: a run differing only in these is the same recipe.
_NOT_RECIPE = ("data", "out", "workers", "device")


def recipe_of(cfg: TrainConfig) -> dict:
    """cfg's options that make a run what it is, as {option: value}."""
    return {k: v for k, v in cfg.to_dict().items() if k not in _NOT_RECIPE}


def recipe_changes(history: dict, cfg: TrainConfig) -> dict:
    """{option: (the run's value, cfg's value)} for the training options a finished run's history.json
    records differently from `cfg` (a run of an older demo recipe, say). An option the run does not
    record is newer than the run, which trained as its default does. `history` may give the number of
    epochs trained as `epochs_run` instead of the epochs' records."""
    was = {**TrainConfig().to_dict(), **(history.get("config") or {})}
    changed = {k: (was.get(k), v) for k, v in recipe_of(cfg).items() if was.get(k) != v}
    # Patience only ever ends a run early, and a larger one no sooner: a run that trained every epoch
    # under a patience no larger than cfg's is the run cfg would train.
    trained = history.get("epochs_run", len(history.get("epochs") or []))
    if (
        "patience" in changed
        and trained == was.get("epochs") == cfg.epochs
        and was["patience"] <= cfg.patience
    ):
        del changed["patience"]
    return changed


def _set_aside(directory: Path, reason: str) -> None:
    # Moved, never deleted, together with the index built from the run, so the demo trains again.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for stale in (directory / "run", directory / "index"):
        if stale.exists():
            stale.rename(stale.with_name(f"{stale.name}.old-{stamp}"))
    print(f"{reason}\nmoved the old run and index aside (*.old-{stamp}); training again")


def load_finished_run(directory: Path, cfg: TrainConfig | None = None):
    """The model of DIR/run if it holds a finished run this version can load, else None.

    A run whose checkpoint no longer fits the packaged model config, or (given `cfg`) that was trained
    with another recipe than `cfg`, is moved aside with the index built from it.
    """
    from fashion_search.models.checkpoint import load_checkpoint

    run_dir = directory / "run"
    history_file = run_dir / "history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    if not history.get("finished"):
        return None
    changed = recipe_changes(history, cfg) if cfg is not None else {}
    if changed:
        listed = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in changed.items())
        _set_aside(directory, f"{run_dir} was trained with another recipe ({listed})")
        return None
    try:
        return load_checkpoint(run_dir)
    except FashionSearchError as exc:
        _set_aside(directory, str(exc))
        return None


def demo_dataset(seed: int = DEMO_SEED) -> dict:
    """The arguments of `generate` that make the demo's dataset for a data seed."""
    return {"images_per_category": DEMO_IMAGES_PER_CATEGORY, "eval_gallery": DEMO_EVAL_GALLERY, "seed": seed}


def check_reusable_data(data_dir: Path, wanted: dict) -> None:
    """A demo folder's dataset is reused only when it was made with the same seed and sizes."""
    from fashion_search.data.synthetic import SUMMARY_FILE

    try:
        made = json.loads((data_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        made = {}
    differ = {k: made.get(k) for k in wanted if made.get(k) != wanted[k]}
    if differ:
        have = ", ".join(f"{k} {v}" for k, v in differ.items()) if made else "unknown settings"
        want = ", ".join(f"{k} {wanted[k]}" for k in differ)
        raise FashionSearchError(
            f"{data_dir} holds a dataset made with {have}, not {want}: give another --dir, or delete "
            f"{data_dir.parent} to make the demo again there"
        )


def run_demo(directory: Path, serve: bool = True, port: int = 8501, seed: int = DEMO_SEED) -> int:
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    data_dir, run_dir = directory / "data", directory / "run"
    catalog, index_dir = directory / "catalog", directory / "index"

    _stage(f"1/5 synthetic dataset (seed {seed})")
    wanted = demo_dataset(seed)
    if (data_dir / "attributes.json").exists():
        check_reusable_data(data_dir, wanted)
        print(f"reusing {data_dir}")
    else:
        from fashion_search.data.synthetic import generate

        generate(data_dir, **wanted)

    _stage("2/5 training the compact model (random init, CPU)")
    from fashion_search.training.loop import train

    cfg = demo_config(directory)
    model = load_finished_run(directory, cfg)
    if model is not None:
        print(f"reusing {run_dir / 'checkpoint.pt'}")
    else:
        from fashion_search.models.checkpoint import load_checkpoint

        train(cfg, resume=(run_dir / "last.pt").exists())
        model = load_checkpoint(run_dir)

    _stage("3/5 evaluation (Fashion-IQ protocol, val split)")
    from fashion_search.data.synthetic import changes_of
    from fashion_search.evaluation.fashioniq import by_changes_line, evaluate, format_table

    result = evaluate(model, data_dir, "val", workers=0, group_by=changes_of(data_dir))
    atomic_write_json(directory / "eval.json", result)
    print(format_table(result))
    print(by_changes_line(result))
    print(f"written to {directory / 'eval.json'}")

    _stage("4/5 indexing the val gallery as a shop catalog")
    from fashion_search.index.build import build_index
    from fashion_search.models.checkpoint import model_source

    n = build_catalog(data_dir, catalog)
    metadata = directory / "catalog.csv"
    products = write_catalog_metadata(data_dir, catalog, metadata, seed=seed)
    print(f"{metadata}: {products} products (title, brand, price, stock, colour, sleeve, length, ...)")
    source = model_source(model, run_dir / "checkpoint.pt")
    report = build_index(catalog, index_dir, model, source, workers=0, metadata=metadata)
    print(report.summary(), f"({n} catalog images)")
    print(f"\ndemo ready in {time.perf_counter() - started:.0f}s")

    _stage("5/5 search")
    example = sorted((catalog / "dress").iterdir())[0]
    print("try it from the command line:")
    print(
        f'  fashion-search search --index {index_dir} --image {example} --text "is red and sleeveless" -k 5'
    )
    print(
        f'  fashion-search search --index {index_dir} --text "a red dress" '
        '--where "price < 60 and in_stock == true" -k 5'
    )
    print(f"  fashion-search serve --index {index_dir}   # HTTP API on http://127.0.0.1:8000/docs")
    if not serve:
        print(f"  fashion-search ui --index {index_dir}      # the web page")
        return 0
    from fashion_search.service.ui_launch import launch_ui, wait_until_up

    url = f"http://127.0.0.1:{port}"
    proc = launch_ui(index_dir, "127.0.0.1", port)
    try:
        wait_until_up(url, timeout=60)
        print(f"\nweb UI: {url}   (Ctrl-C to stop)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 0
