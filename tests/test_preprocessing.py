"""m2cnn_tf.preprocessing (§II-A, Eq. (1)) against plain reference implementations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from synthetic_fundus import fundus

from m2cnn_tf.decoding import BadImage, decode_bgr, read_bytes
from m2cnn_tf.errors import UsageError
from m2cnn_tf.preprocessing import (
    PreprocessParams,
    crop_to_square,
    find_disc,
    graham_normalise,
    preprocess_bgr_file,
    preprocess_bgr_file_kept,
    preprocess_file,
    preprocess_image,
)


def load_image(path, min_side: int | None = None) -> np.ndarray:
    """RGB pixels of a file, as the library decodes it (raises BadImage)."""
    return cv2.cvtColor(decode_bgr(read_bytes(path), min_side)[0], cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------------------------------------
# A plain reference of Eq. (1): I_c = αI + βG(ρ)∗I + γ, in float64 with numpy only.


def reference_blur(img: np.ndarray, rho: float) -> np.ndarray:
    """Separable Gaussian, kernel to ±4ρ, mirrored borders without repeating the edge pixel."""
    radius = int(4 * rho + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * rho**2))
    kernel /= kernel.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for k, w in enumerate(kernel):
            acc += w * np.take(padded, np.arange(k, k + n), axis=axis)
        out = acc
    return out


def reference_eq1(img: np.ndarray, p: PreprocessParams) -> np.ndarray:
    ic = p.alpha * img.astype(np.float64) + p.beta * reference_blur(img, p.rho) + p.gamma
    out = np.clip(np.rint(ic), 0, 255).astype(np.uint8)
    if p.mask:
        n = img.shape[0]
        c = (n - 1) / 2
        yy, xx = np.mgrid[:n, :n]
        outside = np.hypot(yy - c, xx - c) > p.mask_fraction * n / 2
        out[outside] = round(p.gamma)
    return out


def adversarial_square(size: int, seed: int = 0) -> np.ndarray:
    """A disc full of the hardest content for an approximate blur: 0/255 steps and lines."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 2, (60, 110, 200), -1)
    for _ in range(40):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        s = int(rng.integers(4, size // 8))
        colour = tuple(int(v) for v in rng.choice([0, 255], 3))
        cv2.rectangle(img, (x, y), (x + s, y + s), colour, -1)
    for _ in range(20):
        p, q = rng.integers(0, size, (2, 2))
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), (255, 255, 255), 2)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img


def test_eq1_without_mask_matches_plain_reference():
    p = PreprocessParams(base_size=160, rho=6.0, mask=False)
    img = adversarial_square(160, seed=1)
    ours = graham_normalise(img, p).astype(int)
    ref = reference_eq1(img, p).astype(int)
    # Exact path: only float32-vs-float64 rounding at .5 boundaries may differ.
    assert np.abs(ours - ref).max() <= 1
    assert np.mean(ours != ref) < 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_fast_blur_is_within_two_grey_levels_of_exact_eq1(seed):
    p = PreprocessParams()  # the defaults: α=4, β=−4, ρ=10, γ=128, 90% mask, 720 px
    img = adversarial_square(p.base_size, seed=seed)
    ours = graham_normalise(img, p).astype(int)
    ref = reference_eq1(img, p).astype(int)
    assert np.abs(ours - ref).max() <= 2
    # and it is not trivially so: the image has strong Eq. (1) structure inside the mask
    assert ref.std() > 20


def test_mask_sets_everything_outside_ninety_percent_radius_to_gamma():
    p = PreprocessParams(base_size=100, gamma=100.0)
    out = graham_normalise(adversarial_square(100), p)
    yy, xx = np.mgrid[:100, :100]
    r = np.hypot(yy - 49.5, xx - 49.5)
    assert (out[r > 45.0] == 100).all()
    assert (out[r < 44.0] != 100).any(axis=-1).mean() > 0.5


