"""API keys for `fashion-search serve`: read from a file and the environment, checked per request."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping

from fashion_search.errors import FashionSearchError

ENV_VAR = "FASHION_SEARCH_API_KEYS"
# Probes and the API's own description stay open; everything else (search, items, info, metrics) needs
# a key.
OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect"})


def load_api_keys(path: str | os.PathLike | None, env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Keys from `path` (one a line; blank lines and '#' comments skipped) and $FASHION_SEARCH_API_KEYS
    (comma- or space-separated). A file given but unreadable or without a key is an error: a server
    meant to be closed must not start open."""
    keys: list[str] = []
    if path is not None:
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise FashionSearchError(f"cannot read API key file {path}: {reason}") from None
        keys += [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        if not keys:
            raise FashionSearchError(f"API key file {path} holds no key (one a line)")
    keys += env.get(ENV_VAR, "").replace(",", " ").split()
    if any(len(k) < 16 for k in keys):
        raise FashionSearchError("API keys must be at least 16 characters (e.g. `openssl rand -hex 24`)")
    return tuple(dict.fromkeys(keys))


def _digest(key: bytes) -> bytes:
    # Compared as fixed-length digests: compare_digest leaks nothing but the length of its inputs.
    return hashlib.sha256(key).digest()


class ApiKeyAuth:
    """ASGI middleware: requests outside OPEN_PATHS need `Authorization: Bearer KEY` or `X-API-Key: KEY`,
    else a JSON 401. Every key is compared, in constant time, whichever matches; keys are never logged."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app = app
        self.digests = [_digest(k.encode()) for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or _is_open(scope["path"]):
            return await self.app(scope, receive, send)  # OPTIONS: CORS preflights carry no credentials
        if self.allowed(dict(scope.get("headers") or [])):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)"})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="fashion-search"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})

    def allowed(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not given:
            return False
        digest = _digest(given)
        matched = False
        for known in self.digests:
            matched |= hmac.compare_digest(digest, known)
        return matched


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS
