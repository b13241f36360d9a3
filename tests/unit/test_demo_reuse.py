"""The demo reuses a finished run only if this version can load its checkpoint, and writes the same
product catalog CSV on every run."""

import csv
import json

import pytest

from fashion_search.catalog.metadata import read_metadata
from fashion_search.data.synthetic import generate
from fashion_search.demo import build_catalog, load_finished_run, product_title, write_catalog_metadata
from fashion_search.models.checkpoint import atomic_torch_save, model_payload


def _finished_run(directory, payload):
    run = directory / "run"
    run.mkdir(parents=True)
    (run / "history.json").write_text(json.dumps({"finished": True, "epochs": []}))
    atomic_torch_save(payload, run / "checkpoint.pt")
    (directory / "index").mkdir()
    (directory / "index" / "CURRENT").write_text("1")


def test_a_loadable_finished_run_is_reused(tmp_path, micro_model):
    _finished_run(tmp_path, model_payload(micro_model))
    model = load_finished_run(tmp_path)
    assert model is not None and model.dim == micro_model.dim
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_unfinished_run_is_not_reused(tmp_path, micro_model):
    _finished_run(tmp_path, model_payload(micro_model))
    (tmp_path / "run" / "history.json").write_text(json.dumps({"finished": False}))
    assert load_finished_run(tmp_path) is None
    assert (tmp_path / "run").exists()  # left for --resume


def test_a_run_of_an_older_architecture_is_moved_aside_not_deleted(tmp_path, micro_model, capsys):
    payload = model_payload(micro_model)
    key = "backbone.clip.positional_embedding"
    payload["state_dict"][key] = payload["state_dict"][key][:8].clone()  # an older, shorter text context
    _finished_run(tmp_path, payload)
    assert load_finished_run(tmp_path) is None
    assert not (tmp_path / "run").exists() and not (tmp_path / "index").exists()
    (old_run,) = tmp_path.glob("run.old-*")
    (old_index,) = tmp_path.glob("index.old-*")
    assert (old_run / "checkpoint.pt").exists() and (old_index / "CURRENT").exists()
    assert "training again" in capsys.readouterr().out


def test_the_demo_catalog_csv_is_a_typed_product_catalog_written_the_same_every_time(tmp_path):
    data, catalog = tmp_path / "data", tmp_path / "catalog"
    generate(data, images_per_category=50, seed=3, image_size=32, progress=False)
    n_images = build_catalog(data, catalog)
    products = write_catalog_metadata(data, catalog, tmp_path / "catalog.csv")
    first = (tmp_path / "catalog.csv").read_bytes()
    assert write_catalog_metadata(data, catalog, tmp_path / "catalog.csv") == products
    assert (tmp_path / "catalog.csv").read_bytes() == first  # reproducible

    table = read_metadata(tmp_path / "catalog.csv")
    assert sorted(table.images) == sorted(p.relative_to(catalog).as_posix() for p in catalog.glob("*/*"))
    assert len(table) == n_images and 1 < products < n_images  # several photos per product
    assert table.types == {
        "title": "string",
        "brand": "string",
        "price": "number",
        "in_stock": "bool",
        "colour": "string",
        "sleeve": "string",
        "length": "string",
        "pattern": "string",
        "neckline": "string",
    }
    attributes = json.loads((data / "attributes.json").read_text())
    with open(tmp_path / "catalog.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_product = {}
    for row in rows:
        record = attributes[row["image"].split("/")[1].removesuffix(".jpg")]
        assert row["colour"] == record["colour"] and row["sleeve"] == record["sleeve"]
        assert row["image"].split("/")[0] == record["category"]
        by_product.setdefault(row["product_id"], set()).add(
            tuple(row[c] for c in ("title", "brand", "price", "in_stock", "colour", "pattern", "length"))
        )
    # A product's photos share its title, brand, price, stock and attributes.
    assert len(by_product) == products and all(len(v) == 1 for v in by_product.values())


def test_product_titles_read_like_a_shop():
    attrs = {"colour": "red", "pattern": "stripes", "sleeve": "long", "length": "maxi", "neckline": "round"}
    assert product_title("dress", attrs) == "Red striped long-sleeve maxi dress"
    plain = {
        "colour": "navy",
        "pattern": "solid",
        "sleeve": "short",
        "length": "regular",
        "neckline": "v-neck",
    }
    assert product_title("toptee", plain) == "Navy short-sleeve top"


def test_a_dataset_of_another_seed_or_size_is_not_reused(tmp_path):
    from fashion_search.demo import check_reusable_data
    from fashion_search.errors import FashionSearchError

    data = tmp_path / "data"
    generate(data, images_per_category=60, eval_gallery=12, seed=3, image_size=32, progress=False)
    made = {"images_per_category": 60, "eval_gallery": 12, "seed": 3}
    check_reusable_data(data, made)  # the same settings: reused
    with pytest.raises(FashionSearchError, match="seed 3, not seed 4: give another --dir"):
        check_reusable_data(data, {**made, "seed": 4})
    with pytest.raises(FashionSearchError, match="eval_gallery 12, not eval_gallery 20"):
        check_reusable_data(data, {**made, "eval_gallery": 20})
    (data / "synth.json").unlink()  # a dataset from a version that did not record its settings
    with pytest.raises(FashionSearchError, match="unknown settings"):
        check_reusable_data(data, made)
    assert (data / "attributes.json").exists()  # nothing is deleted


def test_cli_synth_eval_gallery_and_a_demo_folder_of_another_seed(tmp_path, capsys):
    from fashion_search.cli import main

    data = tmp_path / "demo" / "data"
    args = ["synth", str(data), "--images-per-category", "60", "--eval-gallery", "12", "--seed", "2"]
    assert main([*args, "--quiet"]) == 0
    assert json.loads((data / "synth.json").read_text())["eval_gallery"] == 12
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "e"), "--images-per-category", "60", "--eval-gallery", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit 60 images per category" in err and len(err.splitlines()) == 1
    # The demo stops before training when its folder holds another dataset, and deletes nothing.
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--no-serve", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "give another --dir" in err and "seed 2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "demo" / "run").exists() and (data / "attributes.json").exists()


