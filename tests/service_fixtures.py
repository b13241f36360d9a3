"""Fixtures for the API and UI tests: a small two-category catalog indexed with a saved random model."""

from __future__ import annotations

import csv
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Twelve visibly different garments: a colour and a stripe period each, so even a random model tells
# them apart and a screenshot shows a varied grid.
COLOURS = [
    (214, 40, 57),
    (38, 70, 160),
    (46, 150, 90),
    (240, 200, 60),
    (30, 30, 36),
    (236, 236, 230),
    (150, 80, 180),
    (250, 140, 40),
    (90, 200, 210),
    (120, 70, 40),
    (240, 150, 180),
    (110, 120, 60),
]
CATEGORIES = ("dress", "shirt")
COLOUR_NAMES = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "purple",
    "orange",
    "teal",
    "brown",
    "pink",
    "olive",
]
BRANDS = ("Acme", "Zed", "Moda")


def garment_image(
    colour: tuple[int, int, int], period: int, size: tuple[int, int] = (96, 128)
) -> Image.Image:
    """A plain garment-like silhouette (body + sleeves) with stripes, on a light background."""
    w, h = size
    arr = np.full((h, w, 3), 245, dtype=np.uint8)
    top, bottom, left, right = h // 6, h - h // 10, w // 4, w - w // 4
    mask = np.zeros((h, w), dtype=bool)
    mask[top:bottom, left:right] = True  # body
    mask[top : h // 2, w // 12 : w - w // 12] = True  # sleeves
    mask[top : top + h // 12, w // 2 - w // 10 : w // 2 + w // 10] = False  # neckline
    stripes = ((np.arange(h) // period) % 2 == 0)[:, None] & mask
    arr[mask] = colour
    arr[stripes] = (np.array(colour) * 0.65).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_catalog(root: Path) -> Path:
    """Write 12 JPEGs as `dress/itemN.jpg` and `shirt/itemN.jpg`; returns `root`."""
    for n, colour in enumerate(COLOURS):
        path = root / CATEGORIES[n % 2] / f"item{n:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        garment_image(colour, period=3 + n).save(path, quality=92)
    return root


def write_shop_metadata(path: Path) -> dict[str, dict]:
    """A product CSV for `make_catalog`'s 12 photos: six products of two photos each (same category),
    with a title, brand, price, stock flag and shop link. Returns the rows by item id, as typed values."""
    rows = {}
    for n in range(len(COLOURS)):
        item = f"{CATEGORIES[n % 2]}/item{n:02d}.jpg"
        rows[item] = {
            "image": item,
            "product_id": f"P{n % 6}",
            "title": f"{COLOUR_NAMES[n].capitalize()} striped {CATEGORIES[n % 2]}",
            "colour": COLOUR_NAMES[n],
            "brand": BRANDS[n % 3],
            "price": 12.5 + 7.5 * n,
            "in_stock": n % 4 != 0,
            "url": f"https://shop.example/p/P{n % 6}",
        }
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(next(iter(rows.values()))))
        writer.writeheader()
        writer.writerows({**r, "in_stock": str(r["in_stock"]).lower()} for r in rows.values())
    return rows


def build_service_index(base: Path, catalog: Path | None = None, metadata: Path | None = None) -> Path:
    """Index `catalog` (default: a fresh `make_catalog`) under `base/index`.

    The random fs-micro model is saved as a checkpoint first, so every process that opens the index
    (the API, `streamlit run`, a CLI subprocess) rebuilds exactly the model that embedded the catalog.
    """
    from fashion_search.index.build import build_index
    from fashion_search.models.checkpoint import (
        atomic_torch_save,
        create_model,
        load_checkpoint,
        model_payload,
    )

    catalog = catalog if catalog is not None else make_catalog(base / "catalog")
    ckpt = base / "run" / "checkpoint.pt"
    torch.manual_seed(0)
    atomic_torch_save(model_payload(create_model("fs-micro", "none", fusion="sum", device="cpu")), ckpt)
    model = load_checkpoint(ckpt, device="cpu")
    source = {"model": "fs-micro", "pretrained": "none", "fusion": "sum", "checkpoint": str(ckpt)}
    build_index(catalog, base / "index", model, source, workers=0, progress=False, metadata=metadata)
    return base / "index"


def build_shop_index(base: Path) -> tuple[Path, dict[str, dict]]:
    """`build_service_index` with `write_shop_metadata`'s product CSV; returns the index and the rows."""
    rows = write_shop_metadata(base / "products.csv")
    return build_service_index(base, metadata=base / "products.csv"), rows


@pytest.fixture(scope="session")
def service_index(tmp_path_factory) -> Path:
    return build_service_index(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="session")
def shop_index(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    return build_shop_index(tmp_path_factory.mktemp("shop"))


@pytest.fixture(scope="session")
def empty_index(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("empty")
    (base / "catalog").mkdir()
    return build_service_index(base, base / "catalog")


@pytest.fixture(scope="session")
def service_engine(service_index):
    from fashion_search.service.engine import SearchEngine

    return SearchEngine.open(service_index, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(index_dir: Path, port: int, *extra: str) -> list[str]:
    """`fashion-search serve` as a subprocess command line (the real uvicorn server)."""
    cmd = [
        sys.executable,
        "-m",
        "fashion_search.cli",
        "serve",
        "--index",
        str(index_dir),
        "--port",
        str(port),
    ]
    return cmd + list(extra)


def open_page(monkeypatch, index: Path | str, timeout: float = 30):
    """The Streamlit page on `index`, run once under Streamlit's AppTest.

    AppTest installs the page as `sys.modules["__main__"]` and never puts the interpreter's back, so a
    later multiprocessing spawn in this process (torch's `mp.spawn`) would run the page as its
    children's main script: monkeypatch restores it when the test ends.
    """
    from streamlit.testing.v1 import AppTest

    import fashion_search.service.ui_launch as ui_launch

    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    monkeypatch.setenv("FASHION_SEARCH_INDEX", str(index))
    page = Path(ui_launch.__file__).with_name("ui.py")
    return AppTest.from_file(str(page), default_timeout=timeout).run()
