"""What to convert: labelled image lists from the Kaggle layout or any folder + CSV.

A listing is the validated, split-assigned list of images plus every input rejected before
decoding (missing file, bad grade, duplicate id) with its reason. Decoding problems are found
later, per image, by the converter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from m2cnn_tf.common import IMAGE_EXTENSIONS, SPLITS
from m2cnn_tf.errors import UsageError, one_line

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclasses.dataclass(frozen=True)
class Item:
    split: str
    image_id: str
    path: str
    grade: int
    patient: str
    eye: str


@dataclasses.dataclass(frozen=True)
class Skip:
    image_id: str
    path: str
    reason: str
    split: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Row:
    """One label row before validation; `patient` and `eye` override the id-derived ones."""

    split: str
    image_id: str
    grade: str
    path: str
    patient: str | None = None
    eye: str | None = None


@dataclasses.dataclass
class Listing:
    items: list[Item]
    skipped: list[Skip]
    source: dict  # what was read (paths, CSV checksums): goes into the manifest
    options: dict  # listing choices that change the output (split rule, seed)
    notes: list[str] = dataclasses.field(default_factory=list)
    # Left out by the dataset's own protocol (an ungradable image), not because it is bad:
    # counted in the manifest, and not among the images a split is expected to hold.
    excluded: list[Skip] = dataclasses.field(default_factory=list)
    dataset: dict | None = None  # a published set's name, licence note and citation


# ---------------------------------------------------------------------------------------------
# CSV and validation


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_labels(
    path: str | os.PathLike, required: Sequence[str], setting: str | None = None
) -> pd.DataFrame:
    """The CSV as strings (nothing coerced), or UsageError naming the missing columns;
    `setting` names where the path came from."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file not found: {path}", setting=setting)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        message = f"cannot read {path} as CSV: {one_line(e)}"
        raise UsageError(message, setting=setting) from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UsageError(
            f"{path} lacks required column(s) {', '.join(repr(c) for c in missing)}; "
            f"it has: {', '.join(df.columns) or 'none'}"
        )
    return df


def parse_grade(text: str) -> int | str:
    """The grade 0–4, or the reason it is unusable ("2.0" counts as 2)."""
    text = text.strip()
    if not text:
        return "missing grade"
    try:
        value = float(text)
    except ValueError:
        return f"grade {text!r} is not an integer"
    if not math.isfinite(value) or value != int(value):
        return f"grade {text!r} is not an integer"
    if not 0 <= value <= 4:
        return f"grade {text!r} is outside 0–4"
    return int(value)


def validate(rows: Iterable[Row]) -> tuple[list[Item], list[Skip]]:
    """Rows → items, rejecting duplicates, bad grades and missing files, each with a reason.

    A duplicated id keeps its first row when every copy has the same grade; with conflicting
    grades no copy can be trusted, so all are skipped.
    """
    from m2cnn_tf.records import split_id  # TensorFlow: the parent needs it anyway

    rows = list(rows)
    by_id: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_id[row.image_id].append(row)
    items: list[Item] = []
    skipped: list[Skip] = []
    for row in rows:
        copies = by_id[row.image_id]
        reason = ""
        if len(copies) > 1:
            grades = {str(parse_grade(c.grade)) for c in copies}
            if len(grades) > 1:
                reason = f"duplicate id with conflicting grades ({len(copies)} rows)"
            elif row is not copies[0]:
                reason = "duplicate id (first row kept)"
        grade = parse_grade(row.grade)
        if not reason and isinstance(grade, str):
            reason = grade
        if not reason and not row.path:
            reason = "missing file"
        if not reason and not os.path.isfile(row.path):
            reason = "missing file"
        if reason:
            skipped.append(Skip(row.image_id, row.path, reason, row.split))
            continue
        patient, eye = split_id(row.image_id)
        patient, eye = row.patient or patient, eye if row.eye is None else row.eye
        items.append(Item(row.split, row.image_id, row.path, int(grade), patient, eye))
    return items, skipped


