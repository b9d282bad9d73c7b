"""Fundus preprocessing (§II-A): crop the disc, square it, resize, Graham's Eq. (1), circular mask.

This is the only implementation: data_prep writes TFRecords with `preprocess_file` and prediction
calls the same function, so training and inference can never see different preprocessing.
Eq. (1) runs once per image at `base_size`; every output size is resized from that one image.
Decoding the file is m2cnn_tf.decoding's job.

Internally images stay BGR (OpenCV's order) and are converted to RGB only at the public
boundary: every step is per channel or channel-symmetric, so the order does not change results.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import cv2
import numpy as np

from m2cnn_tf.decoding import BadImage, decode_bgr, read_bytes
from m2cnn_tf.errors import UsageError

# Border noise: the disc is whatever is clearly brighter than the darkest image corners.
_BORDER_MARGIN = 10  # grey levels above the corners' noise
_MIN_THRESHOLD = 15  # never threshold lower than this (JPEG ringing around black borders)
_DARK_BORDER = 60  # corners brighter than this: no black border, the whole frame is fundus
_MIN_DISC_FRACTION = 0.1  # a disc narrower than this share of the short side is no fundus
_BLOWN_OUT_FRACTION = 0.5  # more saturated-white pixels than this share: blown out
_MIN_CONTRAST = 2.0  # std of grey levels inside the disc below this: a blank image
_DETECT_SIDE = 256  # disc detection runs on a strided view about this large
_BLUR_REDUCTION = 2  # the masked fast path blurs at 1/2 resolution (error bounded in tests)

# How a preprocessed image is stored (m2cnn_tf.records): JPEG by default, PNG lossless (ours).
FORMATS = ("jpeg", "png")

# What ρ is measured in. §III-A gives ρ = 10 but not the scale it applies at. Graham [6], whose
# constants (α, β, ρ, γ) the paper takes, first resizes every photograph to a disc radius of
# 300 px and blurs with σ = radius / 30 = 10 px. Here the disc fills the base_size square, so
# its radius is base_size / 2 (360 px at 720). "base": ρ is σ in pixels of the base image (ours,
# the default since the first version: σ = 10 at radius 360, i.e. radius / 36). "graham": ρ is in
# pixels at Graham's radius and scales with the base image (σ = ρ·base_size/600 = 12 at 720).
RHO_SCALES = ("base", "graham")
GRAHAM_RADIUS = 300  # px: the disc radius at which Graham's ρ = 10 applies


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    """Eq. (1) constants (§III-A: α=4, β=−4, ρ=10, γ=128) and Graham's 90% circular mask.

    `base_size` is the reference resolution at which Eq. (1) is applied; `rho_scale` says what
    ρ is measured in (`RHO_SCALES`), and `sigma` is the blur it gives in base pixels.
    Each field's `help` is the text of its data_prep flag (data_prep.options).
    """

    alpha: float = dataclasses.field(default=4.0, metadata={"help": "Eq. (1) α"})
    beta: float = dataclasses.field(default=-4.0, metadata={"help": "Eq. (1) β"})
    rho: float = dataclasses.field(
        default=10.0, metadata={"help": "Eq. (1) ρ: G's σ, in the pixels the ρ scale says"}
    )
    gamma: float = dataclasses.field(default=128.0, metadata={"help": "Eq. (1) γ"})
    mask: bool = dataclasses.field(
        default=True, metadata={"flag": "no-mask", "help": "skip the 90% circular mask"}
    )
    mask_fraction: float = dataclasses.field(
        default=0.9, metadata={"help": "mask radius / disc radius"}
    )
    base_size: int = dataclasses.field(
        default=720, metadata={"help": "resolution Eq. (1) runs at; every size comes from it"}
    )
    rho_scale: str = dataclasses.field(
        default="base",
        metadata={
            "choices": RHO_SCALES,
            "help": "what ρ is measured in: base = pixels of the base image (σ = ρ); graham = "
            "pixels at Graham's disc radius of 300 px, scaled to the base (σ = ρ·base/600)",
        },
    )

    def __post_init__(self) -> None:
        if self.base_size < 8:
            raise UsageError(f"must be at least 8, got {self.base_size}", setting="base_size")
        if self.rho <= 0:
            raise UsageError(f"must be positive, got {self.rho}", setting="rho")
        if not 0 < self.mask_fraction <= 1:
            raise UsageError(
                f"must be in (0, 1], got {self.mask_fraction}", setting="mask_fraction"
            )
        if self.rho_scale not in RHO_SCALES:
            raise UsageError(
                f"must be one of {', '.join(RHO_SCALES)}, got {self.rho_scale!r}",
                setting="rho_scale",
            )

    @property
    def sigma(self) -> float:
        """G(ρ)'s standard deviation in pixels of the base image."""
        if self.rho_scale == "graham":
            return self.rho * (self.base_size / 2) / GRAHAM_RADIUS
        return self.rho

    def to_dict(self) -> dict[str, float | int | bool | str]:
        """The fields, as manifests record them. `rho_scale` is left out at "base": manifests
        from before it existed mean that, and their conversions keep their key (a rerun of the
        same command still finds them complete)."""
        values = dataclasses.asdict(self)
        if values["rho_scale"] == "base":
            del values["rho_scale"]
        return values


