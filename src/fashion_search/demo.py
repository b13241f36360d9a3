"""The offline end-to-end demo: synth -> train the compact model -> evaluate -> index -> web UI.

Every stage leaves its artifact under DIR and is skipped on a second run when that artifact exists,
so `make demo` is slow once and quick afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from fashion_search.atomic import atomic_write_json
from fashion_search.config import DEMO_OVERRIDES, TrainConfig

DEMO_IMAGES_PER_CATEGORY = 600
DEMO_SEED = 0


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


def demo_config(directory: Path) -> TrainConfig:
    return TrainConfig(
        data=str(directory / "data"), out=str(directory / "run"), fusion="combiner", **DEMO_OVERRIDES
    )


def load_finished_run(directory: Path):
    """The model of DIR/run if it holds a finished run this version can load, else None.

    A run whose checkpoint no longer fits the packaged model config (trained by an older version) is
    moved aside, never deleted, together with the index built from it, so the demo trains again.
    """
    from fashion_search.errors import FashionSearchError
    from fashion_search.models.checkpoint import load_checkpoint

    run_dir = directory / "run"
    history = run_dir / "history.json"
    if not (history.exists() and json.loads(history.read_text()).get("finished")):
        return None
    try:
        return load_checkpoint(run_dir)
    except FashionSearchError as exc:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for stale in (run_dir, directory / "index"):
            if stale.exists():
                stale.rename(stale.with_name(f"{stale.name}.old-{stamp}"))
        print(f"{exc}\nmoved the old run and index aside (*.old-{stamp}); training again")
        return None


def run_demo(directory: Path, serve: bool = True, port: int = 8501) -> int:
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    data_dir, run_dir = directory / "data", directory / "run"
    catalog, index_dir = directory / "catalog", directory / "index"

    _stage("1/5 synthetic dataset")
    if (data_dir / "attributes.json").exists():
        print(f"reusing {data_dir}")
    else:
        from fashion_search.data.synthetic import generate

        generate(data_dir, images_per_category=DEMO_IMAGES_PER_CATEGORY, seed=DEMO_SEED)

    _stage("2/5 training the compact model (random init, CPU)")
    from fashion_search.training.loop import train

    cfg = demo_config(directory)
    model = load_finished_run(directory)
    if model is not None:
        print(f"reusing {run_dir / 'checkpoint.pt'}")
    else:
        from fashion_search.models.checkpoint import load_checkpoint

        train(cfg, resume=(run_dir / "last.pt").exists())
        model = load_checkpoint(run_dir)

    _stage("3/5 evaluation (Fashion-IQ protocol, val split)")
    from fashion_search.evaluation.fashioniq import evaluate, format_table

    result = evaluate(model, data_dir, "val", workers=0)
    atomic_write_json(directory / "eval.json", result)
    print(format_table(result))
    print(f"written to {directory / 'eval.json'}")

    _stage("4/5 indexing the val gallery as a shop catalog")
    from fashion_search.index.build import build_index
    from fashion_search.models.checkpoint import model_source

    n = build_catalog(data_dir, catalog)
    source = model_source(model, run_dir / "checkpoint.pt")
    print(build_index(catalog, index_dir, model, source, workers=0).summary(), f"({n} catalog images)")
    print(f"\ndemo ready in {time.perf_counter() - started:.0f}s")

    _stage("5/5 search")
    example = sorted((catalog / "dress").iterdir())[0]
    print("try it from the command line:")
    print(
        f'  fashion-search search --index {index_dir} --image {example} --text "is red and sleeveless" -k 5'
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
