"""fashion-search: composed image retrieval for fashion (reference photo + text change -> catalog items)."""

from fashion_search.errors import FashionSearchError, ImageDecodeError, IndexMismatchError

__version__ = "0.1.0"

__all__ = ["FashionSearchError", "ImageDecodeError", "IndexMismatchError", "__version__", "load_engine"]


def load_engine(index_dir, checkpoint=None, device=None):
    """Open a search engine over an index directory built by `fashion-search index`."""
    from fashion_search.service.engine import SearchEngine

    return SearchEngine.open(index_dir, checkpoint=checkpoint, device=device)
