"""uvicorn's HTTP/1.1 protocol with deadlines for slow clients, a connection cap and JSON errors.

uvicorn (h11) waits for a request's headers and body as long as the client likes: a client sending one
header line every few seconds, or a body at 1 byte/s, holds its connection and its buffers forever,
and enough of them exhaust the process's file descriptors and memory. Here every connection has one
deadline at a time: the headers must be complete within `header_timeout` seconds of the connection
(or of the previous response, on a kept-alive connection), and the body within `body_timeout` seconds
of its headers. A request that misses its deadline gets a JSON 408 and the connection is closed;
connections over `max_connections` get a JSON 503 and are closed at once. uvicorn's own plain-text 400
for a request it cannot parse becomes JSON as well, like every other error of the API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fashion_search.service.limits import ServerLimits


def raw_json_response(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for when no request cycle runs."""
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus deadlines and a connection cap; configure through guarded_protocol()."""

    header_timeout: float = ServerLimits.header_timeout
    body_timeout: float = ServerLimits.body_timeout
    max_connections: int = ServerLimits.max_connections
    on_refused: Callable[[str], None] | None = None  # called with a reason, for the metrics

    _deadline: asyncio.TimerHandle | None = None
    _phase: str | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(503, "Service Unavailable", "too many connections; retry later", "connections")
            return
        self._follow()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._cancel()
        self._refused("malformed")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        body = json.dumps({"detail": "malformed HTTP request"}).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _follow(self) -> None:
        """Arm the deadline of the phase the connection is in now: waiting for headers, or a body."""
        if self.transport is None or self.transport.is_closing():
            return self._cancel()
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self._phase:
            return
        self._cancel()
        self._phase = phase
        if phase is not None:
            delay = self.header_timeout if phase == "headers" else self.body_timeout
            self._deadline = self.loop.call_later(delay, self._expired, phase)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        timeout = self.header_timeout if phase == "headers" else self.body_timeout
        if phase == "headers" and not self.conn.trailing_data[0] and self.cycle is not None:
            # Idle between requests on a kept-alive connection: close quietly, nothing was asked.
            self._refused(None)
            self.transport.close()
            return
        detail = f"request {phase} not received within {timeout:g} s"
        self._refuse(408, "Request Timeout", detail, f"slow_{phase}")

    def _refuse(self, status: int, reason: str, detail: str, why: str) -> None:
        self._cancel()
        self._refused(why)
        if self.cycle is not None:
            self.cycle.keep_alive = False
        if self.cycle is None or not self.cycle.response_started:
            # Written raw, as h11 has no request to answer; the connection closes right after, so the
            # app's own answer (if it is still reading the body) never reaches the wire.
            self.transport.write(raw_json_response(status, reason, detail))
        self.transport.close()

    def _refused(self, why: str | None) -> None:
        if why is not None and self.on_refused is not None:
            self.on_refused(why)


def guarded_protocol(
    limits: ServerLimits, on_refused: Callable[[str], None] | None = None
) -> type[GuardedH11Protocol]:
    """A protocol class for uvicorn's `http=` with these limits (uvicorn instantiates it per connection)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": limits.header_timeout,
            "body_timeout": limits.body_timeout,
            "max_connections": limits.max_connections,
            "on_refused": staticmethod(on_refused) if on_refused is not None else None,
        },
    )