def assign_by_patient(items: list[Item], fractions: dict[str, float], seed: int) -> list[Item]:
    """Re-split items so every patient's images (both eyes) land in one split.

    Patients are shuffled with `seed` and cut in the order of `fractions`; the first split
    takes the rounding remainder. Deterministic for a given item set and seed.
    """
    patients = sorted({it.patient for it in items})
    order = np.random.default_rng(seed).permutation(len(patients))
    names = list(fractions)
    counts = {n: round(fractions[n] * len(patients)) for n in names[1:]}
    for n in names[1:]:  # a requested split gets at least one patient when there are enough
        if fractions[n] > 0 and counts[n] == 0 and len(patients) > len(names):
            counts[n] = 1
    counts[names[0]] = len(patients) - sum(counts.values())
    where: dict[str, str] = {}
    start = 0
    for name in names:
        for i in order[start : start + counts[name]]:
            where[patients[i]] = name
        start += counts[name]
    return [dataclasses.replace(it, split=where[it.patient]) for it in items]


# ---------------------------------------------------------------------------------------------
# Kaggle EyePACS


def kaggle_listing(
    kaggle_dir: str | os.PathLike, val_from_train: float | None, seed: int
) -> Listing:
    """§III-A splits: train = trainLabels.csv; val = solution Usage=Public; test = Private.

    With `val_from_train`, val is carved from train by patient instead, and the Public rows are
    left out so that test stays the Private set the paper reports on.
    """
    root = Path(kaggle_dir).resolve()
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", setting="kaggle_dir")
    train_csv = root / "trainLabels.csv"
    if not train_csv.is_file():
        raise UsageError(f"{root} has no trainLabels.csv", setting="kaggle_dir")
    if val_from_train is not None and not 0 < val_from_train < 1:
        raise UsageError(f"must be between 0 and 1, got {val_from_train}", setting="val_from_train")
    train = read_labels(train_csv, ["image", "level"])
    source = {"kind": "kaggle", "kaggle_dir": str(root), "csv": {}}
    source["csv"]["trainLabels.csv"] = sha256_file(train_csv)
    rows = [
        Row("train", i.strip(), g, str(root / "train" / f"{i.strip()}.jpeg"))
        for i, g in zip(train["image"], train["level"], strict=True)
    ]
    notes: list[str] = []
    skipped_usage: list[Skip] = []
    solution_csv = root / "retinopathy_solution.csv"
    if solution_csv.is_file():
        source["csv"]["retinopathy_solution.csv"] = sha256_file(solution_csv)
        carved = val_from_train is not None
        rows_public, skipped_usage, note = _solution_rows(solution_csv, root / "test", carved)
        rows += rows_public
        notes += [note] if note else []
    else:
        notes.append("no retinopathy_solution.csv: only train (and a carved val) converted")
    items, skipped = validate(rows)
    if val_from_train is not None:
        train_items = [it for it in items if it.split == "train"]
        others = [it for it in items if it.split != "train"]
        fractions = {"train": 1 - val_from_train, "val": val_from_train}
        items = assign_by_patient(train_items, fractions, seed) + others
    options = {"val_from_train": val_from_train, "seed": seed}
    return Listing(items, skipped + skipped_usage, source, options, notes)


def _solution_rows(
    solution_csv: Path, images: Path, val_carved: bool
) -> tuple[list[Row], list[Skip], str]:
    """Usage=Private rows → test; Usage=Public → val, unless val is carved from train (then
    they are left out, with a note)."""
    solution = read_labels(solution_csv, ["image", "level", "Usage"])
    rows: list[Row] = []
    skipped: list[Skip] = []
    unused_public = 0
    for i, g, usage in zip(solution["image"], solution["level"], solution["Usage"], strict=True):
        i, usage = i.strip(), usage.strip().lower()
        path = str(images / f"{i}.jpeg")
        if usage == "private":
            rows.append(Row("test", i, g, path))
        elif usage == "public" and not val_carved:
            rows.append(Row("val", i, g, path))
        elif usage == "public":
            unused_public += 1
        else:
            skipped.append(Skip(i, path, f"unknown Usage {usage!r}", "test"))
    note = f"{unused_public} Usage=Public rows left out: val is carved from train"
    return rows, skipped, note if unused_public else ""


# ---------------------------------------------------------------------------------------------
# Any folder + CSV


