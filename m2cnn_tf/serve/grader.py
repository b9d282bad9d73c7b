"""What the served model says about uploaded photographs: the grader behind serve.py.

A `Grader` holds one loaded model for the server's lifetime. `prepare` turns an upload's bytes
into the model's input with `preprocessing.preprocess_bytes`, the steps predict.py's
`preprocess_file` takes on a file (§II-A's crop, Eq. (1) at `base_size` with the training data's
manifest parameters, the same resize), on any thread; `infer` grades a micro-batch through
predict.py's own `Predictor.grade`, on the model thread only. So a photograph gets the same
grade, score and probabilities from the server as from predict.py.

What `prepare` says about a file that cannot be graded is the reason from our own checks
(`BadImage`, `RefusedImage`); any other failure (a decoder's own exception, whose text may name
its build paths and version) becomes a fixed reason, and its full text goes to the server's log.

Ours (the paper serves nothing): every model call is padded with black images to `max_batch`.
On the CPU, oneDNN picks kernels by batch shape and the outputs then differ in the last bits
(about 1e-8); one fixed shape makes a photograph's numbers independent of whatever else arrived
with it, so a result never depends on the server's load.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from m2cnn_tf import checkpoints, manifest
from m2cnn_tf.backends import load_backend, load_keras, runtime_of
from m2cnn_tf.common import finite_or_none
from m2cnn_tf.decoding import BadImage
from m2cnn_tf.errors import one_line
from m2cnn_tf.prediction import Predictor
from m2cnn_tf.preprocessing import Preprocessed, PreprocessParams, preprocess_bytes
from m2cnn_tf.serve import image_headers
from m2cnn_tf.serve.guard import describe

log = logging.getLogger("m2cnn_tf.serve")
# The International Clinical DR Severity Scale, grades 0-4 (§III-A, Kaggle's labels).
GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
NOTICE = "research use only, not a medical device"
UNDECODABLE = "the image could not be decoded"
MB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One upload made ready for the model: its input image, or the reason it has none."""

    filename: str
    image: np.ndarray | None  # uint8 S×S×3 RGB, the model's input
    error: str | None
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Job:
    """One image for a micro-batch, and whether its Grad-CAM panel is wanted."""

    image: np.ndarray
    gradcam: bool = False


def quality_warnings(
    found: Preprocessed, info: image_headers.ImageInfo, size: int
) -> tuple[str, ...]:
    """What may make a grade less trustworthy although the photograph could be graded."""
    warnings = []
    if info.grayscale:
        warnings.append("grayscale photograph: the model was trained on colour photographs")
    if (info.bit_depth or 8) > 8:
        warnings.append(f"{info.bit_depth}-bit image, reduced to 8 bits per channel")
    w, h = found.decoded_size
    x0, y0, x1, y1 = found.disc
    if (x0, y0, x1, y1) == (0, 0, w, h):
        warnings.append(
            "no clear fundus: no dark border around a disc was found, so the whole frame "
            "was graded as the fundus"
        )
    across = round(max(x1 - x0, y1 - y0) * info.width / w)  # in the original's pixels
    if across < size:
        warnings.append(f"low resolution: the fundus is {across} px across, enlarged to {size} px")
    return tuple(warnings)


