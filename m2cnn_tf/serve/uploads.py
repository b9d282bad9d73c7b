"""Which files a grading request carries, read within the server's limits.

The multipart body is parsed as it streams in, into memory only: an upload never touches the
disk, its name is never used as a path, and its bytes are never logged. A request that breaks a
limit is refused as a whole, with a one-line reason and the HTTP status that names the problem:
413 for a file over the size limit or too many files, 422 for a body that is not a multipart
form or holds no files. Free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

FIELD = "files"  # the multipart field every photograph is sent in
MB = 1024 * 1024
_MAX_OTHER_FIELD = 64 * 1024  # a form field that is not a file (ignored, but bounded)
# Ours: after a refusal, the rest of the body is still read (and dropped) up to this much, so
# that the client, still sending, receives the 413 instead of a reset connection.
_DRAIN_LIMIT = 64 * MB


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
    data: bytes


class RequestRefused(Exception):
    """A request the server refuses as a whole; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary, or RequestRefused(422) for any other kind of body."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise RequestRefused(
            422, f"expected a multipart/form-data body with one or more parts named '{FIELD}'"
        )
    return options[b"boundary"]


class _Parts:
    """Callbacks of the streaming parser: collects the `files` parts, enforcing the limits."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.uploads: list[Upload] = []
        self.ended = False
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

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        limit = self.limits.max_file_bytes if self._name == FIELD else _MAX_OTHER_FIELD
        if len(self._data) > limit:
            what = "a file" if self._name == FIELD else "a form field"
            raise RequestRefused(
                413, f"{what} is larger than the server's limit of {limit / MB:g} MB"
            )

    def _part_end(self) -> None:
        if self._name != FIELD:
            return
        if len(self.uploads) >= self.limits.max_files:
            raise RequestRefused(
                413, f"more than {self.limits.max_files} files in one request (the server's limit)"
            )
        self.uploads.append(Upload(self._filename, bytes(self._data)))
        self._data = bytearray()

    def _end(self) -> None:
        self.ended = True


async def read_uploads(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    limits: Limits,
) -> list[Upload]:
    """The request's files, in order, or RequestRefused with the status and a reason."""
    boundary = boundary_of(content_type)
    if (
        content_length
        and content_length.isdigit()
        and int(content_length) > (limits.max_body_bytes())
    ):
        raise RequestRefused(413, "the request is larger than the server's limits allow")
    parts = _Parts(limits)
    parser = MultipartParser(boundary, parts.callbacks())
    refused: RequestRefused | None = None
    received = 0
    async for chunk in body:
        received += len(chunk)
        if refused is not None:  # drain, so that the client reads the answer
            if received > _DRAIN_LIMIT:
                break
            continue
        try:
            parser.write(chunk)
        except RequestRefused as err:
            refused, received = err, 0
        except FormParserError:
            refused = RequestRefused(422, "malformed multipart body")
    if refused is not None:
        raise refused
    parser.finalize()
    if not parts.ended:
        raise RequestRefused(422, "incomplete multipart body")
    if not parts.uploads:
        raise RequestRefused(422, f"no files: send one or more parts named '{FIELD}'")
    return parts.uploads