def test_a_run_of_another_recipe_is_moved_aside_and_one_of_the_same_recipe_reused(
    tmp_path, micro_model, capsys
):
    from fashion_search.config import TrainConfig
    from fashion_search.demo import recipe_changes

    cfg = TrainConfig(data="d", out="o", model="fs-micro", pretrained="none", hard_negatives=1, epochs=14)
    older = TrainConfig(data="elsewhere", out="x", model="fs-micro", pretrained="none", epochs=10, workers=0)
    assert set(recipe_changes({"config": older.to_dict()}, cfg)) == {"hard_negatives", "epochs"}
    # Paths and loader workers say where and how fast a run trained, not what it learnt.
    same = TrainConfig(
        data="elsewhere", out="x", model="fs-micro", pretrained="none", hard_negatives=1, epochs=14, workers=0
    )
    assert recipe_changes({"config": same.to_dict()}, cfg) == {}

    _finished_run(tmp_path, model_payload(micro_model))
    history = tmp_path / "run" / "history.json"
    history.write_text(json.dumps({"finished": True, "epochs": [], "config": same.to_dict()}))
    assert load_finished_run(tmp_path, cfg) is not None
    history.write_text(json.dumps({"finished": True, "epochs": [], "config": older.to_dict()}))
    assert load_finished_run(tmp_path, cfg) is None
    assert not (tmp_path / "run").exists() and not (tmp_path / "index").exists()
    (old_run,) = tmp_path.glob("run.old-*")
    assert (old_run / "checkpoint.pt").exists()
    out = capsys.readouterr().out
    assert "another recipe" in out and "epochs 10 -> 14" in out and "training again" in out


def test_an_option_newer_than_the_run_counts_as_its_default():
    """A run saved before an option existed trained as that option's default does: not another recipe."""
    from fashion_search.config import TrainConfig
    from fashion_search.demo import recipe_changes

    cfg = TrainConfig(data="d", out="o", model="fs-micro", pretrained="none")
    older = cfg.to_dict()
    del older["group_negatives"]
    assert recipe_changes({"config": older}, cfg) == {}
    assert set(recipe_changes({"config": older}, TrainConfig(**{**cfg.to_dict(), "group_negatives": 2}))) == {
        "group_negatives"
    }


def test_a_run_that_early_stopping_never_ended_is_the_run_a_larger_patience_trains():
    """Patience only ends a run early: a run that trained every epoch under a patience no larger than the
    demo's is reused; one that stopped early, or had a larger patience, is another recipe."""
    from fashion_search.config import TrainConfig
    from fashion_search.demo import recipe_changes

    cfg = TrainConfig(data="d", out="o", model="fs-micro", pretrained="none", epochs=14, patience=14)
    older = {**cfg.to_dict(), "patience": 4}
    assert recipe_changes({"config": older, "epochs": [{}] * 14}, cfg) == {}
    assert recipe_changes({"config": older, "epochs_run": 14}, cfg) == {}  # bench_demo_seeds' rows
    assert set(recipe_changes({"config": older, "epochs": [{}] * 12}, cfg)) == {"patience"}  # stopped early
    stricter = TrainConfig(**{**cfg.to_dict(), "patience": 2})
    assert set(recipe_changes({"config": older, "epochs": [{}] * 14}, stricter)) == {"patience"}
    other_epochs = {**older, "epochs": 12}
    assert set(recipe_changes({"config": other_epochs, "epochs": [{}] * 12}, cfg)) == {"patience", "epochs"}
