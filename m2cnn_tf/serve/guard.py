"""What reaches the grader's routes and what leaves them: the outermost ASGI layer of serve.py.

Every request passes here before FastAPI sees it, and every answer on its way out, whatever
produced it (a route, FastAPI's own 404 or 500, this layer's refusals), so the checks and the
headers cannot be skipped by a path the routes did not foresee:

- the request head is at most `MAX_HEAD_BYTES` (431);
- the Host is one this server answers for (400), where that is checked: always without a
  token, since a page on another site can otherwise reach a loopback server by DNS rebinding
  (its name resolving to 127.0.0.1), and with a token only when allowed hosts are given;
- a POST, PUT, PATCH or DELETE whose Origin is another site's is refused (403), so a page
  elsewhere cannot make a visitor's browser grade or try tokens;
- every answer carries the headers that keep it from being framed, sniffed or leaking its URL;
- an exception no route handled becomes a one-line JSON 500 (its full text goes to the log);
- one access-log line per request: method, path without its query string (which may hold a
  token), status, time. Logged text has its control characters escaped (`printable`), so that
  a path holding CR LF cannot forge a log line.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import json
import logging
import re
import time
import traceback
from collections.abc import Sequence
from urllib.parse import urlsplit

log = logging.getLogger("m2cnn_tf.serve")

# Ours: headers and request line together; h11's own default for an incomplete head is 16 KiB.
MAX_HEAD_BYTES = 16 * 1024
HEAD_TOO_LARGE = f"the request's headers are larger than {MAX_HEAD_BYTES // 1024} KB"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Answers nothing about the server, and a load balancer's probe may use any Host.
_OPEN_PATHS = {"/healthz"}

# C0 and C1 control characters, DEL, Unicode line breaks and bidirectional overrides (which can
# make a log line read as something else), and the backslash, so that an escape is unambiguous.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\]")


def printable(text: str) -> str:
    """`text` on one line, each control character written as an escape (\\x0d, \\u2028, \\\\)."""

    def escape(found: re.Match) -> str:
        c = found.group()
        return "\\\\" if c == "\\" else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _UNPRINTABLE.sub(escape, text)


def describe(err: BaseException) -> str:
    """An error in full for the server's log: its type and its whole text (escaped when logged)."""
    return f"{type(err).__name__}: {err}"


class EscapeControlCharacters(logging.Filter):
    """A logging filter: the whole record, message and arguments, on one escaped line (and a
    traceback, if any, folded into it), for every logger whose handler carries it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + "".join(traceback.format_exception(*record.exc_info))
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = printable(message), None
        return True


def json_bytes(status_detail: str) -> bytes:
    return json.dumps({"detail": status_detail}).encode()


def csp_with_inline_scripts(html: str) -> str:
    """The page's policy for a page that has inline scripts (Swagger UI's): each allowed by its
    hash, no other; inline styles too (Swagger UI sets them on its elements)."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    )
    return f"{PAGE_CSP}; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'"


# ---------------------------------------------------------------------------------------------
# Hosts and origins


def hostname_of(host: str) -> str:
    """The name in a Host header or URL authority, without its port, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


@dataclasses.dataclass(frozen=True)
class HostRule:
    """Which Host headers the server answers, and which other origins may POST to it.

    `names`: loopback names, the address the server is bound to, and the allowed hosts given
    ("*" for any Host). `checked`: whether Host is checked at all (no token, or hosts given).
    `origins`: the allowed hosts given, whose pages (behind a proxy, say) may post."""

    names: frozenset[str]
    checked: bool
    origins: frozenset[str] = frozenset()

    @classmethod
    def for_server(cls, bound: str, allowed: Sequence[str], token: bool) -> HostRule:
        given = {hostname_of(h) if h != "*" else "*" for h in allowed if h.strip()}
        names = frozenset({*LOOPBACK_NAMES, hostname_of(bound), *given})
        return cls(names, checked=not token or bool(given), origins=frozenset(given - {"*"}))

    def allows_host(self, host: str | None) -> bool:
        if not self.checked or "*" in self.names:
            return True
        if not host:
            return False
        name = hostname_of(host)
        if name in self.names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def allows_origin(self, origin: str, host: str | None) -> bool:
        """The page's own origin (its authority equals the Host it sent) or an allowed host's."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null": a sandboxed frame, a file, a redirect across sites
        if host and parts.netloc.lower() == host.strip().lower():
            return True
        return hostname_of(parts.netloc) in self.origins


# ---------------------------------------------------------------------------------------------
# The layer


class Guard:
    """ASGI middleware around the whole application (outside FastAPI's own error handling, so
    that its 500s get the headers too); `docs_csp` is the policy of the Swagger UI page."""

    def __init__(self, app, hosts: HostRule, docs_csp: str | None = None):
        self.app, self.hosts = app, hosts
        self.docs_csp = docs_csp

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 0
        csp = (self.docs_csp if scope["path"] == "/docs" else None) or PAGE_CSP

        async def send_secured(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [*SECURITY_HEADERS, ("content-security-policy", csp)]
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in extra]
                message = {**message, "headers": headers}
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await answer(send_secured, *refusal)
            else:
                await self.app(scope, receive, send_secured)
        except Exception as err:  # FastAPI answered its 500 and re-raised, or nothing answered
            if status == 0:
                log.error("%s %s failed: %s", scope["method"], scope["path"], describe(err))
                await answer(send_secured, 500, "the server failed (see its log)")
        finally:
            seconds = time.perf_counter() - started
            log.info("%s %s %d %.3fs", scope["method"], scope["path"], status, seconds)

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, reason) for a request refused before any route sees it, else None."""
        head = len(scope["raw_path"]) + len(scope["query_string"]) + len(scope["method"]) + 12
        head += sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > MAX_HEAD_BYTES:
            return 431, HEAD_TOO_LARGE
        headers = {k: v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host = headers.get(b"host")
        if scope["path"] not in _OPEN_PATHS and not self.hosts.allows_host(host):
            return 400, "this server does not answer for that Host (its own address only)"
        origin = headers.get(b"origin")
        if (
            scope["method"] in _UNSAFE_METHODS
            and origin is not None
            and not self.hosts.allows_origin(origin, host)
        ):
            return 403, "cross-origin request refused: send it from the grader's own page"
        return None


async def answer(send, status: int, detail: str, headers: Sequence[tuple[str, str]] = ()) -> None:
    """A complete JSON answer {"detail": ...} through an ASGI `send`."""
    body = json_bytes(detail)
    fields = [("content-type", "application/json"), ("content-length", str(len(body))), *headers]
    start = [(k.encode(), v.encode()) for k, v in fields]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})
