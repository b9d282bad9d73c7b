"""Grading new fundus photographs, explaining the grade, and exporting a serving model.

Raw images go through `preprocessing.preprocess_file`, the very function data_prep used for the
TFRecords (§II-A, Eq. (1)), with the parameters recorded in the training data's manifest, so
training and prediction cannot drift. Files stream through a bounded window of worker threads
(OpenCV releases the GIL) into batches for one compiled model call each; a file that cannot be
read or shows no fundus becomes an error row and the stream goes on.

TensorFlow is imported only by a Keras model and by Grad-CAM (ours): with a LiteRT backend,
predict.py and serve.py start without it.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from m2cnn_tf.backends import runtime_of
from m2cnn_tf.common import CONFIG, IMAGE_EXTENSIONS, stage_dir
from m2cnn_tf.config import NUM_CLASSES
from m2cnn_tf.errors import UsageError, one_line
from m2cnn_tf.metrics import DEFAULT_CUTPOINTS, scores_to_grades
from m2cnn_tf.preprocessing import PreprocessParams, preprocess_file
from m2cnn_tf.tta import make_predict_fn, model_range

CSV_COLUMNS = (
    "path", "grade", "grade_prob", "score", *(f"p{k}" for k in range(NUM_CLASSES)), "error",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and every image file under each folder (recursive, sorted).

    A path that does not exist is kept, so that it becomes an error row like any bad file.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                )
            )
        else:
            paths.append(path)
    return paths


def preprocess_params_for(
    model_dir: str | Path, stage: int, data_dir: str | None = None
) -> tuple[PreprocessParams, str]:
    """The PreprocessParams the training data was made with, and where they came from.

    Looked up in DATA/manifest.json, DATA being `data_dir` or the `data` of the stage's
    config.json (train.py saves it); the defaults of `PreprocessParams` (the paper's Eq. (1)
    constants) otherwise. A file that is there but unreadable is a UsageError.
    """
    if data_dir is None:
        config_path = stage_dir(model_dir, stage) / CONFIG
        if config_path.is_file():
            data_dir = _read_json(config_path, "model_dir").get("data") or None
    if data_dir:
        manifest = Path(data_dir) / "manifest.json"
        if manifest.is_file():
            values = _find_params(_read_json(manifest, "data"))
            if values is not None:
                known = PreprocessParams.__dataclass_fields__
                params = PreprocessParams(**{k: v for k, v in values.items() if k in known})
                return params, str(manifest)
    return PreprocessParams(), "defaults (no manifest.json of the training data found)"


def _read_json(path: Path, setting: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}", setting=setting) from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} does not hold a JSON object", setting=setting)
    return value


def _find_params(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing block of a manifest: under a 'preprocess*' key, possibly nested."""
    for key, value in manifest.items():
        if isinstance(value, dict):
            if key.startswith("preprocess") and "alpha" in value:
                return value
            found = _find_params(value)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------
# Streaming prediction


def _preprocess_one(path: Path, size: int, params: PreprocessParams) -> np.ndarray:
    return preprocess_file(path, [size], params)[size]