# ---------------------------------------------------------------------------------------------
# Disc, crop and square


def find_disc(img: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the fundus disc, thresholded above the border's noise.

    Raises BadImage when no fundus is visible: all black, blown out, or blank.
    """
    h, w = img.shape[:2]
    step = max(1, min(h, w) // _DETECT_SIDE)
    small = img[::step, ::step]
    grey = cv2.max(cv2.max(small[..., 0], small[..., 1]), small[..., 2])
    grey = cv2.medianBlur(grey, 3)
    sh, sw = grey.shape
    p = max(2, min(sh, sw) // 20)
    corners = [grey[:p, :p], grey[:p, -p:], grey[-p:, :p], grey[-p:, -p:]]
    border = float(np.median([c.max() for c in corners]))
    if border > _DARK_BORDER:
        y0, y1, x0, x1 = 0, sh, 0, sw
    else:
        on = grey > max(_MIN_THRESHOLD, border + _BORDER_MARGIN)
        rows = np.flatnonzero(on.sum(axis=1) > 0.01 * sw)
        cols = np.flatnonzero(on.sum(axis=0) > 0.01 * sh)
        if rows.size == 0 or cols.size == 0:
            raise BadImage("no fundus visible (all dark)")
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        if max(y1 - y0, x1 - x0) < _MIN_DISC_FRACTION * min(sh, sw):
            raise BadImage("no fundus visible (all dark)")
    region = small[y0:y1, x0:x1]
    lowest = cv2.min(cv2.min(region[..., 0], region[..., 1]), region[..., 2])
    if np.mean(lowest >= 250) > _BLOWN_OUT_FRACTION:
        raise BadImage("no fundus visible (blown out)")
    if float(grey[y0:y1, x0:x1].std()) < _MIN_CONTRAST:
        raise BadImage("no fundus visible (blank image)")
    return (
        int(x0 * step),
        int(y0 * step),
        int(min(w, x1 * step)),
        int(min(h, y1 * step)),
    )


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Area-average when shrinking, bicubic when enlarging.

    OpenCV's INTER_AREA takes a slow generic path for ratios between 1 and 2 (12 ms for a
    Kaggle crop); bilinear to twice the target then an exact 2×2 average is within 0.2 grey
    levels of it on average and over twice as fast.
    """
    ih, iw = img.shape[:2]
    if (iw, ih) == (w, h):
        return img
    if w > iw or h > ih:
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    if iw < 2 * w and ih < 2 * h:
        img = cv2.resize(img, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def crop_to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Crop to the disc, pad to a centred black square, resize to size×size (§II-A steps 2–4)."""
    x0, y0, x1, y1 = find_disc(img)
    return fit_square(img[y0:y1, x0:x1], size)


def fit_square(crop: np.ndarray, size: int) -> np.ndarray:
    """`crop` resized to fit size×size, centred on black.

    The crop is resized first and pasted into the black square, which equals padding first
    and resizing, minus the cost of resizing the padding.
    """
    ch, cw = crop.shape[:2]
    scale = size / max(ch, cw)
    nw = max(1, min(size, round(cw * scale)))
    nh = max(1, min(size, round(ch * scale)))
    resized = _resize(crop, nw, nh)
    out = np.zeros((size, size, *crop.shape[2:]), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


# ---------------------------------------------------------------------------------------------
# Eq. (1) and the mask


@functools.lru_cache(maxsize=16)
def circular_mask(size: int, fraction: float) -> np.ndarray:
    """Boolean disc of radius fraction·size/2 about the square's centre (Graham's recipe)."""
    c = (size - 1) / 2
    yy, xx = np.ogrid[:size, :size]
    mask = (yy - c) ** 2 + (xx - c) ** 2 <= (fraction * size / 2) ** 2
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=16)
def _outside_fill(size: int, fraction: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 mask of the outside, the γ image) for cv2.copyTo, 100× faster than indexing."""
    outside = (~circular_mask(size, fraction)).astype(np.uint8)
    fill = np.full((size, size, 3), np.clip(round(gamma), 0, 255), np.uint8)
    return outside, fill


def gaussian_blur(img: np.ndarray, rho: float, fast: bool) -> np.ndarray:
    """G(ρ)∗I in float32: exact (kernel to ±4ρ, reflect-101 borders) or at half resolution.

    The half-resolution blur shrinks σ to keep the total variance of area-downsampling,
    blurring and linear upsampling equal to ρ²; it deviates near the image border, so it is
    only used with the mask, which replaces that border (tests bound the masked error).
    """
    f = img.astype(np.float32)
    h, w = f.shape[:2]
    k = _BLUR_REDUCTION
    if not fast or min(h, w) < 8 * k:
        return cv2.GaussianBlur(f, (0, 0), rho, borderType=cv2.BORDER_REFLECT_101)
    variance = rho**2 - (k * k - 1) / 12 - k * k / 6
    sigma = float(np.sqrt(max(variance, 1e-6))) / k
    small = cv2.resize(f, (w // k, h // k), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def graham_normalise(square: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Eq. (1): I_c = αI + βG(ρ)∗I + γ, rounded and clipped to uint8, then the 90% mask → γ.

    G(ρ) blurs with `params.sigma`: ρ in the unit `params.rho_scale` says."""
    blurred = gaussian_blur(square, params.sigma, fast=params.mask)
    out = cv2.addWeighted(square, params.alpha, blurred, params.beta, params.gamma, dtype=cv2.CV_8U)
    if params.mask:
        outside, fill = _outside_fill(out.shape[0], params.mask_fraction, params.gamma)
        cv2.copyTo(fill, outside, out)
    return out


def preprocess_image(rgb: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """§II-A on a decoded image: disc crop → centred square → base_size → Eq. (1) → mask.

    Works on any channel order (every step is per channel); returns uint8 base×base×3.
    """
    return _base_and_disc(rgb, params)[0]


def _base_and_disc(
    img: np.ndarray, params: PreprocessParams
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The base image of a decoded image, and the disc's box it was cropped to."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise BadImage(f"expected an H×W×3 uint8 image, got {img.dtype} {img.shape}")
    box = find_disc(img)
    x0, y0, x1, y1 = box
    return graham_normalise(fit_square(img[y0:y1, x0:x1], params.base_size), params), box


def resize_to(base: np.ndarray, size: int) -> np.ndarray:
    """One output size, always from the base image so every size shares one Eq. (1)."""
    return _resize(base, size, size)


def preprocess_bgr_file(path: str | os.PathLike, params: PreprocessParams) -> np.ndarray:
    """The base image of a file, in BGR: what data_prep encodes without a colour round trip."""
    return preprocess_image(decode_bgr(read_bytes(path), params.base_size)[0], params)


def preprocess_bgr_file_kept(
    path: str | os.PathLike, params: PreprocessParams
) -> tuple[np.ndarray, str]:
    """The val/test form of `preprocess_bgr_file`: nothing that decodes is dropped.

    Returns (base image, flag): "" for a sound image, otherwise why it is kept although
    imperfect. A truncated file is used as far as it decodes ("truncated JPEG"); an image in
    which no fundus is found is squared whole ("no fundus visible (all dark)"). Only a file
    with no pixels at all raises BadImage. Sound images come out exactly as
    `preprocess_bgr_file` makes them.
    """
    img, flag = decode_bgr(read_bytes(path), params.base_size, partial_ok=True)
    try:
        square = crop_to_square(img, params.base_size)
    except BadImage as e:
        square = fit_square(img, params.base_size)
        flag = f"{flag}; {e.reason}" if flag else e.reason
    return graham_normalise(square, params), flag


@dataclasses.dataclass(frozen=True)
class Preprocessed:
    """A photograph made ready for the network (`images`), and what was found on the way."""

    images: dict[int, np.ndarray]  # RGB uint8 size×size, per size
    decoded_size: tuple[int, int]  # (width, height) as decoded (a large JPEG decodes reduced)
    disc: tuple[int, int, int, int]  # the fundus disc's box (x0, y0, x1, y1), decoded pixels


def preprocess_bytes(data: bytes, sizes: Sequence[int], params: PreprocessParams) -> Preprocessed:
    """§II-A on a file's bytes: decode, disc crop, Eq. (1) at base_size once, then every size
    resized from that one base image. Raises BadImage for a file that cannot be graded."""
    bgr = decode_bgr(data, params.base_size)[0]
    base, disc = _base_and_disc(bgr, params)
    images = {int(s): cv2.cvtColor(resize_to(base, int(s)), cv2.COLOR_BGR2RGB) for s in sizes}
    return Preprocessed(images, (bgr.shape[1], bgr.shape[0]), disc)


def preprocess_file(
    path: str | os.PathLike, sizes: Sequence[int], params: PreprocessParams
) -> dict[int, np.ndarray]:
    """RGB uint8 images for every size, all resized from the one base_size image (§II-A).

    Prediction (a file, or an upload's bytes: `preprocess_bytes`) and training data (data_prep,
    `preprocess_bgr_file`) go through the same steps, so they cannot drift.
    """
    return preprocess_bytes(read_bytes(path), sizes, params).images


def encode(bgr: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """A preprocessed BGR image as the bytes a record stores (one of `FORMATS`)."""
    if image_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    elif image_format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise UsageError(f"must be one of {FORMATS}, got {image_format!r}", setting="image_format")
    if not ok:
        raise BadImage(f"could not encode {image_format.upper()}")
    return buf.tobytes()
