"""What an uploaded file is, judged by its first bytes, and how large it would be once decoded.

The grader decides a file's type by its magic bytes, never by its name or extension, and reads
the pixel dimensions from the header alone, so a decompression bomb (a small PNG whose header
claims 60,000 × 60,000 px) is refused before any decoder allocates memory for it. Each parser
reads only the fixed fields its format's specification places at the start of the file: PNG's
IHDR chunk, JPEG's SOFn segment, BMP's DIB header, TIFF's first IFD, WebP's VP8/VP8L/VP8X chunk.
Pure Python, free of TensorFlow and of any decoder.
"""

from __future__ import annotations

import dataclasses
import struct

# Ours: the largest fundus cameras take about 24 MP (Kaggle's largest photos are 18 MP); 50 MP
# decodes to 150 MB of 8-bit RGB, which a grading server can afford a few of at once.
MAX_PIXELS = 50_000_000

ACCEPTED_NAMES = "JPEG, PNG, TIFF, BMP or WebP"

# JPEG start-of-frame markers (ITU T.81 Table B.1): every SOFn except DHT (C4), JPG (C8), DAC (CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length field


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header says: format, size, and the sample layout (for the grader's warnings)."""

    kind: str
    width: int
    height: int
    channels: int | None = None  # samples per pixel, where the header says
    bit_depth: int | None = None  # bits per sample, where the header says

    @property
    def grayscale(self) -> bool:
        return self.channels in (1, 2)  # grey, or grey + alpha


class RefusedImage(ValueError):
    """A file the grader will not decode; the message is a short reason for the user."""


def sniff(data: bytes) -> str | None:
    """The format by magic bytes, or None for anything the grader does not accept."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def inspect(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """The header's facts, or RefusedImage: empty, not an accepted type, no readable header,
    or more pixels than `max_pixels` (checked before anything is decoded)."""
    if not data:
        raise RefusedImage("empty file")
    kind = sniff(data)
    if kind is None:
        raise RefusedImage(f"not an image (accepted: {ACCEPTED_NAMES}, recognised by content)")
    try:
        info = _PARSERS[kind](data)
    except (struct.error, IndexError, ValueError):
        info = None
    if info is None or info.width <= 0 or info.height <= 0:
        raise RefusedImage(f"corrupt {kind.upper()} (no readable size in its header)")
    if info.width * info.height > max_pixels:
        raise RefusedImage(
            f"image too large: {info.width} × {info.height} px, over the limit of "
            f"{max_pixels / 1e6:g} megapixels (refused before decoding)"
        )
    return info


def _png(data: bytes) -> ImageInfo | None:
    # PNG spec §11.2.2: the first chunk is IHDR: width, height, bit depth, colour type.
    if data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    return ImageInfo("png", width, height, channels, depth)


def _jpeg(data: bytes) -> ImageInfo | None:
    # ITU T.81 §B.1.1: marker segments FFxx + 2-byte length, until a SOFn gives the frame size.
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            depth, height, width, channels = struct.unpack(">BHHB", data[i + 4 : i + 10])
            return ImageInfo("jpeg", width, height, channels, depth)
        i += 2 + length
    return None


def _bmp(data: bytes) -> ImageInfo | None:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, _, bits = struct.unpack("<HHHH", data[18:26])
    else:  # BITMAPINFOHEADER and later: signed 32-bit sizes, negative height = top-down
        width, height, _, bits = struct.unpack("<iiHH", data[18:30])
    channels = 1 if bits <= 8 else 4 if bits == 32 else 3
    return ImageInfo("bmp", width, abs(height), channels, 8)


def _tiff(data: bytes) -> ImageInfo | None:
    # TIFF 6.0 §2: byte order, 42, offset of the first IFD; tags 256/257 width/length,
    # 258 bits per sample, 277 samples per pixel (SHORT or LONG values, stored inline).
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[offset : offset + 2])
    tags: dict[int, int] = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k : offset + 14 + 12 * k]
        tag, kind, _ = struct.unpack(order + "HHI", entry[:8])
        if kind == 3:
            (tags[tag],) = struct.unpack(order + "H", entry[8:10])
        elif kind == 4:
            (tags[tag],) = struct.unpack(order + "I", entry[8:12])
    if 256 not in tags or 257 not in tags:
        return None
    return ImageInfo("tiff", tags[256], tags[257], tags.get(277, 1), tags.get(258, 1))


def _webp(data: bytes) -> ImageInfo | None:
    # RFC 9649: one VP8 (lossy), VP8L (lossless) or VP8X (extended) chunk after the RIFF header.
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return ImageInfo("webp", width & 0x3FFF, height & 0x3FFF, 3, 8)
    if chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4, 8)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageInfo("webp", width, height, 4, 8)
    return None


_PARSERS = {"png": _png, "jpeg": _jpeg, "bmp": _bmp, "tiff": _tiff, "webp": _webp}
