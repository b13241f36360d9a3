"""What `fashion-search serve` accepts from strangers: one object, read by the CLI and the API alike."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerLimits:
    """Limits and operational settings of one HTTP server; the CLI's flags default to these."""

    max_upload_bytes: int = 10 * 1024 * 1024
    # Covers any phone or studio photo; Pillow's own bomb guard (~89 Mpx) is too generous for uploads
    # from strangers decoded on the one model thread.
    max_pixels: int = 40_000_000
    max_text_chars: int = 10_000
    rate_limit: float = 0.0  # requests per second per client address; 0: off
    rate_burst: int | None = None  # None: 2 s worth of rate_limit
    reload_interval: float = 2.0  # seconds between checks for a rebuilt index; 0: off
    graceful_timeout: float = 10.0  # on SIGTERM/SIGINT, seconds for requests in flight to finish
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))


LIMIT_FIELDS = tuple(f.name for f in fields(ServerLimits))
