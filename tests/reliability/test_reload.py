"""Searches during incremental index updates see one whole version, old or new; reload never takes them down."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fashion_search.errors import FashionSearchError, IndexMismatchError
from fashion_search.index.build import build_index
from fashion_search.index.store import load_index_dir, save_index_dir
from fashion_search.models.checkpoint import load_checkpoint
from fashion_search.service.api import create_app
from fashion_search.service.engine import SearchEngine
from service_fixtures import build_service_index, garment_image

READERS = 3


def add_items(catalog: Path, category: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        path = catalog / category / f"{category}{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        garment_image(((53 * i) % 256, (29 * i) % 256, 90), period=2 + i % 6, size=(40, 48)).save(path)


@pytest.fixture
def live(tmp_path):
    """An index of 12 items, the engine serving it, and a function that rebuilds it incrementally."""
    index_dir = build_service_index(tmp_path)
    catalog = tmp_path / "catalog"
    builder_model = load_checkpoint(tmp_path / "run" / "checkpoint.pt", device="cpu")
    source = load_index_dir(index_dir)[1]["source"]
    engine = SearchEngine.open(index_dir, device="cpu")

    def rebuild() -> set[str]:
        # One save per build (no time-based saves), so every version on disk is a whole build's result.
        build_index(catalog, index_dir, builder_model, source, workers=0, progress=False, save_seconds=1e9)
        return set(load_index_dir(index_dir)[0].ids())

    return engine, catalog, rebuild


def test_searches_during_updates_see_one_whole_version(live):
    engine, catalog, rebuild = live
    versions = [set(engine.ids())]
    seen: list[frozenset] = []
    errors: list[BaseException] = []
    building = threading.Event()
    building.set()

    def builder() -> None:
        try:
            for step in range(5):
                add_items(catalog, "coat", 3 * step, 3)  # a category that the first version lacks
                if step == 2:  # and a removal: a mixed view would show removed ids beside new ones
                    (catalog / "dress" / "item00.jpg").unlink()
                versions.append(rebuild())
        except BaseException as exc:  # noqa: B036  (reported by the test thread)
            errors.append(exc)
        finally:
            building.clear()

    def reader(n: int) -> None:
        try:
            deadline = time.monotonic() + 60
            while building.is_set() and time.monotonic() < deadline:
                if n == 0:
                    engine.maybe_reload(min_interval=0.0)
                seen.append(frozenset(r.id for r in engine.search(text="a coat", k=1000)))
                try:
                    coats = engine.search(text="a coat", k=1000, category="coat")
                    assert coats and all(r.id.startswith("coat/") for r in coats)
                except FashionSearchError as exc:  # the old version has no coats: a clean 4xx-type error
                    assert "unknown category" in str(exc)
        except BaseException as exc:  # noqa: B036
            errors.append(exc)

    threads = [threading.Thread(target=builder)] + [
        threading.Thread(target=reader, args=(n,)) for n in range(READERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    whole = {frozenset(v) for v in versions}
    assert seen and set(seen) <= whole  # every answer is exactly one saved version's item set
    assert len(set(seen)) >= 2  # and reloads did happen while searches ran
    assert engine.reload() in (True, False) and set(engine.ids()) == versions[-1]
    assert "dress/item00.jpg" not in engine.ids() and len(engine.ids()) == 12 - 1 + 15


def test_a_bad_new_version_is_refused_and_the_old_one_kept(live, caplog):
    engine, _, _ = live
    before, version = set(engine.ids()), engine.version
    index, manifest = load_index_dir(engine.index_dir)

    other = {**manifest, "model": {**manifest["model"], "checkpoint_sha256": "0" * 64}}
    save_index_dir(engine.index_dir, index, other)  # a rebuild with another model
    with pytest.raises(IndexMismatchError):
        engine.reload()
    with caplog.at_level(logging.WARNING, logger="fashion_search.engine"):
        assert engine.maybe_reload(min_interval=0.0) is False
        assert engine.maybe_reload(min_interval=0.0) is False  # a failed version is not retried
    assert len([r for r in caplog.records if "keeping index version" in r.message]) == 1
    assert set(engine.ids()) == before and engine.version == version
    assert engine.search(text="a dress", k=3)

    new = save_index_dir(engine.index_dir, index, manifest)  # a good version again: picked up
    (new / "manifest.json").write_text("{not json")  # ... unless it is corrupt
    with pytest.raises(FashionSearchError, match="corrupt index"):
        engine.reload()
    assert engine.version == version and engine.search(text="a dress", k=3)

    save_index_dir(engine.index_dir, index, manifest)
    assert engine.reload() is True and engine.version > version


def test_the_api_swaps_in_a_rebuilt_index_without_failing_a_request(live):
    engine, catalog, rebuild = live
    app = create_app(engine, reload_interval=0.05)
    statuses: list[int] = []
    with TestClient(app) as client:
        watcher = [t for t in threading.enumerate() if t.name == "index-reload"]
        assert len(watcher) == 1
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set() and len(statuses) < 2000:
                statuses.append(client.post("/search", data={"text": "a coat", "k": "50"}).status_code)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            add_items(catalog, "coat", 0, 4)
            rebuild()
            deadline = time.monotonic() + 20
            while client.get("/health").json()["items"] != 16:
                assert time.monotonic() < deadline, "the rebuilt index was never picked up"
                time.sleep(0.05)
            time.sleep(0.2)  # a few more searches on the new version
        finally:
            stop.set()
            thread.join(timeout=30)
        assert client.get("/info").json()["version"] == engine.version
        r = client.post("/search", data={"text": "a coat", "k": "50", "category": "coat"})
        assert r.status_code == 200 and len(r.json()["results"]) == 4
    assert statuses and set(statuses) == {200}
    assert not watcher[0].is_alive()  # the lifespan stopped the watcher on shutdown
