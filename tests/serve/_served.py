"""Constants and helpers shared by the serve tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path

import httpx

from m2cnn_tf.preprocessing import PreprocessParams

SIZE = 96
TOKEN = "test-token-7f3a"
MAX_UPLOAD_MB = 1
MAX_FILES = 8
MAX_BATCH = 2
# Ours, for speed: Eq. (1) at 256 px instead of 720 (any value works; the manifest says which).
PARAMS = PreprocessParams(rho=4.0, base_size=256)


@dataclasses.dataclass(frozen=True)
class Served:
    url: str
    log: Path

    def client(self, token: str | None = TOKEN, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, trust_env=False, **kw)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height px: IHDR, an empty IDAT, IEND (valid CRCs)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def upload(paths: list[Path], names: list[str] | None = None) -> list[tuple]:
    """httpx's multipart `files` for the paths (file names as given, or the paths' names)."""
    names = names or [p.name for p in paths]
    return [
        ("files", (n, p.read_bytes(), "application/octet-stream"))
        for n, p in zip(names, paths, strict=True)
    ]
