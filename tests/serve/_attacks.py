"""Hostile files and connections for the serve tests (issue 19), from the formats' specifications.

- `tiff_repeated_size`: a TIFF whose first IFD gives width and height twice, the first values
  large, the last a small decoy (libtiff reads the first, a checker keeping the last sees the
  decoy). Its strip is deflated zeros: 52 MP in 50 KB.
- `jpeg_hidden_frame`: a JPEG whose real frame header (SOF0, 52 MP) follows an `FF 00` whose
  next two bytes, read as a segment length, jump into a comment holding a decoy SOF0 (libjpeg
  passes over FF 00 and reads the real one; a checker taking FF 00 for a segment reads the decoy).
- `tiff_plain`: a TIFF of the given size with one header and nothing odd about it.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import zlib

import cv2
import numpy as np

BIG = (7300, 7124)  # 52.0 MP: over the 50 MP limit
DECOY = (640, 480)


def _ifd_entry(tag: int, kind: int, value: int) -> bytes:
    if kind == 3:  # SHORT, left-justified in the 4-byte value field
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)
    return struct.pack("<HHII", tag, 4, 1, value)


def _tiff(sizes: list[tuple[int, int]], strip: bytes, rows: int) -> bytes:
    """Little-endian 8-bit grey TIFF, deflate (8); one entry per size given for 256 and 257."""
    n = 2 * len(sizes) + 9
    data_offset = 8 + 2 + 12 * n + 4
    entries = [_ifd_entry(256, 4, w) for w, _ in sizes] + [_ifd_entry(257, 4, h) for _, h in sizes]
    entries += [
        _ifd_entry(258, 3, 8), _ifd_entry(259, 3, 8), _ifd_entry(262, 3, 1),
        _ifd_entry(273, 4, data_offset), _ifd_entry(277, 3, 1), _ifd_entry(278, 4, rows),
        _ifd_entry(279, 4, len(strip)), _ifd_entry(284, 3, 1), _ifd_entry(339, 3, 1),
    ]  # fmt: skip
    ifd = struct.pack("<H", n) + b"".join(entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + strip


def tiff_plain(width: int, height: int) -> bytes:
    return _tiff([(width, height)], zlib.compress(bytes(width * height), 9), height)


def tiff_repeated_size(big: tuple[int, int] = BIG, decoy: tuple[int, int] = DECOY) -> bytes:
    """The strip holds `big` in full when it is small enough to deflate here (52 MP: 50 KB);
    beyond, a stub (a decoder refuses the size before reading any strip)."""
    pixels = big[0] * big[1]
    strip = zlib.compress(bytes(pixels), 9) if pixels <= 60_000_000 else zlib.compress(b"\0" * 64)
    return _tiff([big, decoy], strip, big[1])


def _segments(jpeg: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(marker, segment) up to the first SOS, and the rest of the file from it."""
    i, out = 2, []
    while jpeg[i + 1] != 0xDA:
        (length,) = struct.unpack(">H", jpeg[i + 2 : i + 4])
        out.append((jpeg[i + 1], jpeg[i : i + 2 + length]))
        i += 2 + length
    return out, jpeg[i:]


def jpeg_hidden_frame(big: tuple[int, int] = BIG, decoy: tuple[int, int] = DECOY) -> bytes:
    grey = np.full((big[1], big[0]), 128, np.uint8)
    ok, encoded = cv2.imencode(".jpeg", grey, [cv2.IMWRITE_JPEG_QUALITY, 10])
    assert ok
    segments, scan = _segments(encoded.tobytes())
    frame = next(s for m, s in segments if m == 0xC0)
    others = b"".join(s for m, s in segments if m != 0xC0 and not 0xE0 <= m <= 0xEF)
    decoy_frame = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, decoy[1], decoy[0], 1) + b"\x01\x11\0"
    pad = bytes(8)
    comment = b"\xff\xfe" + struct.pack(">H", 2 + len(pad) + len(decoy_frame)) + pad + decoy_frame
    jump = 2 + len(frame) + 4 + len(pad)  # from FF 00's "length" to the decoy in the comment
    assert 0xFF not in struct.pack(">H", jump)  # libjpeg skips these two bytes as garbage
    return b"\xff\xd8\xff\x00" + struct.pack(">H", jump) + frame + comment + others + scan


def jpeg_with_scans(jpeg_progressive: bytes, scans: int) -> bytes:
    """A progressive JPEG with its last scan repeated until it has `scans` scans."""
    last = jpeg_progressive.rindex(b"\xff\xda")
    body, tail = jpeg_progressive[:last], jpeg_progressive[last:-2]  # without EOI
    have = jpeg_progressive.count(b"\xff\xda")
    return body + tail * (scans - have + 1) + b"\xff\xd9"


# ---------------------------------------------------------------------------------------------
# Raw connections


def connect(url: str) -> socket.socket:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=60)


def read_until_closed(sock: socket.socket, seconds: float = 120.0) -> bytes:
    """Everything the server sends until it closes the connection (a liveness bound only)."""
    sock.settimeout(seconds)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP answer's head and body (by its Content-Length), leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head, body


def trickle(socks: list[socket.socket], data: bytes, pause: float = 0.1) -> list[socket.socket]:
    """Send `data` a byte every `pause` seconds on each connection, until the server answers or
    closes it (it is then left alone, so that a reset cannot discard the answer); the
    connections the server has not answered or closed when `data` runs out."""
    waiting = list(socks)
    for byte in data:
        readable, _, _ = select.select(waiting, [], [], pause)
        waiting = [s for s in waiting if s not in readable]
        if not waiting:
            break
        for sock in waiting:
            sock.sendall(bytes([byte]))
    return waiting
