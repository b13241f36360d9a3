"""fashion-search: composed image retrieval for fashion (reference photo + text change -> catalog items).

from fashion_search import load_engine, create_model
engine = load_engine("INDEX")                       # the model recorded in the index comes along
hits = engine.search(image="ref.jpg", text="is red and sleeveless", text_weight=0.5, k=10)

model = create_model("ViT-B-32", pretrained="openai")   # or load_checkpoint("RUN")
q = model.compose(model.encode_images([pil_image]), model.encode_texts(["same but in navy"]))
"""

from importlib import metadata as _metadata

from fashion_search.errors import FashionSearchError, ImageDecodeError, IndexMismatchError

try:
    __version__ = _metadata.version("fashion-search")  # pyproject.toml is the one place it is written
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FashionSearchError",
    "ImageDecodeError",
    "IndexMismatchError",
    "SearchResult",
    "__version__",
    "create_model",
    "load_checkpoint",
    "load_engine",
]


def load_engine(index_dir, checkpoint=None, device=None, runtime=None, precision=None, export_dir=None):
    """Open a SearchEngine over an index directory built by `fashion-search index`; `runtime` (torch,
    onnx, openvino) and `precision` (fp32, int8) default to what the index records."""
    from fashion_search.service.engine import SearchEngine

    return SearchEngine.open(
        index_dir,
        checkpoint=checkpoint,
        device=device,
        runtime=runtime,
        precision=precision,
        export_dir=export_dir,
    )


def __getattr__(name):
    # Heavy modules (torch, open_clip) load on first use, so `import fashion_search` stays cheap.
    if name in ("create_model", "load_checkpoint"):
        from fashion_search.models import checkpoint

        return getattr(checkpoint, name)
    if name == "SearchResult":
        from fashion_search.service.snapshot import SearchResult

        return SearchResult
    raise AttributeError(f"module 'fashion_search' has no attribute {name!r}")
