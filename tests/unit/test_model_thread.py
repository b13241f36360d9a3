"""Every tensor operation of a SearchEngine runs on its one model thread, whatever thread calls
(a second OpenMP pool makes CPU forwards ~25% slower: service/model_thread.py)."""

from __future__ import annotations

import functools
import io
import multiprocessing
import sys
import threading
import time

import pytest

from fashion_search.service import engine as engine_module
from fashion_search.service.engine import SearchEngine
from fashion_search.service.model_thread import ModelThread
from service_fixtures import COLOURS, build_service_index, garment_image


@pytest.fixture(scope="module")
def service_index(tmp_path_factory):
    return build_service_index(tmp_path_factory.mktemp("model-thread"))


def _recording(fn, seen: list[tuple[str, int]], name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        seen.append((name, threading.get_ident()))
        return fn(*args, **kwargs)

    return wrapper


def _jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    garment_image(COLOURS[n % len(COLOURS)], period=2 + n, size=(160, 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_the_engine_builds_its_model_and_runs_every_tensor_operation_on_one_thread(
    service_index, monkeypatch
):
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(
        engine_module, "resolve_model", _recording(engine_module.resolve_model, seen, "build")
    )
    engine = SearchEngine.open(service_index, device="cpu")
    try:
        model = engine.model
        for name in ("encode_pixels", "encode_texts", "compose"):
            setattr(model, name, _recording(getattr(model, name), seen, name))
        engine.query_pixels = _recording(engine.query_pixels, seen, "decode")
        engine.index.search_hits = _recording(engine.index.search_hits, seen, "search")

        callers: list[int] = []
        errors: list[BaseException] = []

        def query(n: int) -> None:
            callers.append(threading.get_ident())
            try:
                engine.search(image=_jpeg(n), text=f"is darker {n}", text_weight=0.3, k=3)
                engine.search(image=_jpeg(n), text=f"is darker {n}", text_weight=0.7, k=3)  # cached: compose
                engine.search(text=f"has stripes {n}", k=3)
            except BaseException as exc:  # noqa: BLE001 -- reported below, on the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=query, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        query(3)  # and from the test's own thread
        for t in threads:
            t.join()
        assert not errors, errors
        assert {name for name, _ in seen} == {
            "build",
            "encode_pixels",
            "encode_texts",
            "compose",
            "decode",
            "search",
        }
        assert {ident for _, ident in seen} == {engine.model_thread.ident}
        assert engine.model_thread.ident not in callers
    finally:
        engine.close()


def test_time_queued_behind_other_work_on_the_model_thread_is_the_wait_stage(service_index):
    engine = SearchEngine.open(service_index, device="cpu")
    try:
        engine.search(text="warm up", k=2)
        started = threading.Event()

        def busy() -> None:
            started.set()
            time.sleep(0.4)  # another request's forward, say

        other = threading.Thread(target=engine.model_thread.run, args=(busy,))
        other.start()
        started.wait(5)
        timings: dict[str, float] = {}
        engine.search(image=_jpeg(5), text="is longer", k=2, timings=timings)
        other.join()
        assert {"wait", "decode", "image", "text", "search"} <= set(timings)
        assert timings["wait"] >= 300  # ms: the query queued behind `busy`
        assert timings["image"] < timings["wait"]  # and the forward itself is timed apart from it

        cached: dict[str, float] = {}  # both embeddings cached: fusion and search still queue
        other = threading.Thread(target=engine.model_thread.run, args=(busy,))
        started.clear()
        other.start()
        started.wait(5)
        engine.search(image=_jpeg(5), text="is longer", text_weight=0.8, k=2, timings=cached)
        other.join()
        assert cached["wait"] >= 300 and "image" not in cached
    finally:
        engine.close()


def test_model_thread_returns_results_raises_errors_and_runs_nested_calls_inline():
    worker = ModelThread()
    try:
        assert worker.run(threading.get_ident) == worker.ident != threading.get_ident()
        assert worker.run(lambda: worker.run(threading.get_ident)) == worker.ident  # no deadlock
        with pytest.raises(ZeroDivisionError):
            worker.run(lambda: 1 / 0)
        assert worker.run(sum, [1, 2, 3]) == 6  # the thread survives an error
    finally:
        worker.close()
    with pytest.raises(RuntimeError):
        worker.run(int)


def test_submit_returns_a_future_and_runs_inline_on_the_thread_itself():
    worker = ModelThread()
    try:
        assert worker.submit(threading.get_ident).result(timeout=5) == worker.ident
        assert worker.submit(lambda: 1 / 0).exception(timeout=5).__class__ is ZeroDivisionError
        # From the thread itself: done at once (queueing behind itself would never finish).
        inner = worker.run(lambda: worker.submit(threading.get_ident))
        assert inner.done() and inner.result() == worker.ident
        failed = worker.run(lambda: worker.submit(lambda: 1 / 0))
        assert failed.done() and isinstance(failed.exception(), ZeroDivisionError)
    finally:
        worker.close()


def test_search_future_is_search_as_one_job_on_the_model_thread(service_index):
    engine = SearchEngine.open(service_index, device="cpu")
    try:
        image = _jpeg(7)
        expected = engine.search(image=image, text="is wider", text_weight=0.4, k=4)
        engine._image_cache.data.clear()  # so that the future's job decodes and embeds again
        engine._text_cache.data.clear()
        jobs: list[int] = []
        real_submit = engine.model_thread._pool.submit

        def counting_submit(*args, **kwargs):
            jobs.append(1)
            return real_submit(*args, **kwargs)

        engine.model_thread._pool.submit = counting_submit
        timings: dict[str, float] = {}
        future = engine.search_future(image=image, text="is wider", text_weight=0.4, k=4, timings=timings)
        assert future.result(timeout=30) == expected
        assert len(jobs) == 1 and {"wait", "decode", "image", "text", "search"} <= set(timings)
        with pytest.raises(engine_module.FashionSearchError, match="k must be"):
            engine.search_future(text="x", k=0).result(timeout=30)  # errors come out of the future
        with pytest.raises(engine_module.FashionSearchError, match="pixels"):  # the caller's limit applies
            engine.search_future(image=_jpeg(8), max_pixels=100).result(timeout=30)
    finally:
        engine.close()


def test_an_engine_whose_model_cannot_be_built_leaves_no_thread_behind(service_index, monkeypatch):
    def broken(*args, **kwargs):
        raise engine_module.FashionSearchError("no such model")

    monkeypatch.setattr(engine_module, "resolve_model", broken)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(engine_module.FashionSearchError, match="no such model"):
        SearchEngine.open(service_index, device="cpu")
    for t in threading.enumerate():
        if t.ident not in before:
            t.join(timeout=5)
            assert not t.is_alive(), f"{t.name} still running"


def _run_in_forked_child(worker: ModelThread, answer) -> None:
    # Eight threads make the child's first calls at once, as a pre-forked server's request threads do.
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race shows up if there is one
    idents: list[int] = []
    barrier = threading.Barrier(8)

    def first_call() -> None:
        barrier.wait()
        idents.append(worker.run(threading.get_ident))

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answer.put((len(idents), len(set(idents)), worker.run(lambda: 6 * 7)))


def test_a_forked_child_gets_one_model_thread_of_its_own_even_when_threads_race_for_it():
    worker = ModelThread()
    try:
        worker.run(int)
        context = multiprocessing.get_context("fork")
        for _ in range(5):
            answer = context.Queue()
            child = context.Process(target=_run_in_forked_child, args=(worker, answer))
            child.start()
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                pytest.fail("run() in a forked child hung: a call went to the inherited pool")
            assert child.exitcode == 0
            assert answer.get(timeout=5) == (8, 1, 42)  # 8 answers, all from one new model thread
        assert worker.run(lambda: 1) == 1  # the parent's thread is untouched
    finally:
        worker.close()
