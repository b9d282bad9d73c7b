"""Which files a grading request carries, read within the server's limits.

The multipart body is parsed as it streams in, into memory only: an upload never touches the
disk, its name is never used as a path, and its bytes are never logged. Everything a request
carries is bounded, whether it declares its length or not (chunked): the whole body, each file,
the number of files, the form fields that are not files (ignored, but counted), the bytes after
the closing boundary (the epilogue) and the boundary itself; each part's headers are bounded by
the parser. A request that breaks a limit is refused as a whole, with a one-line reason and the
HTTP status that names the problem: 413 for something too large or too many, 400 for an unusable
boundary, 422 for a body that is not a multipart form or holds no files. Reading stops at the
refusal (serve.py's connection reads and drops the rest, within a bound). Free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

FIELD = "files"  # the multipart field every photograph is sent in
MB = 1024 * 1024
MAX_BOUNDARY = 70  # RFC 2046 §5.1.1
# Ours: form fields that are not files are ignored; a client has no reason to send many or much.
MAX_OTHER_FIELDS = 16
MAX_OTHER_BYTES = 64 * 1024  # all of them together
# Ours: RFC 2046 allows an epilogue after the closing boundary; clients send a CRLF at most.
MAX_EPILOGUE = 1024


@dataclasses.dataclass(frozen=True)
class Limits:
    """The request limits (serve.py's --max-upload-mb and --max-files)."""

    max_file_bytes: int
    max_files: int

    def max_body_bytes(self) -> int:
        """No valid request is larger: every file at the limit, plus headers and boundaries."""
        return self.max_files * (self.max_file_bytes + 16 * 1024) + MB


@dataclasses.dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave (display only) and its bytes."""

    filename: str
    data: bytes | bytearray  # as received (not copied)


class RequestRefused(Exception):
    """A request the server refuses as a whole; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary, or RequestRefused: 422 for any other kind of body, 400 for a
    boundary longer than RFC 2046 allows (the parser itself takes up to 256)."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise RequestRefused(
            422, f"expected a multipart/form-data body with one or more parts named '{FIELD}'"
        )
    if len(options[b"boundary"]) > MAX_BOUNDARY:
        raise RequestRefused(
            400, f"the multipart boundary is longer than {MAX_BOUNDARY} characters (RFC 2046)"
        )
    return options[b"boundary"]


class _Parts:
    """Callbacks of the streaming parser: collects the `files` parts, enforcing the limits."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.uploads: list[Upload] = []
        self.ended = False
        self.other_fields = self.other_bytes = 0
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        self._name = self._filename = ""
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _add(self, name: str, chunk: bytes) -> None:
        setattr(self, name, getattr(self, name) + chunk)

    def _begin(self) -> None:
        self._disposition = b""
        self._data = bytearray()

    def _header_end(self) -> None:
        if self._header_field.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field = self._header_value = b""

    def _headers_done(self) -> None:
        """The part's field name and file name, from its Content-Disposition."""
        _, options = parse_options_header(self._disposition.decode("latin-1"))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._filename = options.get(b"filename", b"").decode("utf-8", "replace")
        if self._name != FIELD:
            self.other_fields += 1
            if self.other_fields > MAX_OTHER_FIELDS:
                raise RequestRefused(
                    413, f"more than {MAX_OTHER_FIELDS} form fields that are not '{FIELD}'"
                )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name != FIELD:  # ignored, only counted
            self.other_bytes += end - start
            if self.other_bytes > MAX_OTHER_BYTES:
                kb = MAX_OTHER_BYTES // 1024
                raise RequestRefused(413, f"form fields that are not '{FIELD}' hold over {kb} KB")
            return
        self._data += data[start:end]
        limit = self.limits.max_file_bytes
        if len(self._data) > limit:
            raise RequestRefused(
                413, f"a file is larger than the server's limit of {limit / MB:g} MB"
            )

    def _part_end(self) -> None:
        if self._name != FIELD:
            return
        if len(self.uploads) >= self.limits.max_files:
            raise RequestRefused(
                413, f"more than {self.limits.max_files} files in one request (the server's limit)"
            )
        self.uploads.append(Upload(self._filename, self._data))  # no copy: it may be 30 MB
        self._data = bytearray()

    def _end(self) -> None:
        self.ended = True


async def read_uploads(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    limits: Limits,
    hold: Callable[[int], None] = lambda size: None,
) -> list[Upload]:
    """The request's files, in order, or RequestRefused with the status and a reason.

    `hold(size)` is told how large the body is, before reading from its Content-Length and as
    it arrives without one, so that the memory it takes can be accounted for (it raises to
    refuse)."""
    boundary = boundary_of(content_type)
    declared = int(content_length) if content_length and content_length.isdigit() else None
    if declared is not None and declared > limits.max_body_bytes():
        raise RequestRefused(413, "the request is larger than the server's limits allow")
    hold(declared or 0)
    parts = _Parts(limits)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
    except FormParserError:
        raise RequestRefused(400, "unusable multipart boundary") from None
    received = epilogue = 0
    async for chunk in body:
        received += len(chunk)
        if received > limits.max_body_bytes():
            raise RequestRefused(413, "the request is larger than the server's limits allow")
        if declared is None:
            hold(received)
        if parts.ended:
            epilogue += len(chunk)
            if epilogue > MAX_EPILOGUE:
                raise RequestRefused(413, "too much data after the end of the multipart body")
            continue
        try:
            parser.write(chunk)
        except FormParserError:
            raise RequestRefused(422, "malformed multipart body") from None
    parser.finalize()
    if not parts.ended:
        raise RequestRefused(422, "incomplete multipart body")
    if not parts.uploads:
        raise RequestRefused(422, f"no files: send one or more parts named '{FIELD}'")
    return parts.uploads
