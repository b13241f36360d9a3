"""Catalog embedding on Ray Data (`fashion-search index ... --ray ADDRESS`).

The files to embed become a dataset: CPU tasks decode them to the model's uint8 pixels (the same
data/loading.py reader as in one process), actors that each hold one model embed them, and the vectors
stream back to the driver, which writes the index as build_index always does (FAISS files, and for
Milvus the upserts too: both from the driver). Every node reads the catalog by the driver's paths,
so a multi-node cluster needs the catalog on a shared filesystem at the same path.

`ray` is imported here only, and only when a function here runs: the base install works without it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

import fashion_search
from fashion_search.data.loading import ImagePathsDataset
from fashion_search.errors import FashionSearchError
from fashion_search.index.embed import CatalogFile, EmbeddedBatch
from fashion_search.models.checkpoint import model_from_payload, model_payload
from fashion_search.models.retrieval import RetrievalModel

INSTALL_HINT = "pip install 'fashion-search[ray]'"
PROBE_SECONDS = 5.0  # a ray:// address that does not answer a TCP connect within this is unreachable


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without the [data] extra lacks it)
    except ImportError:
        raise FashionSearchError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str, num_cpus: int | None = None, progress: bool = True) -> Iterator:
    """Ray, connected for the `with` block. `local` starts Ray on this machine (`num_cpus` of its cores,
    default all), `auto` joins the cluster $RAY_ADDRESS names (or one `ray start` runs on this machine),
    `ray://HOST:PORT` a remote cluster through Ray Client. A Ray this process already initialised is
    used as it is and left running."""
    ray = import_ray()
    if address == "local":
        target, kwargs = None, {"num_cpus": num_cpus, "include_dashboard": False}
    elif address == "auto":
        target, kwargs = "auto", {}
    elif address.startswith("ray://"):
        _probe(address)
        target, kwargs = address, {}
    else:
        raise FashionSearchError(f"--ray takes local, auto or ray://HOST:PORT, got {address!r}")
    _quiet_unless(progress)
    if ray.is_initialized():
        yield ray
        return
    # This process's fashion_search travels with the job, so the tasks and actors run the driver's code
    # (not whatever version a node has installed); the nodes need its dependencies (torch, open_clip).
    runtime_env = {"py_modules": [str(Path(fashion_search.__file__).parent)]}
    try:
        ray.init(address=target, logging_level=logging.WARNING, runtime_env=runtime_env, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...: all mean "not there"
        raise FashionSearchError(f"cannot connect to Ray at {address}: {_first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _quiet_unless(progress: bool) -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not progress:  # its "Starting execution of Dataset ..." lines too
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _probe(address: str) -> None:
    """Fail in seconds on a ray:// address nobody listens on: Ray Client itself retries for ~30 s."""
    parts = urlsplit(address)
    try:
        host, port = parts.hostname, parts.port or 10001
    except ValueError:
        raise FashionSearchError(f"--ray {address}: not a ray://HOST:PORT address") from None
    if not host:
        raise FashionSearchError(f"--ray {address}: not a ray://HOST:PORT address")
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise FashionSearchError(
            f"cannot connect to Ray at {address}: {exc.strerror or exc} (is `ray start --head` running there?)"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def decode_batch(batch: dict, pipeline, image_size: int) -> dict:
    """A Ray task: paths -> (n, 3, S, S) uint8 pixels and, per file, "" or why it could not be decoded
    (a failed file's pixels are zeros: a column holds one row per input)."""
    reader = ImagePathsDataset(list(batch["path"]), pipeline, image_size, device_jpegs=False)
    pixels, errors = [], []
    for i in range(len(reader)):
        _, px, _, error = reader[i]
        pixels.append(None if px is None else px.numpy())
        errors.append(error or "")
    shape = next((p.shape for p in pixels if p is not None), (3, image_size, image_size))
    stacked = np.stack([np.zeros(shape, np.uint8) if p is None else p for p in pixels])
    return {"id": batch["id"], "pixels": stacked, "error": np.array(errors, dtype=object)}


class EmbedActor:
    """A Ray actor holding one model, rebuilt from its state in the object store."""

    def __init__(self, state: list):
        import ray

        # The model's weights and config (a checkpoint's payload, models/checkpoint.py) travel through
        # the object store, put there once by the driver: no actor downloads weights, a model loaded
        # from an OpenCLIP tag needs no cache on the nodes, and no shared filesystem is assumed (a
        # checkpoint path would need one). The cost: a model's size (~600 MB for ViT-B-32) in each
        # node's object store, plus each actor's own deserialised copy, which it needs anyway.
        payload = ray.get(state[0])
        # The GPU Ray assigned (it sets CUDA_VISIBLE_DEVICES to it), else the CPU even on a GPU machine.
        self.model = model_from_payload(payload, "cuda" if ray.get_gpu_ids() else "cpu")
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.model.dim), np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            vectors[ok] = self.model.encode_pixels(pixels).numpy()
        return {"id": batch["id"], "vector": vectors, "error": batch["error"]}


