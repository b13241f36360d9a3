"""What `fashion-search serve` accepts from strangers: one object, read by the CLI and the API alike."""

from __future__ import annotations

from dataclasses import dataclass, field

LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServerLimits:
    """Limits and operational settings of one HTTP server; the CLI's flags default to these."""

    max_upload_bytes: int = 10 * 1024 * 1024
    # Covers any phone or studio photo; Pillow's own bomb guard (~89 Mpx) is too generous for uploads
    # from strangers decoded on the one model thread.
    max_pixels: int = 40_000_000
    # Pixels alone do not bound the cost: a 40 Mpx PNG takes 160 MB as RGB and more as 16-bit grey
    # (data/images.py decode_cost). This bounds the memory and the model thread's time of one decode;
    # a JPEG counts at the reduced scale it is decoded at, so every phone photo stays within it.
    max_decode_bytes: int = 100 * 1024 * 1024
    max_text_chars: int = 10_000
    rate_limit: float = 0.0  # requests per second per client address; 0: off
    rate_burst: int | None = None  # None: 2 s worth of rate_limit
    reload_interval: float = 2.0  # seconds between checks for a rebuilt index; 0: off
    graceful_timeout: float = 10.0  # on SIGTERM/SIGINT, seconds for requests in flight to finish
    # A client that trickles its request holds a connection (and, for the body, a spooled upload):
    # the headers must arrive within header_timeout s of the connection or the previous response, the
    # body within body_timeout s of the headers; over max_connections new ones get a 503 and are closed.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 256
    # Uploads decoded or waiting for the model at once; the others wait spooled to disk, not in memory.
    max_uploads_in_memory: int = 8
    cors_origins: tuple[str, ...] = ()
    # Empty: no key needed. Never in repr: limits get printed and logged.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    log_format: str = "text"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