def _bounded_map(fn: Callable, items: Sequence, workers: int, window: int) -> Iterator[tuple]:
    """(item, result, error) in input order, with at most `window` items in flight."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: collections.deque[tuple[Any, Future]] = collections.deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                break
        while pending:
            item, future = pending.popleft()
            try:
                yield item, future.result(), None
            except Exception as err:  # one bad file must never stop the stream
                yield item, None, err
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))


class Predictor:
    """A loaded model ready to grade raw fundus images (optionally with Grad-CAM panels).

    `model`: a Keras model or a `backends.Backend` (Keras or LiteRT). Grad-CAM panels need
    the Keras model: a LiteRT predictor loads it through `gradcam_model` when first asked.
    `cutpoints`: the four score cut points (rounding by default; evaluate.py's report.json has
    fitted ones).
    """

    def __init__(
        self,
        model,
        params: PreprocessParams,
        *,
        tta: str = "none",
        cutpoints: Sequence[float] = DEFAULT_CUTPOINTS,
        batch_size: int = 16,
        workers: int | None = None,
        preprocess: Callable[[Path], np.ndarray] | None = None,
        gradcam_model: Callable[[], Any] | None = None,
    ):
        if batch_size < 1:
            raise UsageError(f"must be positive, got {batch_size}", setting="batch_size")
        if len(cutpoints) != len(DEFAULT_CUTPOINTS):
            raise UsageError(
                f"needs {len(DEFAULT_CUTPOINTS)} numbers, got {len(cutpoints)}", setting="cutpoints"
            )
        call, self.image_size, self.model = runtime_of(model)
        self._gradcam_model = gradcam_model
        self.params = params
        self.cutpoints = tuple(sorted(float(c) for c in cutpoints))
        self.batch_size = batch_size
        self.workers = workers or min(4, os.cpu_count() or 1)
        # uint8 batches in; scaling, TTA views and their mean around one model call per batch.
        self.predict_fn = make_predict_fn(call, tta)
        self.preprocess = preprocess or (lambda p: _preprocess_one(p, self.image_size, params))
        self._gradcam = None
        self._panel_names: set[str] = set()

    def rows(
        self, paths: Sequence[Path], *, gradcam_dir: str | Path | None = None, progress=None
    ) -> Iterator[dict[str, Any]]:
        """One row per path, in input order: the grade etc., or an `error` and empty values."""
        if gradcam_dir is not None:
            Path(gradcam_dir).mkdir(parents=True, exist_ok=True)
        window = 2 * self.batch_size
        batch: list[tuple[Path, np.ndarray | None, str]] = []

        def flush():
            good = [(p, img) for p, img, err in batch if img is not None]
            outputs: dict[Path, dict] = {}
            if good:
                images = np.stack([img for _, img in good])
                out = self.predict_fn(images)
                cams = self.cams(images) if gradcam_dir is not None else None
                for i, (path, img) in enumerate(good):
                    outputs[path] = self._row(path, out["score"][i], out["probabilities"][i])
                    if cams is not None:
                        self._write_gradcam(gradcam_dir, path, img, cams[i], outputs[path])
            for path, img, err in batch:
                yield outputs[path] if img is not None else self._error_row(path, err)
            if progress is not None:
                progress.update(len(batch))
            batch.clear()

        for path, img, err in _bounded_map(self.preprocess, paths, self.workers, window):
            batch.append((path, img, "" if err is None else one_line(err)))
            if len(batch) >= self.batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def _row(self, path: Path, score: float, probs: np.ndarray) -> dict[str, Any]:
        return {
            "path": str(path),
            "grade": int(scores_to_grades([score], self.cutpoints)[0]),
            "grade_prob": int(np.argmax(probs)),
            "score": float(score),
            **{f"p{k}": float(p) for k, p in enumerate(probs)},
            "error": "",
        }

    @staticmethod
    def _error_row(path: Path, error: str) -> dict[str, Any]:
        return {**dict.fromkeys(CSV_COLUMNS, ""), "path": str(path), "error": error}

    def cams(self, images: np.ndarray) -> np.ndarray:
        """Grad-CAM maps of a uint8 batch (loads the Keras model first if this has none)."""
        from m2cnn_tf.gradcam import GradCam

        if self._gradcam is None:
            if self.model is None and self._gradcam_model is None:
                raise UsageError("Grad-CAM needs the Keras model; this predictor has none")
            if self.model is None:
                self.model = self._gradcam_model()
            self._gradcam = GradCam(self.model)
        return self._gradcam.cams(model_range(images))

    def _write_gradcam(self, out_dir, path: Path, rgb: np.ndarray, cam, row) -> None:
        from m2cnn_tf.gradcam import write_panel

        caption = f"{path.name}: grade {row['grade']} (score {row['score']:.2f})"
        name, n = f"{path.stem}_gradcam.png", 1
        while name in self._panel_names:  # same stem from another folder or extension
            n += 1
            name = f"{path.stem}_gradcam_{n}.png"
        self._panel_names.add(name)
        write_panel(Path(out_dir) / name, rgb, cam, caption)


def write_rows(rows: Iterable[dict[str, Any]], out) -> tuple[int, int]:
    """Stream rows as CSV to a file object, flushing per row; returns (written, failed)."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    written = failed = 0
    for row in rows:
        formatted = {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}
        writer.writerow(formatted)
        out.flush()
        written += 1
        failed += bool(row["error"])
        if row["error"]:
            print(f"error: {row['path']}: {row['error']}", file=sys.stderr)
    return written, failed
