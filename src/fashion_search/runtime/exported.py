"""Running exported graphs (ONNX Runtime or OpenVINO) behind RetrievalModel's own encode/compose methods.

`ExportedModel` wraps the PyTorch model it was exported from: preprocessing (the transform, the pixel
pipeline, the tokenizer), the identity and the fusion's weight slider stay there, shared with the torch
path; only the forwards run in the exported graphs. The engine, the index builder and the evaluation
take it in place of a RetrievalModel and never branch on the runtime.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fashion_search.errors import FashionSearchError
from fashion_search.models.features import QueryFeatures
from fashion_search.models.fusion import check_text_weight
from fashion_search.models.retrieval import RetrievalModel
from fashion_search.runtime.export import read_export

# "latency": one query at a time (the engine); "throughput": batches (indexing, evaluation). Both
# runtimes are configured alike for now (see _OnnxGraph, _OpenVinoGraph); the callers say which they are.
MODES = ("latency", "throughput")


def default_threads() -> int:
    """The threads PyTorch would use (its own setting, physical cores by default): both runtimes get
    the same count, so a comparison measures kernels, not thread counts."""
    return max(1, torch.get_num_threads())


class _OnnxGraph:
    def __init__(self, path: Path, threads: int, mode: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One operator at a time with every core on it: a transformer's ops are a chain, so parallel
        # operators (inter-op) only add threads that contend for the same cores.
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No spinning: idle workers that spin burn the cores that the decode worker (indexing) and the
        # HTTP threads (serving) need, and on a machine shared with other processes they stall the run.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.inputs, arrays)))[0]


_OPEN_GRAPHS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _release_openvino() -> None:
    # An OpenVINO compiled model still alive when the interpreter tears down (an engine's model thread
    # holds one until exit) crashes in its destructor once the plugin is gone: release them first.
    for graph in list(_OPEN_GRAPHS):
        graph.request = graph.compiled = None


_CORE: list = []


def _openvino_core(ov):
    # One Core for the process, never freed: a Core collected before the compiled models it made (a
    # garbage-collection cycle frees in no set order) crashes their destructors.
    if not _CORE:
        _CORE.append(ov.Core())
    return _CORE[0]


class _OpenVinoGraph:
    def __init__(self, path: Path, threads: int, mode: str):
        import openvino as ov

        _OPEN_GRAPHS.add(self)
        core = _openvino_core(ov)
        # LATENCY (one stream with every thread) for batches too: THROUGHPUT splits the threads into
        # streams, and the one synchronous request here would then run on a single stream's thread.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer(list(arrays))[0])


_BACKENDS = {"onnx": _OnnxGraph, "openvino": _OpenVinoGraph}


class ExportedModel:
    """A RetrievalModel whose forwards run in an exported runtime; every other attribute is the torch
    model's own."""

    def __init__(
        self,
        model: RetrievalModel,
        export_dir: str | os.PathLike,
        threads: int | None = None,
        mode: str = "latency",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        d = Path(export_dir)
        manifest = read_export(d, model)
        self.torch_model = model
        self.export_dir = d
        self.runtime = manifest["export_format"]
        self.precision = manifest["precision"]
        self._threads, self._mode = threads or default_threads(), mode
        self._files = {name: d / files[0] for name, files in manifest["graphs"].items()}
        self._graphs: dict = {}
        self._has_fusion = "fusion" in self._files
        # A server loads every graph now, so that a damaged file stops it at start-up, not at the first
        # query; a batch job (index, eval) loads a graph when first used: indexing never reads text, and
        # the text tower's session costs seconds of start-up.
        if mode == "latency":
            for name in self._files:
                self._graph(name)

    def _graph(self, name: str):
        graph = self._graphs.get(name)
        if graph is None:
            path = self._files[name]
            try:
                graph = _BACKENDS[self.runtime](path, self._threads, self._mode)
            except Exception as exc:  # each runtime has its own parse errors; all mean a damaged file
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise FashionSearchError(
                    f"cannot load {self.runtime} graph {path} ({first}); export it again"
                ) from None
            self._graphs[name] = graph
        return graph

    def __getattr__(self, name):  # only called for attributes not found here: the torch model's
        if name == "torch_model":  # not set yet (a half-built or unpickled object): no recursion
            raise AttributeError(name)
        return getattr(self.torch_model, name)

    def __repr__(self) -> str:
        return f"ExportedModel({self.runtime} {self.precision}, {self.export_dir})"

    def identity(self) -> dict:
        return {**self.torch_model.identity(), "runtime": self.runtime, "precision": self.precision}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def eval(self) -> ExportedModel:
        return self

    # -- RetrievalModel's encode/compose methods, forwards in the exported graphs --------------------
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = self.torch_model.model_input(pixels).float().contiguous().numpy()
        return torch.from_numpy(self._graph("image")(x).astype(np.float32, copy=False))

    # The same batching over this class's encode_pixels (attribute lookup would reach the torch model's).
    encode_images = RetrievalModel.encode_images

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.backbone.tokenize(list(texts[i : i + batch_size])).numpy().astype(np.int64)
            out.append(torch.from_numpy(self._graph("text")(tokens).astype(np.float32, copy=False)))
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def encode_query_pixels(self, pixels: torch.Tensor) -> QueryFeatures:
        return QueryFeatures(self.encode_pixels(pixels))

    def encode_query_texts(self, texts: Sequence[str], batch_size: int = 64) -> QueryFeatures:
        return QueryFeatures(self.encode_texts(texts, batch_size))

    def _run_fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = self._graph("fusion")(image.float().contiguous().numpy(), text.float().contiguous().numpy())
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def compose(
        self,
        image_emb: torch.Tensor | QueryFeatures,
        text_emb: torch.Tensor | QueryFeatures,
        text_weight: float | None = None,
    ) -> torch.Tensor:
        """As RetrievalModel.compose: the fusion's own slider path, its learned part in the graph."""
        w = check_text_weight(text_weight)
        image = QueryFeatures.of(image_emb).normalised().pooled.float().cpu()
        text = QueryFeatures.of(text_emb).normalised().pooled.float().cpu()
        if w in (0.0, 1.0):
            return image if w == 0.0 else text
        with torch.inference_mode():
            return self.fusion.weighted(image, text, w, fuse=self._run_fuse if self._has_fusion else None)