def test_eq1_clips_to_uint8_range():
    p = PreprocessParams(base_size=64, mask=False)
    img = np.zeros((64, 64, 3), np.uint8)
    img[20:40, 20:40] = 255
    out = graham_normalise(img, p)
    assert out.dtype == np.uint8
    assert out.max() == 255 and out.min() < 128


# ---------------------------------------------------------------------------------------------
# Disc, crop and square


def test_find_disc_returns_bounding_box_of_off_centre_disc():
    img = np.zeros((300, 400, 3), np.uint8)
    cv2.circle(img, (150, 160), 100, (40, 90, 180), -1)
    x0, y0, x1, y1 = find_disc(img)
    # true box: x 50..251, y 60..261; detection runs on a strided view (step 1 at this size)
    assert abs(x0 - 50) <= 3 and abs(x1 - 251) <= 3
    assert abs(y0 - 60) <= 3 and abs(y1 - 261) <= 3


def test_kaggle_style_cut_disc_is_centred_and_padded_with_black():
    # disc of radius 60 in a 100-px-high frame: cut at top and bottom, 121 px wide
    img = np.zeros((100, 200, 3), np.uint8)
    cv2.circle(img, (100, 50), 60, (50, 100, 200), -1)
    sq = crop_to_square(img, 121)
    assert sq.shape == (121, 121, 3)
    rows_with_fundus = np.flatnonzero(sq.max(axis=(1, 2)) > 20)
    # 100 image rows padded to 121: about 10 black rows above and below
    assert 9 <= rows_with_fundus[0] <= 12 and 108 <= rows_with_fundus[-1] <= 111
    cols_with_fundus = np.flatnonzero(sq.max(axis=(0, 2)) > 20)
    assert cols_with_fundus[0] <= 2 and cols_with_fundus[-1] >= 118


def test_border_noise_is_not_mistaken_for_fundus():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 12, (200, 200, 3), dtype=np.uint8)  # noisy, JPEG-like black border
    cv2.circle(img, (100, 100), 40, (40, 80, 160), -1)
    x0, y0, x1, y1 = find_disc(img)
    assert 55 <= x0 <= 63 and 137 <= x1 <= 145 and 55 <= y0 <= 63 and 137 <= y1 <= 145


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.zeros((120, 160, 3), np.uint8), "no fundus visible (all dark)"),
        (np.full((120, 160, 3), 255, np.uint8), "no fundus visible (blown out)"),
        (np.full((120, 160, 3), 128, np.uint8), "no fundus visible (blank image)"),
    ],
)
def test_image_without_fundus_raises_bad_image(image, reason):
    with pytest.raises(BadImage) as e:
        preprocess_image(image, PreprocessParams(base_size=64))
    assert e.value.reason == reason


def test_blown_out_disc_on_black_raises_bad_image():
    img = np.zeros((120, 160, 3), np.uint8)
    cv2.circle(img, (80, 60), 55, (255, 255, 255), -1)
    with pytest.raises(BadImage, match="blown out"):
        preprocess_image(img, PreprocessParams(base_size=64))


# ---------------------------------------------------------------------------------------------
# Decoding


def test_truncated_jpeg_raises_bad_image(tmp_path):
    path = tmp_path / "a.jpeg"
    cv2.imwrite(str(path), fundus(seed=3), [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert cv2.imread(str(path)) is not None  # OpenCV alone would silently grey-fill it
    with pytest.raises(BadImage) as e:
        load_image(path)
    assert e.value.reason == "truncated JPEG"


def test_jpeg_with_trailer_after_end_marker_is_accepted(tmp_path):
    path = tmp_path / "a.jpeg"
    cv2.imwrite(str(path), fundus(seed=3), [cv2.IMWRITE_JPEG_QUALITY, 95])
    path.write_bytes(path.read_bytes() + b"CAMERA-TRAILER" * 4)
    assert load_image(path).shape == (96, 128, 3)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"image,level\n1_left,0\n", "not an image")],
)
def test_empty_or_non_image_file_raises_bad_image(tmp_path, content, reason):
    path = tmp_path / "x.jpeg"
    path.write_bytes(content)
    with pytest.raises(BadImage) as e:
        load_image(path)
    assert e.value.reason == reason