class RayEmbedder:
    """index/embed.py's Embedder on Ray Data: decode in CPU tasks, embed in `actors` model actors.

    Actors: one per GPU of the cluster (num_gpus=1 each) when it has GPUs, else half its CPUs (one CPU
    each, leaving the other half to decoding). Failures are Ray Data's to retry, with its defaults: a
    decode task whose worker or node died runs again (max_retries=-1), a dead actor is restarted and its
    batch retried (max_restarts=-1, max_task_retries=-1); an exception raised by our code is not retried
    (undecodable files never raise: they come back as skipped). A batch delivered twice is written once:
    ids already received in this run are dropped before they reach the index.
    """

    def __init__(self, model: RetrievalModel, batch_size: int = 32, actors: int | None = None):
        self.model, self.batch_size, self.actors = model, batch_size, actors

    def plan(self) -> dict:
        """How many actors, and what each reserves, on the connected cluster."""
        ray = import_ray()
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        actors = self.actors or (gpus or max(1, cpus // 2))
        return {"actors": actors, "num_gpus": 1 if gpus else 0, "num_cpus": 1}

    def __call__(self, files: list[CatalogFile], marks: dict[str, float]) -> Iterator[EmbeddedBatch]:
        if not files:
            return (batch for batch in ())  # a generator, so build_index may close() it
        ray = import_ray()
        payload = {**model_payload(self.model), "checkpoint_sha256": self.model.checkpoint_sha256}
        job = {
            "rows": [{"id": f.id, "path": f.path} for f in files],
            "state": [ray.put(payload)],  # in a list: whoever receives it resolves it, not Ray
            "pipeline": self.model.pixel_pipeline,
            "image_size": self.model.backbone.image_size,
            "batch_size": self.batch_size,
            "plan": self.plan(),
        }
        marks.setdefault("decode_setup", time.perf_counter())
        if _through_client(ray):
            return _received(_from_remote(ray, job), job["state"], marks)
        return _received(_output(job), job["state"], marks)


def _dataset(job: dict):
    import ray

    plan = job["plan"]
    ds = ray.data.from_items(job["rows"])
    ds = ds.map_batches(
        decode_batch,
        batch_size=job["batch_size"],
        fn_kwargs={"pipeline": job["pipeline"], "image_size": job["image_size"]},
        num_cpus=1,
        # Ray's default (a worker runs any number of tasks), said explicitly because Ray Data fuses
        # consecutive stages whose remote arguments are equal: on a CPU cluster it would decode
        # inside the model actors, one batch after another, leaving the other cores idle.
        max_calls=0,
    )
    return ds.map_batches(
        EmbedActor,
        batch_size=job["batch_size"],
        fn_constructor_kwargs={"state": job["state"]},
        compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"],
    )


def _output(job: dict):
    return _dataset(job).iter_batches(batch_size=None, batch_format="numpy")


def _through_client(ray) -> bool:
    """Connected with ray://: Ray Data cannot run its pipeline from a Ray Client process."""
    from ray.util.client import ray as client

    return client.is_connected()


class RemotePipeline:
    """For Ray Client (`--ray ray://...`): Ray Data does not run in a client process (its executor needs
    a cluster worker: ray-project/ray#42739), so this actor, on the cluster, runs the pipeline and hands
    its output over one batch per call. The vectors then make one hop more than with `auto`."""

    def __init__(self, job: dict, progress: bool):
        _quiet_unless(progress)  # this process's Ray Data settings are its own
        self.batches = iter(_output(job))

    def next(self) -> dict | None:
        return next(self.batches, None)


def _from_remote(ray, job: dict) -> Iterator[dict]:
    progress = ray.data.DataContext.get_current().enable_progress_bars
    pipeline = ray.remote(num_cpus=0)(RemotePipeline).remote(job, progress)
    try:
        while (batch := ray.get(pipeline.next.remote())) is not None:
            yield batch
    finally:
        ray.kill(pipeline)  # stops its pipeline with it, on an error too


def _received(batches, state, marks: dict[str, float]) -> Iterator[EmbeddedBatch]:
    """The pipeline's output as EmbeddedBatch, each id once. `state` is held here so that the model
    stays in the object store while actors may still (re)start."""
    seen: set[str] = set()
    iterator = iter(batches)
    try:
        for batch in iterator:
            marks.setdefault("first_embedded", time.perf_counter())
            ids, errors, vectors = [str(i) for i in batch["id"]], batch["error"], batch["vector"]
            rows = [j for j, i in enumerate(ids) if i not in seen and errors[j] == ""]
            skipped = [(i, str(errors[j])) for j, i in enumerate(ids) if i not in seen and errors[j] != ""]
            seen.update(ids)
            yield EmbeddedBatch(
                [ids[j] for j in rows],
                np.ascontiguousarray(vectors[rows], dtype=np.float32) if rows else None,
                skipped,
            )
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops the streaming execution now, on an error too
