"""Evaluate a trained stage on a split: the paper's two test methods and the clinical view.

§III-A "Evaluation Metric" and Table II/III: the quadratic weighted kappa, read two ways. The
steps, each in the module named for it:
1. load the stage's best checkpoint, or its LiteRT export (`backends`);
2. predict the split's TFRecords, with optional TTA (`predict_split`, `tta`);
3. fit cut points and eye blending on val, if asked, and apply them (`calibration`);
4. compute the figures (`metrics`);
5. write report.json, predictions.csv and the plots (`reports`).
Anything fitted is fitted on val and applied to the evaluated split; when that split is val
itself the figures are optimistic, and report.json says so. report.json also says how many
images were graded against how many the split's source lists (data_prep's manifest.json), and
which are missing: a kappa over fewer images than the paper's is not comparable with it, and
the evaluation warns when the numbers differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from m2cnn_tf import backends, checkpoints, data, manifest
from m2cnn_tf.calibration import BLEND_METHOD, Calibration, fit_calibration
from m2cnn_tf.errors import M2cnnError, UsageError, one_line
from m2cnn_tf.metrics import Predictions, evaluate_predictions
from m2cnn_tf.reports import write_report
from m2cnn_tf.tta import ModelCall, check_tta, make_predict_fn


def _text(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(values)])


def predict_dataset(
    call: ModelCall, dataset: tf.data.Dataset, *, tta: str = "none", progress=None
) -> Predictions:
    """Run a runtime's call (`backends.runtime_of`) over a `data.make_dataset(...,
    training=False)` dataset of (images, meta), in record order, each batch through
    `tta.make_predict_fn`; `progress` (a tqdm bar, say) is advanced by each batch's size."""
    predict = make_predict_fn(call, tta)
    parts: dict[str, list] = {k: [] for k in ("id", "patient", "eye", "grade", "score", "probs")}
    for images, meta in dataset:
        out = predict(images)
        parts["score"].append(out["score"])
        parts["probs"].append(out["probabilities"])
        for key in ("id", "patient", "eye", "grade"):
            parts[key].append(meta[key].numpy())
        if progress is not None:
            progress.update(int(images.shape[0]))
    if not parts["score"]:
        raise UsageError("the dataset is empty: nothing to predict")
    return Predictions(
        ids=_text(np.concatenate(parts["id"])),
        patients=_text(np.concatenate(parts["patient"])),
        eyes=_text(np.concatenate(parts["eye"])),
        grades=np.concatenate(parts["grade"]).astype(np.int64).ravel(),
        scores=np.concatenate(parts["score"]).astype(np.float64).ravel(),
        probs=np.concatenate(parts["probs"]).astype(np.float64),
    )


def predict_split(
    call: ModelCall, data_dir: str | Path, image_size: int, split: str, *, tta: str,
    batch_size: int,
) -> tuple[Predictions, list[str]]:  # fmt: skip
    """Predict one split of data_prep's TFRecords (read as the training pipeline reads them)
    through a runtime's call (`backends.runtime_of`); returns the predictions and the shards
    read. Records that cannot be read are a UsageError."""
    try:
        shards = data.split_files(data_dir, image_size, split)
        dataset = data.make_dataset(
            str(data_dir), image_size, split, batch_size=batch_size, training=False
        )
        with tqdm(desc=f"{split}@{image_size}", unit="img", leave=False) as bar:
            return predict_dataset(call, dataset, tta=tta, progress=bar), shards
    except M2cnnError:
        raise
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise UsageError(
            f"cannot read the {split} records in {data_dir}: {one_line(err)}", setting="data"
        ) from None


def _calibrate(
    call: ModelCall, data_dir, image_size: int, split: str, preds: Predictions, *,
    fit_thresholds: bool, per_patient: bool, tta: str, batch_size: int,
) -> Calibration:  # fmt: skip
    """Step 3: fit on val (predicting it unless it is the evaluated split), or change nothing."""
    if not (fit_thresholds or per_patient):
        return Calibration()
    if split == "val":
        val = preds
    else:
        val, _ = predict_split(call, data_dir, image_size, "val", tta=tta, batch_size=batch_size)
    return fit_calibration(val, fit_thresholds=fit_thresholds, per_patient=per_patient)


def _checkpoint_record(model_dir, stage: int, which: str) -> dict[str, Any]:
    """Which checkpoint was evaluated: report.json's "checkpoint" (best or last, its path, and
    its best.json / last.json)."""
    return {
        "model_dir": str(Path(model_dir).resolve()),
        "which": which,
        "path": str(checkpoints.checkpoint_path(model_dir, stage, which).resolve()),
        "meta": checkpoints.read_meta(model_dir, stage, which),
    }


def _calibration_record(cal: Calibration, fit_thresholds: bool, split: str) -> dict[str, Any]:
    """What was fitted on val, as report.json records it."""
    return {
        "thresholds": "fit on val" if fit_thresholds else "rounding",
        "per_patient": {
            "enabled": cal.per_patient,
            "weight_score": cal.blend_score,
            "weight_prob": cal.blend_prob,
            "method": BLEND_METHOD,
        },
        "fitted_on_evaluated_split": split == "val" and (fit_thresholds or cal.per_patient),
    }


def completeness_record(
    data_dir: str | Path, split: str, preds: Predictions, log=print
) -> dict[str, Any]:
    """report.json's `n_images`, `n_expected` (None without a manifest), `missing_ids`,
    `flagged` (graded, but kept by data_prep although imperfect), `n_excluded` (left out by the
    dataset's protocol, e.g. ungradable) and `dataset` (a published set's name, or None); a
    one-line warning through `log` when the split's source lists another number of images than
    were graded."""
    found = manifest.completeness(data_dir, split, (str(i) for i in preds.ids))
    n_images = len(preds)
    if found.n_expected is not None and n_images != found.n_expected:
        log(
            f"warning: evaluated {n_images} {split} images, but the split's source lists "
            f"{found.n_expected} ({len(found.missing)} known missing, by id in report.json's "
            "missing_ids); this kappa is not comparable with one over the whole split"
        )
    return {
        "n_images": n_images,
        "n_expected": found.n_expected,
        "missing_ids": found.missing,
        "flagged": found.flagged,
        "n_excluded": found.excluded,
        "dataset": found.dataset,
    }


def run_evaluation(
    model_dir: str | Path,
    stage: int,
    data_dir: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    fit_thresholds: bool = False,
    tta: str = "none",
    per_patient: bool = False,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
    backend: str = "keras",
    litert_model: str | Path | None = None,
    threads: int | None = None,
    precision: str = "float32",
    force_precision: bool = False,
    checkpoint: str = "best",
    log=print,
    models: backends.KerasModels | None = None,
) -> dict[str, Any]:
    """Evaluate a stage's best (or last) checkpoint (on `backend`: the Keras model, or its
    LiteRT export) on a split, write the report files into `out_dir` and return report.json's
    content; warnings go through `log`. `models`: built Keras models to load the checkpoint
    into (reproduce.py's evaluations)."""
    check_tta(tta)
    if batch_size < 1:
        raise UsageError(f"must be positive, got {batch_size}", setting="batch_size")
    runtime = backends.load_backend(
        backend, model_dir=model_dir, stage=stage, litert_model=litert_model, threads=threads,
        precision=precision, force_precision=force_precision, checkpoint=checkpoint,
        models=models,
    )  # fmt: skip
    call, image_size, _ = backends.runtime_of(runtime)
    preds, shards = predict_split(call, data_dir, image_size, split, tta=tta, batch_size=batch_size)
    calibration = _calibrate(
        call, data_dir, image_size, split, preds, fit_thresholds=fit_thresholds,
        per_patient=per_patient, tta=tta, batch_size=batch_size,
    )  # fmt: skip
    final = calibration.apply(preds)
    report = evaluate_predictions(final, calibration.cutpoints, n_boot=n_boot, seed=seed)
    report.update(
        split=split,
        image_size=image_size,
        stage=stage,
        checkpoint=_checkpoint_record(model_dir, stage, checkpoint),
        data={"dir": str(Path(data_dir).resolve()), "shards": shards},
        tta=tta,
        backend=runtime.describe(),
        **_calibration_record(calibration, fit_thresholds, split),
        **completeness_record(data_dir, split, preds, log),
    )
    write_report(out_dir, report, final, {"score_own": preds.scores} if per_patient else None)
    return report