def test_missing_file_raises_bad_image(tmp_path):
    with pytest.raises(BadImage, match="missing file"):
        load_image(tmp_path / "nope.jpeg")


def test_load_image_returns_rgb_order(tmp_path):
    bgr = np.zeros((40, 40, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "r.png"), bgr)
    rgb = load_image(tmp_path / "r.png")
    assert (rgb[..., 0] == 200).all() and (rgb[..., 1:] == 0).all()


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpeg"
    cv2.imwrite(str(path), fundus(800, 1000, seed=1))
    assert load_image(path).shape == (800, 1000, 3)
    assert load_image(path, min_side=200).shape == (200, 250, 3)  # 1/4: 800 // 4 ≥ 200
    assert load_image(path, min_side=300).shape == (400, 500, 3)  # 1/2: 800 // 4 < 300
    assert load_image(path, min_side=500).shape == (800, 1000, 3)


def test_grayscale_rgba_and_16_bit_pngs_are_converted(tmp_path):
    grey = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (10, 1))
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = load_image(tmp_path / "g.png")
    assert out.dtype == np.uint8 and out.shape == (10, 50, 3)
    assert (out == grey[..., None]).all()

    deep = np.tile(np.arange(0, 65536, 1337, dtype=np.uint16), (4, 1))
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    out = load_image(tmp_path / "d.png")
    assert out.dtype == np.uint8
    assert np.abs(out[..., 0].astype(float) - deep / 257.0).max() <= 0.5

    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., :3] = (10, 20, 200)
    bgra[:4, ..., 3] = 255  # opaque top half, transparent bottom half
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    out = load_image(tmp_path / "a.png")
    assert out.shape == (8, 8, 3)
    assert (out[:4] == (200, 20, 10)).all() and (out[4:] == 0).all()


# ---------------------------------------------------------------------------------------------
# Files and sizes


