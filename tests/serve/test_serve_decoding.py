"""The grader's view of a file's size and cost, and the decoders' own: the header check reads a
JPEG's markers as libjpeg does and refuses what libtiff and others would read differently, counts
scans and decoding memory; in serve.py's process, OpenCV and Pillow refuse over 50 MP themselves,
each by its own reading of the file; a decoder's own error never reaches a client.

References: libjpeg itself (OpenCV's reduced decode gives its view of the size), the formats'
specifications, and sizes worked out by hand.
"""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from _attacks import BIG, jpeg_hidden_frame, jpeg_with_scans, tiff_repeated_size
from _served import PARAMS
from _subprocess import run_json_script

from m2cnn_tf.serve import grader as grader_module
from m2cnn_tf.serve import image_headers
from m2cnn_tf.serve.grader import UNDECODABLE, Grader
from m2cnn_tf.serve.image_headers import ImageInfo, RefusedImage, decode_bytes, inspect


def test_jpeg_markers_are_read_where_libjpeg_reads_them():
    data = jpeg_hidden_frame()
    info = inspect(data, max_pixels=10**9)
    reduced = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    assert (info.width, info.height) == BIG
    assert -(-BIG[0] // 8) == reduced.shape[1] and -(-BIG[1] // 8) == reduced.shape[0]
    with pytest.raises(RefusedImage, match="7300 × 7124 px"):
        inspect(data)


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding():
    grey = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    ok, progressive = cv2.imencode(".jpeg", grey, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    info = inspect(progressive.tobytes())
    assert info.progressive and info.scans == progressive.tobytes().count(b"\xff\xda") > 1
    assert inspect(jpeg_with_scans(progressive.tobytes(), 64)).scans == 64
    with pytest.raises(RefusedImage, match="JPEG with 65 scans, over the limit of 64"):
        inspect(jpeg_with_scans(progressive.tobytes(), 65))


def test_tiff_size_tags_that_repeat_are_refused_and_arrays_are_read():
    with pytest.raises(RefusedImage, match="tag 256 is repeated"):
        inspect(tiff_repeated_size())
    ok, rgb16 = cv2.imencode(".tiff", np.zeros((20, 30, 3), np.uint16))  # BitsPerSample: 3 values
    assert ok
    info = inspect(rgb16.tobytes())
    assert (info.width, info.height, info.channels, info.bit_depth) == (30, 20, 3, 16)


@pytest.mark.parametrize(
    "info, expected",
    [
        (ImageInfo("png", 1000, 1000, 3, 8), 3_000_000 + 750_000),  # decoded, reduced copy
        (ImageInfo("png", 1000, 1000, 1, 8), 1_000_000 + 3_000_000 + 750_000),  # + BGR copy
        (ImageInfo("png", 1000, 1000, 4, 16), 8_000_000 + 3_000_000 + 750_000),
        (ImageInfo("jpeg", 1000, 1000, 3, 8), 3_000_000),
        (ImageInfo("jpeg", 1000, 1000, 3, 8, progressive=True), 3_000_000 + 6_000_000),
    ],
)
def test_decoding_memory_from_the_header(info, expected):
    assert decode_bytes(info) == expected


def test_a_photograph_too_costly_for_a_decoding_threads_share_is_refused(tmp_path):
    grader = Grader.__new__(Grader)  # prepare() needs no model
    grader.max_pixels, grader.max_decode_bytes = image_headers.MAX_PIXELS, 1_000_000
    grader.size, grader.params = 96, PARAMS
    png = cv2.imencode(".png", np.zeros((600, 600, 3), np.uint8))[1]  # 1.35 MB to decode
    prepared = grader.prepare("big.png", png.tobytes())
    assert prepared.image is None and prepared.error.startswith("image too costly to decode")


def test_a_decoders_own_error_reaches_the_log_not_the_client(monkeypatch, caplog):
    grader = Grader.__new__(Grader)
    grader.max_pixels, grader.max_decode_bytes = image_headers.MAX_PIXELS, None
    grader.size, grader.params = 96, PARAMS
    leak = "OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:79: error: (-215)"

    def fails(*args, **kw):
        raise cv2.error(leak)

    monkeypatch.setattr(grader_module, "preprocess_bytes", fails)
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1]
    with caplog.at_level(logging.WARNING, logger="m2cnn_tf.serve"):
        prepared = grader.prepare("a.png", png.tobytes())
    assert prepared.error == UNDECODABLE and leak in caplog.text


_DECODERS = """
import json, os, sys
os.environ.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)  # whatever this test's process holds
if serving:
    from m2cnn_tf.commands.serve import limit_decoders
    limit_decoders()  # what serve.py's process does before it loads anything else
import cv2, numpy as np
sys.path.insert(0, "tests/serve")
from _attacks import jpeg_hidden_frame, tiff_plain, tiff_repeated_size
from m2cnn_tf import decoding

def outcome(data, **patches):
    saved = {k: getattr(decoding, k) for k in patches}
    for k, v in patches.items():
        setattr(decoding, k, v)
    try:
        decoding.decode_bgr(data, 256)
        return "decoded"
    except decoding.BadImage as err:
        return err.reason
    except Exception as err:
        return "leaked " + type(err).__name__
    finally:
        for k, v in saved.items():
            setattr(decoding, k, v)

plain = tiff_plain(7300, 7124)
out = {"limit": decoding.pixel_limit(), "plain_tiff": outcome(plain)}
try:
    cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_UNCHANGED)
    out["opencv_itself"] = "decoded"
except cv2.error:
    out["opencv_itself"] = "refused"
if serving:
    out["tiff_repeated_size"] = outcome(tiff_repeated_size())
    out["tiff_1.6_gigapixels"] = outcome(tiff_repeated_size((40000, 40000)))
    out["jpeg_hidden_frame"] = outcome(jpeg_hidden_frame())
    # Each layer alone, the others fooled: Pillow's reading of the size ...
    out["pillow_fooled_opencv_full"] = outcome(plain, _image_size=lambda data: None)
    out["pillow_fooled_libjpeg_reduced"] = outcome(
        jpeg_hidden_frame(), _image_size=lambda data: (4096, 4096))
    # ... and OpenCV's decode, as when it cannot decode a file that Pillow then does
    out["opencv_fooled_pillow"] = outcome(
        plain, _image_size=lambda data: None, _imdecode=lambda buf, flags: None)
print(json.dumps(out))
"""


def test_in_serve_pys_process_the_decoders_refuse_over_50_megapixels_themselves():
    """Each layer alone refuses the 52 MP files: Pillow's view of the size, OpenCV's own limit
    (set before cv2 loads), libjpeg's view after a reduced decode, Pillow's decode; in a process
    without serve.py's setting (predict.py's) the same plain TIFF decodes, at OpenCV's default."""
    over = "over the decoder's limit of 50 megapixels"
    served = run_json_script("serving = True\n" + _DECODERS, timeout=300)
    assert served.pop("limit") == 50_000_000 and served.pop("opencv_itself") == "refused"
    assert all(over in reason for reason in served.values()), json.dumps(served, indent=1)
    assert served["plain_tiff"] == f"image too large: 7300 × 7124 px, {over}"
    plain = run_json_script("serving = False\n" + _DECODERS, timeout=300)
    assert plain == {"limit": 2**30, "plain_tiff": "decoded", "opencv_itself": "decoded"}
