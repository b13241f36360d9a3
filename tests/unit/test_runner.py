"""The server's forwards run on its main thread (service/runner.py), whichever thread asks for them."""

from __future__ import annotations

import threading

import pytest

from fashion_search.service.runner import MainThreadRunner


def test_jobs_from_other_threads_run_on_the_runner_thread_and_return_or_raise():
    runner = MainThreadRunner()
    seen, results, errors = [], [], []
    stop = threading.Event()

    def client(n: int) -> None:
        results.append(runner(lambda: (seen.append(threading.current_thread().name), n * n)[1]))
        try:
            runner(lambda: 1 / 0)
        except ZeroDivisionError as exc:
            errors.append(exc)

    def clients() -> None:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()

    starter = threading.Thread(target=clients)
    # The runner must be running before clients submit, as in `serve`, where uvicorn starts after it.
    threading.Timer(0.05, starter.start).start()
    runner.run_until(stop.is_set, poll=0.01)
    starter.join()
    assert sorted(results) == [0, 1, 4, 9, 16] and len(errors) == 5
    assert set(seen) == {threading.current_thread().name}


def test_after_the_loop_ends_jobs_run_in_the_callers_thread():
    runner = MainThreadRunner()
    runner.run_until(lambda: True)
    assert runner(lambda: threading.current_thread().name) == threading.current_thread().name
    with pytest.raises(KeyError):
        runner(lambda: {}["x"])


def test_engine_forwards_go_through_its_runner(micro_model):
    from fashion_search.index.base import create_index
    from fashion_search.index.build import index_source
    from fashion_search.service.engine import SearchEngine

    index = create_index("exact", micro_model.dim)
    manifest = {"model": micro_model.identity(), "source": index_source(micro_model), "files": {}}
    engine = SearchEngine(micro_model, index, manifest)
    calls = []
    engine.run_forward = lambda fn: calls.append(1) or fn()
    engine.search(text="is red", k=1)
    assert calls == [1]
