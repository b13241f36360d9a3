"""Child process of `diagnose_index.py stack`: one query's forwards (batch-1 image + text, ViT-B-32 by
default) per line read on stdin, run the way a server could run them, the seconds printed per line.

Modes: plain (a loop in the main thread), executor (an asyncio loop in the main thread, forwards in its
default executor: what uvicorn + a sync FastAPI endpoint do), inline (forwards on the loop's thread),
loop_in_thread (the asyncio loop in a background thread, forwards on the main thread); and
uvicorn_sync / uvicorn_async: a minimal FastAPI app under uvicorn (asyncio loop, h11) on 127.0.0.1:PORT
(argv[3]) whose GET /forwards runs them in a sync / an async endpoint and answers {"seconds": ...}.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading

import common

from fashion_search.models.checkpoint import create_model


def main(model_name: str, mode: str) -> None:
    forwards = common.query_forwards(create_model(model_name, "none", device="cpu"))
    if mode.startswith("uvicorn_"):
        serve_minimal_app(forwards, mode, int(sys.argv[3]))
        return

    def answer(seconds: float) -> None:
        print(json.dumps(seconds), flush=True)

    forwards()
    if mode == "plain":
        print("ready", flush=True)
        for _ in sys.stdin:
            answer(forwards())
        return

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.1)  # uvicorn's main loop wakes every 0.1 s

    async def serve(run) -> None:
        loop = asyncio.get_running_loop()
        ticker = asyncio.ensure_future(tick())
        print("ready", flush=True)
        while await loop.run_in_executor(None, sys.stdin.readline):
            answer(await run(loop))
        ticker.cancel()

    if mode == "loop_in_thread":
        jobs: queue.Queue = queue.Queue()
        results: queue.Queue = queue.Queue()

        async def on_main_thread(loop):
            jobs.put(True)
            return await loop.run_in_executor(None, results.get)

        thread = threading.Thread(target=lambda: (asyncio.run(serve(on_main_thread)), jobs.put(False)))
        thread.start()
        while jobs.get():
            results.put(forwards())
        thread.join()
        return

    async def in_executor(loop):
        return await loop.run_in_executor(None, forwards)

    async def inline(loop):
        return forwards()

    asyncio.run(serve(in_executor if mode == "executor" else inline))


def serve_minimal_app(forwards, mode: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    if mode == "uvicorn_sync":

        @app.get("/forwards")
        def sync_forwards() -> dict:
            return {"seconds": forwards()}
    else:

        @app.get("/forwards")
        async def async_forwards() -> dict:
            return {"seconds": forwards()}

    forwards()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio", http="h11")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
