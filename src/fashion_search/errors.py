"""User-facing errors: every face (CLI, API, UI) turns these into a one-line message."""


class FashionSearchError(Exception):
    """A problem the user can fix: bad input, a missing file, an incompatible artifact.

    The CLI prints it on one line and exits with status 2; the API answers 4xx with it as `detail`.
    """


class ImageDecodeError(FashionSearchError):
    """Bytes or a file that are not a usable image (empty, truncated, not an image, too large)."""


class IndexMismatchError(FashionSearchError):
    """An index queried with a model other than the one that built it."""


class PretrainedUnavailableError(FashionSearchError):
    """Pretrained weights that cannot be found locally and cannot be downloaded."""
