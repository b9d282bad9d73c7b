"""How a fundus photograph file becomes pixels (§II-A's input), and why it cannot.

Decoding is separate from Eq. (1) (m2cnn_tf.preprocessing) because it is where files fail: an
unreadable, empty, truncated or foreign file. `decode_bgr` either returns the pixels or raises
`BadImage` with a short reason, which data_prep records for every input it leaves out. With
`partial_ok` (val and test, where nothing may disappear) a truncated file that still yields
pixels is returned with its reason as a flag instead.

The decoders' own pixel limit (`pixel_limit`) is OpenCV's, which reads `OPENCV_IO_MAX_IMAGE_PIXELS`
once, when cv2 is first imported: a process that decodes untrusted bytes (serve.py) sets it before
then. The paths OpenCV's check does not see at full size, Pillow and libjpeg's reduced decode,
are held to the same number here, each through its own decoder's view of the size, so that no
header trick can make a checker and a decoder see two sizes.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np

PIXEL_LIMIT_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"  # OpenCV's own name
_OPENCV_DEFAULT_LIMIT = 1 << 30
# Rows converted at a time by _to_bgr8: its temporaries (up to 23 bytes a pixel while alpha is
# composited) stay a few MB whatever the image's size.
_STRIP_PIXELS = 1 << 20


class BadImage(ValueError):
    """An input that cannot become a training example; `reason` is short and human."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def pixel_limit() -> int:
    """The most pixels a decoder in this process accepts (OpenCV's limit, from the environment;
    its default, 2^30, where unset)."""
    try:
        return int(os.environ.get(PIXEL_LIMIT_ENV, _OPENCV_DEFAULT_LIMIT))
    except ValueError:
        return _OPENCV_DEFAULT_LIMIT


def _check_pixels(width: int, height: int) -> None:
    limit = pixel_limit()
    if width * height > limit:
        raise BadImage(
            f"image too large: {width} × {height} px, over the decoder's limit of "
            f"{limit / 1e6:g} megapixels"
        )


# ---------------------------------------------------------------------------------------------
# Decoding


def read_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except IsADirectoryError:
        raise BadImage("not a file") from None
    except OSError as e:
        raise BadImage(f"unreadable file ({e.strerror or e})") from None


def _sniff(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "other"


def _jpeg_is_complete(data: bytes) -> bool:
    """A JPEG ends with the EOI marker FFD9; libjpeg would silently grey-fill a cut-off one.

    Some cameras append trailers after EOI, so a file that does not end in FFD9 is decoded by
    Pillow at 1/8 scale, which raises on truncation (cheap, and only for such rare files).
    """
    if data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return True
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header only, as Pillow reads it (its markers like libjpeg's);
    None if Pillow cannot tell; BadImage over the pixel limit."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except Exception:
        return None
    _check_pixels(*size)
    return size


def _reduction(size: tuple[int, int] | None, min_side: int | None) -> int:
    """Largest libjpeg scale-down (1, 2, 4, 8) that keeps the short side ≥ min_side."""
    if not min_side or size is None:
        return 1
    short = min(size)
    for factor in (8, 4, 2):
        if short // factor >= min_side:
            return factor
    return 1


_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def _to_bgr8(img: np.ndarray) -> np.ndarray:
    """Grayscale, alpha and 16-bit inputs become 8-bit BGR (alpha composited over black), a
    strip of rows at a time (the same arithmetic, pixel by pixel, with bounded temporaries)."""
    if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.dtype not in (np.uint8, np.uint16):  # float samples: the range is the whole image's
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    rows = max(1, _STRIP_PIXELS // max(1, img.shape[1]))
    out = np.empty((*img.shape[:2], 3), np.uint8)
    for top in range(0, img.shape[0], rows):
        out[top : top + rows] = _strip_to_bgr8(img[top : top + rows])
    return out


def _strip_to_bgr8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if channels == 2:  # grey + alpha
        grey = np.ascontiguousarray(img[..., 0])
        return _over_black(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), img[..., 1])
    if channels == 4:
        return _over_black(np.ascontiguousarray(img[..., :3]), img[..., 3])
    return img


def _over_black(bgr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint16)[..., None]
    return ((bgr.astype(np.uint16) * a + 127) // 255).astype(np.uint8)


def decode_bgr(
    data: bytes, min_side: int | None, *, partial_ok: bool = False
) -> tuple[np.ndarray, str]:
    """(BGR uint8 pixels, flag): the flag is "" or, with `partial_ok`, why the pixels are
    incomplete ("truncated JPEG": given an end marker, libjpeg decodes what is there and
    fills the rest with grey). Raises BadImage for what cannot be used: without `partial_ok` a
    truncated file, in any case one with no pixels (a JPEG cut inside its header; a truncated
    PNG, which OpenCV does not decode in part)."""
    if not data:
        raise BadImage("empty file")
    kind = _sniff(data)
    size = _image_size(data)  # refuses what is over the pixel limit before anything decodes
    flag = ""
    if kind == "jpeg" and not _jpeg_is_complete(data):
        flag = "truncated JPEG"
    if kind == "png" and b"IEND" not in data[-16:]:
        flag = "truncated PNG"
    if flag and not partial_ok:
        raise BadImage(flag)
    if flag == "truncated JPEG":  # OpenCV decodes nothing of it without an end marker
        data = data + b"\xff\xd9"
    buf = np.frombuffer(data, np.uint8)
    factor = _reduction(size, min_side)
    if kind == "jpeg":
        img = _imdecode(buf, _REDUCED_FLAGS[factor])
        if img is not None and factor > 1:  # OpenCV checked the reduced size: libjpeg's own
            h, w = img.shape[:2]  # view of the full one is at least this
            _check_pixels((w - 1) * factor + 1, (h - 1) * factor + 1)
    else:
        img = _imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is None:
            img = _pil_decode(data)
        if img is not None:
            img = _to_bgr8(img)
            if factor > 1:
                h, w = img.shape[:2]
                img = cv2.resize(img, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    if img is None or img.size == 0:
        raise BadImage(flag or ("not an image" if kind == "other" else f"corrupt {kind.upper()}"))
    return img, flag


def _imdecode(buf: np.ndarray, flags: int) -> np.ndarray | None:
    """cv2.imdecode, None where it fails; BadImage (not OpenCV's text, which names its build
    paths) where it refuses the size."""
    try:
        return cv2.imdecode(buf, flags)
    except cv2.error as err:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(err):
            raise BadImage(
                f"image too large: over the decoder's limit of {pixel_limit() / 1e6:g} megapixels"
            ) from None
        return None


def _pil_decode(data: bytes) -> np.ndarray | None:
    """Formats OpenCV lacks (e.g. GIF); returns BGR or None (BadImage over the pixel limit)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(*im.size)
            return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    except BadImage:
        raise
    except Exception:
        return None
