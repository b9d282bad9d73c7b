"""Who may use the grader when it has a token: where a request's token comes from, whether it
is the right one, and how many wrong ones a client may try. Free of TensorFlow.

A token arrives as `Authorization: Bearer TOKEN` (API clients), as the cookie the page sets
(HttpOnly, SameSite=Strict), or once through the token form (posted, so it stays out of the
address bar and the history) or `/?token=TOKEN`. It is compared in constant time. Wrong tokens
are limited per client address (`FailureLimiter`): past a burst, every attempt from that address
gets 429 with Retry-After, unchecked.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from urllib.parse import parse_qs

from fastapi import HTTPException, Request, Response

from m2cnn_tf.serve.uploads import RequestRefused

COOKIE = "m2cnn_token"
NEEDS_TOKEN = "this server needs its token: send 'Authorization: Bearer TOKEN'"
TOO_MANY_WRONG = "too many wrong tokens from this address: wait, then try again"
_MAX_FORM = 4096  # bytes: the token form holds one field


def presented(request: Request) -> str:
    """The token the request carries: its bearer header, else its cookie ("" for none)."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.cookies.get(COOKIE, "")


def refusal(request: Request, given: str) -> tuple[int, dict[str, str]] | None:
    """None when `given` is this server's token (or it needs none); else the status and headers
    of the refusal: 401 for no token or a wrong one, 429 while this client has tried too many
    wrong ones (checked before the token is, so that a guesser learns nothing meanwhile)."""
    token = request.app.state.settings.token
    if not token:
        return None
    if not given:
        return 401, {"WWW-Authenticate": "Bearer"}
    limiter: FailureLimiter = request.app.state.limiter
    client = request.client.host if request.client else None
    wait = limiter.wait(client)
    if wait:
        return 429, {"Retry-After": str(wait)}
    if hmac.compare_digest(given.encode(), token.encode()):
        return None
    limiter.failed(client)
    return 401, {"WWW-Authenticate": "Bearer"}


def require_token(request: Request) -> None:
    """The API's dependency: HTTPException 401 or 429 unless the request has the token."""
    refused = refusal(request, presented(request))
    if refused is not None:
        status, headers = refused
        raise HTTPException(status, TOO_MANY_WRONG if status == 429 else NEEDS_TOKEN, headers)


def set_cookie(response: Response, token: str, https: bool) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=https)


async def form_token(request: Request) -> str:
    """The token of the token form's body (at most 4 KB, url-encoded); "" for none."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise RequestRefused(413, f"the token form is larger than {_MAX_FORM} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=4)
    except (UnicodeDecodeError, ValueError):
        raise RequestRefused(400, "malformed token form") from None
    return (fields.get("token") or [""])[0]


@dataclasses.dataclass
class _Bucket:
    tokens: float
    stamp: float


class FailureLimiter:
    """Wrong tokens per client address (an IPv6 client by its /64): a burst of `burst`, then one
    more every `seconds` (a token bucket). While a client's bucket is empty, every attempt it
    makes is refused unchecked (429), the right token too: a limiter that still answered the
    right one would let a guesser go on at full speed.

    Ours: 10 at once, then one a second, is more than a person mistyping and about 86,000
    guesses a day, nothing against a random token of 16 characters or more."""

    def __init__(self, burst: int = 10, seconds: float = 1.0, max_clients: int = 10_000):
        self.burst, self.seconds, self.max_clients = burst, seconds, max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def wait(self, client: str | None) -> int:
        """Seconds before this client may try again (0: now)."""
        bucket = self._bucket(client)
        return 0 if bucket.tokens >= 1 else math.ceil((1 - bucket.tokens) * self.seconds)

    def failed(self, client: str | None) -> None:
        self._bucket(client).tokens -= 1

    def _bucket(self, client: str | None) -> _Bucket:
        key, now = _client_key(client), time.monotonic()
        bucket = self._buckets.pop(key, None) or _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) / self.seconds)
        bucket.stamp = now
        self._buckets[key] = bucket  # most recent last: the oldest go first when full
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return bucket


def _client_key(client: str | None) -> str:
    try:
        address = ipaddress.ip_address(client or "")
    except ValueError:
        return client or "?"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