def image_files(images_dir: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(file name, path) of every image file below images_dir (datasets nest their folders),
    in a fixed order."""
    for dirpath, dirs, files in os.walk(images_dir):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield name, os.path.join(dirpath, name)


def _index_images(images_dir: Path) -> dict[str, list[str]]:
    """Stem → paths of every image file below images_dir."""
    index: dict[str, list[str]] = defaultdict(list)
    for name, path in image_files(images_dir):
        index[os.path.splitext(name)[0]].append(path)
    return index


def parse_split_ratio(text: str) -> dict[str, float]:
    """ "0.8,0.1,0.1" → {"train": .8, "val": .1, "test": .1}; two values mean no test."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(
            f"must be numbers like 0.8,0.1,0.1, got {text!r}", setting="split_ratio"
        ) from None
    if len(values) not in (2, 3) or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise UsageError(
            f"needs 2 or 3 non-negative values summing to 1, got {text!r}", setting="split_ratio"
        )
    return dict(zip(SPLITS, values, strict=False))


def _file_finder(images: Path, ext: str | None) -> Callable[[str], tuple[str, str] | Skip]:
    """id → (image id, path): an id naming its file, the id + `ext`, or the one image file
    below `images` with that stem (several with different extensions: a Skip)."""
    index = None if ext else _index_images(images)

    def find(raw_id: str) -> tuple[str, str] | Skip:
        stem, own_ext = os.path.splitext(raw_id)
        if own_ext.lower() in IMAGE_EXTENSIONS:
            return stem, str(images / raw_id)
        if ext:
            return raw_id, str(images / f"{raw_id}{ext}")
        found = index.get(raw_id, [])
        if len(found) > 1:
            names = ", ".join(sorted(os.path.basename(p) for p in found))
            return Skip(raw_id, "", f"ambiguous file name ({names}); name the extension")
        return raw_id, found[0] if found else str(images / raw_id)

    return find


def _folder_row(
    rec: dict[str, str],
    find: Callable[[str], tuple[str, str] | Skip],
    columns: dict[str, str | None],
) -> Row | Skip:
    """One CSV record → a Row to validate, or the Skip of an unknown file or split."""
    found = find(rec[columns["id"]].strip())
    if isinstance(found, Skip):
        return found
    image_id, path = found
    split = "train"
    if columns["split"]:
        value = rec[columns["split"]].strip().lower()
        if value not in _SPLIT_ALIASES:
            return Skip(image_id, path, f"unknown split {rec[columns['split']]!r}")
        split = _SPLIT_ALIASES[value]
    patient = rec[columns["patient"]].strip() if columns["patient"] else None
    return Row(split, image_id, rec[columns["grade"]], path, patient or None)


def folder_listing(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    id_column: str = "image",
    grade_column: str = "level",
    ext: str | None = None,
    split_column: str | None = None,
    split_ratio: str | None = None,
    patient_column: str | None = None,
    seed: int = 0,
) -> Listing:
    """Images named by an id column, graded by a grade column, split by a column or by a
    patient-level ratio (default 0.8,0.1,0.1)."""
    root = Path(images).resolve()
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", setting="images")
    if split_column and split_ratio:
        raise UsageError("give a split column or a split ratio, not both", setting="split_ratio")
    ratio = parse_split_ratio(split_ratio or "0.8,0.1,0.1") if not split_column else None
    columns = {"id": id_column, "grade": grade_column}
    columns |= {"split": split_column, "patient": patient_column}
    df = read_labels(labels, [c for c in columns.values() if c], setting="labels")
    if ext and not ext.startswith("."):
        ext = "." + ext
    find = _file_finder(root, ext)
    rows: list[Row] = []
    skipped: list[Skip] = []
    for rec in df.to_dict("records"):
        row = _folder_row(rec, find, columns)
        (skipped if isinstance(row, Skip) else rows).append(row)
    items, bad = validate(rows)
    if ratio is not None:
        items = assign_by_patient(items, ratio, seed)
    source = {
        "kind": "folder",
        "images": str(root),
        "labels": str(Path(labels).resolve()),
        "labels_sha256": sha256_file(labels),
    }
    options = {
        "id_column": id_column,
        "grade_column": grade_column,
        "ext": ext,
        "split_column": split_column,
        "split_ratio": ratio,
        "patient_column": patient_column,
        "seed": seed,
    }
    return Listing(items, skipped + bad, source, options)