def test_every_size_is_resized_from_the_one_base_image(tmp_path):
    path = tmp_path / "f.jpeg"
    cv2.imwrite(str(path), fundus(200, 300, seed=2))
    p = PreprocessParams(base_size=96)
    out = preprocess_file(path, [48, 64, 96], p)
    assert sorted(out) == [48, 64, 96]
    base = out[96]
    assert base.shape == (96, 96, 3) and base.dtype == np.uint8
    expected = preprocess_image(load_image(path, min_side=96), p)
    assert np.array_equal(base, expected)
    assert np.array_equal(out[48], cv2.resize(base, (48, 48), interpolation=cv2.INTER_AREA))
    area64 = cv2.resize(base, (64, 64), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(out[64] - area64).mean() < 1.0


def test_preprocessing_is_deterministic(tmp_path):
    path = tmp_path / "f.jpeg"
    cv2.imwrite(str(path), fundus(200, 300, seed=5))
    p = PreprocessParams(base_size=64)
    a, b = preprocess_file(path, [32, 64], p), preprocess_file(path, [32, 64], p)
    assert all(np.array_equal(a[s], b[s]) for s in (32, 64))


def test_params_reject_invalid_values():
    with pytest.raises(ValueError):
        PreprocessParams(rho=0)
    with pytest.raises(ValueError):
        PreprocessParams(mask_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# ρ's reference scale


def test_rho_is_in_base_pixels_by_default_and_left_out_of_the_recorded_params():
    p = PreprocessParams()
    assert (p.rho_scale, p.sigma) == ("base", 10.0)  # σ = 10 px at the 720 base (radius 360)
    assert "rho_scale" not in p.to_dict()  # the params of conversions made before it existed
    assert PreprocessParams(**p.to_dict()) == p


@pytest.mark.parametrize(("base", "sigma"), [(720, 12.0), (600, 10.0), (448, 7.4666)])
def test_grahams_scale_gives_rho_at_a_disc_radius_of_300_px(base, sigma):
    # Graham: photographs resized to radius 300 px, blurred with σ = 300 / 30 = 10 px. Here the
    # disc fills the base square (radius base / 2), so σ = 10 · (base / 2) / 300.
    p = PreprocessParams(base_size=base, rho_scale="graham")
    assert p.sigma == pytest.approx(sigma, abs=1e-4)
    assert p.to_dict()["rho_scale"] == "graham"


def test_eq1_blurs_with_the_sigma_of_its_scale():
    square = crop_to_square(fundus(120, 160, seed=8), 160)
    graham = PreprocessParams(base_size=160, mask=False, rho_scale="graham")  # σ = 8/3
    as_base = PreprocessParams(base_size=160, mask=False, rho=10 * 80 / 300)
    ours = graham_normalise(square, graham).astype(int)
    ref = reference_eq1(square, as_base).astype(int)
    assert np.abs(ours - ref).max() <= 1 and np.mean(ours != ref) < 0.01  # float32 rounding
    assert not np.array_equal(
        graham_normalise(square, graham),
        graham_normalise(square, PreprocessParams(base_size=160, mask=False)),
    )


def test_unknown_rho_scale_is_a_usage_error_naming_the_setting():
    with pytest.raises(UsageError) as e:
        PreprocessParams(rho_scale="radius")
    assert e.value.setting == "rho_scale"


# ---------------------------------------------------------------------------------------------
# val and test: kept if it decodes at all


def _jpeg(path, img, keep: float = 1.0):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = buf.tobytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_a_sound_image_is_kept_unflagged_and_exactly_as_the_strict_path_makes_it(tmp_path):
    path = _jpeg(tmp_path / "a.jpeg", fundus(seed=9))
    p = PreprocessParams(base_size=64)
    base, flag = preprocess_bgr_file_kept(path, p)
    assert flag == ""
    np.testing.assert_array_equal(base, preprocess_bgr_file(path, p))


def test_a_truncated_jpeg_is_kept_as_far_as_it_decodes_and_flagged(tmp_path):
    img = fundus(seed=10)
    path = _jpeg(tmp_path / "t.jpeg", img, keep=0.6)
    p = PreprocessParams(base_size=64)
    with pytest.raises(BadImage, match="truncated JPEG"):
        preprocess_bgr_file(path, p)  # train: skipped, as before
    base, flag = preprocess_bgr_file_kept(path, p)
    assert flag == "truncated JPEG" and base.shape == (64, 64, 3)
    # The decoded part is the photograph; what is missing is grey-filled by libjpeg.
    decoded, _ = decode_bgr(path.read_bytes(), None, partial_ok=True)
    top = decoded[:20].astype(int)
    assert np.abs(top - img[:20]).mean() < 3
    assert (decoded[-4:] == 128).all()


def test_an_image_without_a_visible_fundus_is_squared_whole_and_flagged(tmp_path):
    path = _jpeg(tmp_path / "dark.jpeg", np.zeros((96, 128, 3), np.uint8))
    base, flag = preprocess_bgr_file_kept(path, PreprocessParams(base_size=64))
    assert flag == "no fundus visible (all dark)" and base.shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("content", "reason"), [(b"", "empty file"), (b"\xff\xd8\xff", "truncated JPEG")]
)
def test_a_file_with_no_pixels_at_all_is_still_skipped(tmp_path, content, reason):
    path = tmp_path / "x.jpeg"
    path.write_bytes(content)
    with pytest.raises(BadImage) as e:
        preprocess_bgr_file_kept(path, PreprocessParams(base_size=64))
    assert e.value.reason == reason