class Grader:
    """One loaded model, predict.py's Predictor around it, and the facts of the model panel."""

    def __init__(
        self,
        model,
        meta: dict[str, Any],
        params: PreprocessParams,
        params_source: str,
        *,
        model_dir: str | Path,
        stage: int,
        cutpoints: Sequence[float] | None = None,
        max_batch: int = 8,
        max_pixels: int = image_headers.MAX_PIXELS,
        max_decode_bytes: int | None = None,
    ):
        self.model, self.meta = model, meta
        self.params, self.params_source = params, params_source
        self.model_dir, self.stage = Path(model_dir), stage
        self.backend = getattr(model, "kind", "keras")
        self.max_batch, self.max_pixels = max_batch, max_pixels
        self.max_decode_bytes = max_decode_bytes  # a decoding thread's share of the budget
        self.size = runtime_of(model)[1]
        self.predictor = Predictor(
            model,
            params,
            batch_size=max_batch,
            gradcam_model=lambda: load_keras(model_dir, stage).model,
            **({"cutpoints": cutpoints} if cutpoints else {}),
        )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        stage: int,
        *,
        backend: str = "keras",
        litert_model: str | None = None,
        threads: int | None = None,
        precision: str = "float32",
        force_precision: bool = False,
        data_dir: str | None = None,
        **kw,
    ) -> Grader:
        """Load a stage's best checkpoint (or its LiteRT export) and its training data's
        preprocessing parameters."""
        model = load_backend(
            backend, model_dir=model_dir, stage=stage, litert_model=litert_model, threads=threads,
            precision=precision, force_precision=force_precision,
        )  # fmt: skip
        params, source = manifest.preprocess_params_for(model_dir, stage, data_dir)
        meta = checkpoints.read_meta(model_dir, stage)
        return cls(model, meta, params, source, model_dir=model_dir, stage=stage, **kw)

    # -----------------------------------------------------------------------------------------
    # Any thread

    def prepare(self, filename: str, data: bytes | bytearray) -> Prepared:
        """Check the header (type by content, size and decoding cost before decoding), decode,
        preprocess."""
        try:
            info = image_headers.inspect(data, self.max_pixels)
            self._check_cost(info)
            found = preprocess_bytes(data, [self.size], self.params)  # refuses a cut-off file
        except (BadImage, image_headers.RefusedImage) as err:  # our own reasons: one bad file
            return Prepared(filename, None, one_line(err))
        except Exception as err:  # a decoder's own (or out of memory): no server detail out
            log.warning("an upload could not be decoded: %s", describe(err))
            return Prepared(filename, None, UNDECODABLE)
        warnings = quality_warnings(found, info, self.size)
        return Prepared(filename, found.images[self.size], None, warnings)

    def _check_cost(self, info: image_headers.ImageInfo) -> None:
        cost, limit = image_headers.decode_bytes(info), self.max_decode_bytes
        if limit is not None and cost > limit:
            raise image_headers.RefusedImage(
                f"image too costly to decode: about {cost / MB:.0f} MB for its {info.width} × "
                f"{info.height} px, over this server's {limit / MB:.0f} MB per image (refused "
                "before decoding)"
            )

    # -----------------------------------------------------------------------------------------
    # The model thread only

    def infer(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """predict.py's rows for up to `max_batch` images, in one model call of fixed shape,
        each with its Grad-CAM panel (`gradcam_png`, base64) when asked for."""
        if not 0 < len(jobs) <= self.max_batch:
            raise ValueError(f"a batch holds 1 to {self.max_batch} images, got {len(jobs)}")
        pad = np.zeros_like(jobs[0].image)
        batch = np.stack([job.image for job in jobs] + [pad] * (self.max_batch - len(jobs)))
        rows = self.predictor.grade(batch, [""] * self.max_batch)[: len(jobs)]
        if any(job.gradcam for job in jobs):
            cams = self.predictor.cams(batch)
            for row, job, cam in zip(rows, jobs, cams, strict=False):
                if job.gradcam:
                    row["gradcam_png"] = _panel_png(job.image, cam)
        return rows

    def warm_up(self) -> None:
        """Trace the model call once, so that the first request is not slow; with Keras also
        Grad-CAM (a LiteRT grader loads the Keras model only when a panel is first asked for)."""
        grey = np.full((self.size, self.size, 3), 128, np.uint8)
        self.infer([Job(grey, gradcam=self.backend == "keras")])

    # -----------------------------------------------------------------------------------------
    # The model panel

    def facts(self) -> dict[str, Any]:
        """Stage, resolution, preset, val kappa and date (best.json), the training data."""
        meta = self.meta
        metric = meta.get("best_metric", "val_kappa_scores")
        best_json = checkpoints.stage_dir(self.model_dir, self.stage) / checkpoints.BEST_META
        date = None
        if best_json.is_file():
            mtime = best_json.stat().st_mtime
            date = datetime.datetime.fromtimestamp(mtime, datetime.UTC).isoformat(
                timespec="seconds"
            )
        return {
            "stage": meta.get("stage", self.stage),
            "resolution": meta.get("resolution", self.size),
            "preset": meta.get("preset"),
            "multi_cell_path": meta.get("multi_cell_path"),
            "epoch": meta.get("epoch"),
            "val_kappa": finite_or_none(meta.get(metric)),
            "val_kappa_metric": metric,
            "date": date,
            "backend": self.backend,
            "cutpoints": list(self.predictor.cutpoints),
            "preprocessing": {**self.params.to_dict(), "source": self.params_source},
            "training_data": manifest.summary(self.params_source),
            "grades": list(GRADE_NAMES),
            "notice": NOTICE,
        }


def _panel_png(rgb: np.ndarray, cam: np.ndarray) -> str:
    """Base64 PNG: the preprocessed image beside its Grad-CAM overlay (predict.py's panel,
    without the caption: the page and the JSON carry the grade)."""
    from m2cnn_tf.gradcam import overlay

    panel = np.concatenate([rgb, overlay(rgb, cam)], axis=1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cannot encode the Grad-CAM panel")
    return base64.b64encode(png.tobytes()).decode("ascii")
