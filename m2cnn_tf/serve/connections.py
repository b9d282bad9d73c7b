"""How long a client may take: uvicorn's h11 connection, with deadlines for the request head and
body and a cap on what is read after an early answer.

uvicorn 0.54 closes a connection that stays idle after an answer (`timeout_keep_alive`) but has
no deadline for a request itself: a client sending its head a byte at a time, or nothing at all,
or its body a byte at a time, holds a connection for ever. `GuardedH11Protocol` adds, per
connection:

- the head: it must be complete `header_timeout` seconds after the connection opens, or after
  the first byte of the next request on a kept-alive one (408, or a silent close for a
  connection that sent nothing); it may be at most `guard.MAX_HEAD_BYTES` long (431, also when
  it arrives in pieces: h11's buffer for an incomplete head is set to that size);
- the body: `body_timeout` seconds of grace, extended by one second for every `min_body_rate`
  bytes received (Apache mod_reqtimeout's rule), so a slow network passes and a trickle does
  not (408); while the server itself has paused reading, the client is not judged;
- after an early answer (a 413, a 503), the rest of the body is read and dropped so that the
  client, still sending, receives the answer rather than a reset, but only `drain_limit` bytes.

A refusal here answers {"detail": reason} with the security headers of every other answer, logs
one line and closes the connection the way servers close after an error: the answer and a FIN
first, then whatever the client still sends is read and dropped for `LINGER_SECONDS` before the
socket closes, so that a client still sending receives the answer rather than a reset.
"""

from __future__ import annotations

import dataclasses
import http
import logging
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from m2cnn_tf.serve.guard import (
    HEAD_TOO_LARGE,
    MAX_HEAD_BYTES,
    PAGE_CSP,
    SECURITY_HEADERS,
    json_bytes,
)

log = logging.getLogger("m2cnn_tf.serve")
MB = 1024 * 1024
LINGER_SECONDS = 2.0  # ours, as nginx's lingering_close: enough for an answer to be read


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """serve.py's --header-timeout and --body-timeout, and the body's minimum rate."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # Ours: 32 KB/s (256 kbit/s) is slower than any link a clinic would upload photographs on.
    min_body_rate: float = 32 * 1024
    # Ours: as much as the largest file a client could be sending when it is refused.
    drain_limit: int = 64 * MB


def raw_answer(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for where no ASGI cycle can send."""
    body = json_bytes(detail)
    fields = [("content-type", "application/json"), ("content-length", str(len(body)))]
    fields += [("connection", "close"), *SECURITY_HEADERS, ("content-security-policy", PAGE_CSP)]
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines above (`with_limits` sets them)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[GuardedH11Protocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = None
        self._lingering = False
        self._awaiting_head = False
        self._head_bytes = self._body_bytes = self._drained = 0
        self._body_start = 0.0
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # refused: dropped until the socket closes
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if not self._awaiting_head:  # the first byte of the next request
                self._await_head()
            self._head_bytes += len(data)
        elif state is h11.SEND_BODY:
            if self.cycle is not None and self.cycle.response_complete:
                self._drained += len(data)
                if self._drained > self.limits.drain_limit:
                    log.warning("%s: closed, %d bytes past its answer", self._who(), self._drained)
                    self.transport.close()
                    return
            else:
                self._body_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is not h11.IDLE and self._awaiting_head:  # the head is complete
            self._awaiting_head = False
            self._cancel_timer()
            self._head_bytes = 0
            if state is h11.SEND_BODY:
                self._body_start, self._body_bytes, self._drained = self.loop.time(), 0, 0
                self._arm(self.limits.body_timeout, self._check_body)

    def shutdown(self) -> None:
        if self._lingering:
            self.transport.close()
        else:
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request, or its head outgrew h11's buffer (serve.py sets that
        to MAX_HEAD_BYTES): one JSON line."""
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, HEAD_TOO_LARGE)
        else:
            self._refuse(400, "malformed HTTP request")

    # -----------------------------------------------------------------------------------------

    def _await_head(self) -> None:
        self._awaiting_head, self._head_bytes = True, 0
        self._arm(self.limits.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(408, "the request's head arrived too slowly")
        else:  # nothing was sent: nothing to answer
            self.transport.close()

    def _check_body(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        now, limits = self.loop.time(), self.limits
        if self.flow.read_paused:  # the server is behind, not the client: a fresh grace
            self._body_start = now - (self._body_bytes + self._drained) / limits.min_body_rate
        received = self._body_bytes + self._drained
        deadline = self._body_start + limits.body_timeout + received / limits.min_body_rate
        if now >= deadline:
            self._refuse(408, "the request's body arrived too slowly")
        else:
            self._arm(deadline - now, self._check_body)

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `detail` unless an answer has begun on this request, then close."""
        log.warning("%s: %d %s", self._who(), status, detail)
        cycle = None if self._awaiting_head else self.cycle  # else the last request's
        if cycle is None or not cycle.response_started:
            self.transport.write(raw_answer(status, detail))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the route's own answer, if it comes, is dropped
            cycle.message_event.set()
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(LINGER_SECONDS, self.transport.close)

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _arm(self, seconds: float, callback) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
