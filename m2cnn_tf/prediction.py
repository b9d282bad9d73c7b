"""Grading fundus photographs and explaining the grade: predict.py's library, and the grader's.

Raw images go through `preprocessing.preprocess_file`, the steps data_prep used for the
TFRecords (§II-A, Eq. (1)), with the parameters recorded in the training data's manifest
(`manifest.preprocess_params_for`), so training and prediction cannot drift. Files stream
through a bounded window of worker threads (OpenCV releases the GIL) into batches; each batch
is one call of `Predictor.grade`, which the grader calls on uploads too. A file that cannot be
read or shows no fundus becomes an error row and the stream goes on.

TensorFlow is imported only by a Keras model and by Grad-CAM (ours): with a LiteRT backend,
predict.py and serve.py start without it.
"""

from __future__ import annotations

import collections
import csv
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from m2cnn_tf.backends import runtime_of
from m2cnn_tf.common import IMAGE_EXTENSIONS
from m2cnn_tf.config import NUM_CLASSES
from m2cnn_tf.errors import UsageError, one_line
from m2cnn_tf.metrics import DEFAULT_CUTPOINTS, scores_to_grades
from m2cnn_tf.preprocessing import PreprocessParams, preprocess_file
from m2cnn_tf.tta import make_predict_fn, model_range

CSV_COLUMNS = (
    "path", "grade", "grade_prob", "score", *(f"p{k}" for k in range(NUM_CLASSES)), "error",
)  # fmt: skip
# CSV formula injection (OWASP's rule): a spreadsheet runs a cell that starts with one of these
# as a formula (a file named "=cmd|' /C calc'!A0.jpg"), so such a text cell gets a leading "'".
# Text cells only: the numbers (a negative score) are written as numbers. The grader's page
# applies the same rule to its CSV (static/grader.js, given these two lists).
CSV_TEXT_COLUMNS = ("path", "error")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A text cell, neutralised if a spreadsheet would read it as a formula."""
    return f"'{value}" if value.startswith(FORMULA_PREFIXES) else value


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


# ---------------------------------------------------------------------------------------------
# Streaming prediction


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
        self._gradcam = None
        self._panel_names: set[str] = set()

    def grade(self, images: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
        """predict.py's row for each preprocessed uint8 image of a batch, its name in `path`:
        the one model call that predict.py's files and the grader's uploads both go through."""
        out = self.predict_fn(images)
        return [
            self._row(name, out["score"][i], out["probabilities"][i])
            for i, name in enumerate(names)
        ]

    def rows(
        self, paths: Sequence[Path], *, gradcam_dir: str | Path | None = None, progress=None
    ) -> Iterator[dict[str, Any]]:
        """One row per path, in input order: the grade etc., or an `error` and empty values."""
        if gradcam_dir is not None:
            Path(gradcam_dir).mkdir(parents=True, exist_ok=True)
        batch: list[tuple[Path, np.ndarray | None, str]] = []

        def flush():
            good = [(p, img) for p, img, err in batch if img is not None]
            graded: dict[Path, dict] = {}
            if good:
                images = np.stack([img for _, img in good])
                rows = self.grade(images, [str(p) for p, _ in good])
                cams = self.cams(images) if gradcam_dir is not None else None
                for i, ((path, img), row) in enumerate(zip(good, rows, strict=True)):
                    graded[path] = row
                    if cams is not None:
                        self._write_gradcam(gradcam_dir, path, img, cams[i], row)
            for path, img, err in batch:
                yield graded[path] if img is not None else self._error_row(path, err)
            if progress is not None:
                progress.update(len(batch))
            batch.clear()

        window = 2 * self.batch_size
        for path, img, err in _bounded_map(self.preprocess, paths, self.workers, window):
            batch.append((path, img, "" if err is None else one_line(err)))
            if len(batch) >= self.batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def preprocess(self, path: Path) -> np.ndarray:
        """The model's input for a file (any thread): `preprocessing.preprocess_file`."""
        return preprocess_file(path, [self.image_size], self.params)[self.image_size]

    def _row(self, name: str, score: float, probs: np.ndarray) -> dict[str, Any]:
        return {
            "path": name,
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
    """Stream rows as CSV to a file object, flushing per row; returns (written, failed).
    Text cells are neutralised against formula injection (`csv_text`)."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    written = failed = 0
    for row in rows:
        formatted = {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}
        formatted.update({k: csv_text(str(row[k])) for k in CSV_TEXT_COLUMNS if k in row})
        writer.writerow(formatted)
        out.flush()
        written += 1
        failed += bool(row["error"])
        if row["error"]:
            print(f"error: {row['path']}: {row['error']}", file=sys.stderr)
    return written, failed
