"""What an uploaded file is, judged by its first bytes, and how large it would be once decoded.

The grader decides a file's type by its magic bytes, never by its name or extension, and reads
the pixel dimensions from the header alone, so a decompression bomb (a small PNG whose header
claims 60,000 × 60,000 px) is refused before any decoder allocates memory for it. Each parser
reads only the fixed fields its format's specification places at the start of the file: PNG's
IHDR chunk, JPEG's SOFn segment, BMP's DIB header, TIFF's first IFD, WebP's VP8/VP8L/VP8X chunk.
Where a file could say two things, the parser reads it the way the decoder does (JPEG's markers
as libjpeg finds them) or refuses it (a TIFF tag that repeats): the check and the decoder must
never see two sizes. It is only the fast first refusal: the decoders enforce the same pixel limit
themselves (`m2cnn_tf.decoding.pixel_limit`, set by serve.py). Pure Python, free of TensorFlow and
of any decoder.
"""

from __future__ import annotations

import dataclasses
import re
import struct

# Ours: the largest fundus cameras take about 24 MP (Kaggle's largest photos are 18 MP); 50 MP
# decodes to 150 MB of 8-bit RGB, which a grading server can afford a few of at once.
MAX_PIXELS = 50_000_000

# Ours: a progressive JPEG is decoded scan by scan over the whole image, so its cost grows with
# the number of scans; encoders write about 10 (libjpeg's default script), so 64 refuses only
# files made to be slow.
MAX_JPEG_SCANS = 64

ACCEPTED_NAMES = "JPEG, PNG, TIFF, BMP or WebP"

# JPEG start-of-frame markers (ITU T.81 Table B.1): every SOFn except DHT (C4), JPG (C8), DAC (CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length field
# libjpeg's next_marker (jdmarker.c): bytes that are not FF are skipped, FF fill bytes swallowed,
# and FF 00 (a stuffed data byte) passed over; the first FF followed by anything else is a marker.
_JPEG_MARKER = re.compile(rb"\xff(?:\xff)*([^\x00\xff])")  # (not \xff+: 20x slower)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header says: format, size, and the sample layout (for the grader's warnings)."""

    kind: str
    width: int
    height: int
    channels: int | None = None  # samples per pixel, where the header says
    bit_depth: int | None = None  # bits per sample, where the header says
    progressive: bool = False  # a progressive JPEG (whole-image coefficient buffers)
    scans: int = 0  # a JPEG's scans (SOS markers)

    @property
    def grayscale(self) -> bool:
        return self.channels in (1, 2)  # grey, or grey + alpha

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decode_bytes(info: ImageInfo) -> int:
    """About the most memory `decoding.decode_bgr` needs for this image, from its header: the
    decoder's output, an 8-bit BGR copy where the samples are not 8-bit BGR already, and the
    reduced copy. A JPEG decodes straight to 8-bit BGR (at most full size), plus libjpeg's
    whole-image coefficient buffers (2 bytes per sample) when it is progressive."""
    px = info.pixels
    if info.kind == "jpeg":
        return px * 3 + (px * (info.channels or 3) * 2 if info.progressive else 0)
    channels, sample = info.channels or 4, max(1, -(-(info.bit_depth or 8) // 8))
    converted = 0 if (channels == 3 and sample == 1) else px * 3
    return px * channels * sample + converted + px * 3 // 4


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
    except RefusedImage:
        raise
    except (struct.error, IndexError, ValueError):
        info = None
    if info is None or info.width <= 0 or info.height <= 0:
        raise RefusedImage(f"corrupt {kind.upper()} (no readable size in its header)")
    if info.pixels > max_pixels:
        raise RefusedImage(
            f"image too large: {info.width} × {info.height} px, over the limit of "
            f"{max_pixels / 1e6:g} megapixels (refused before decoding)"
        )
    if info.scans > MAX_JPEG_SCANS:
        raise RefusedImage(
            f"JPEG with {info.scans} scans, over the limit of {MAX_JPEG_SCANS} (refused before "
            "decoding: each scan is a pass over the whole image)"
        )
    return info


def _png(data: bytes) -> ImageInfo | None:
    # PNG spec §11.2.2: the first chunk is IHDR: width, height, bit depth, colour type.
    if data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(colour)  # a palette decodes to up to RGBA
    return ImageInfo("png", width, height, channels, depth)


def _jpeg(data: bytes) -> ImageInfo | None:
    # ITU T.81 §B.1.1, read as libjpeg reads it: from each marker, the next one is where libjpeg's
    # next_marker finds it (a length field alone could be made to jump over a frame header that
    # libjpeg sees). The frame size is the first SOFn's (libjpeg refuses a second); scans are
    # counted up to EOI, their entropy-coded data passed over the same way (RSTn are not scans).
    frame: tuple[int, ...] | None = None
    scans, pos = 0, 2
    while (found := _JPEG_MARKER.search(data, pos)) is not None:
        marker, pos = found[1][0], found.end()
        if marker in _STANDALONE:
            continue
        if marker in (0xD8, 0xD9):  # a second SOI is an error to libjpeg; EOI ends the image
            break
        if pos + 2 > len(data):  # cut off: what libjpeg will call a truncated file
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            return None
        if marker in _SOF:
            if frame is not None:
                return None
            depth, height, width, channels = struct.unpack(">BHHB", data[pos + 2 : pos + 8])
            frame = (width, height, channels, depth, marker in _PROGRESSIVE)
        elif marker == 0xDA:
            if frame is None:  # a scan before any frame header: libjpeg refuses the file
                return None
            scans += 1
        pos += length
    if frame is None:
        return None
    width, height, channels, depth, progressive = frame
    return ImageInfo("jpeg", width, height, channels, depth, progressive, scans)


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
    # 258 bits per sample, 277 samples per pixel (SHORT or LONG; the first value, stored inline
    # when it fits in 4 bytes, else at the offset given). A tag that repeats is refused: libtiff
    # keeps the first value and other readers the last, so the check and the decoder would
    # disagree on the size.
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[offset : offset + 2])
    tags: dict[int, int] = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k : offset + 14 + 12 * k]
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        if tag not in (256, 257, 258, 277) or kind not in (3, 4):
            continue
        if tag in tags:
            raise RefusedImage(
                f"corrupt TIFF: tag {tag} is repeated, so decoders would disagree on its size"
            )
        if n < 1 or (tag in (256, 257) and n != 1):
            return None
        size = 2 if kind == 3 else 4
        where = entry[8:12] if n * size <= 4 else _at(data, order, entry[8:12], size)
        (tags[tag],) = struct.unpack(order + ("H" if kind == 3 else "I"), where[:size])
    if 256 not in tags or 257 not in tags:
        return None
    return ImageInfo("tiff", tags[256], tags[257], tags.get(277, 1), tags.get(258, 1))


def _at(data: bytes, order: str, pointer: bytes, size: int) -> bytes:
    (offset,) = struct.unpack(order + "I", pointer)
    return data[offset : offset + size]


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
