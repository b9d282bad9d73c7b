"""The published DR sets an EyePACS-trained grader is validated on, read exactly as their
publishers distribute them (unpacked, nothing renamed): APTOS 2019, Messidor-2 with Krause et
al.'s (2018) adjudicated grades, IDRiD (B. Disease Grading) and DDR (DR grading).

Each listing keeps its set's own splits, names the patients when the set says who they are, and
lists what the set's protocol leaves out (ungradable images) apart from bad inputs; the
conversion is data_prep.convert's, as for Kaggle. docs/external.md gives each layout, the
documents it was confirmed against, and the variants handled: file-name case (Messidor-2's CSV
says IM000595.jpg, its folder holds IM000595.JPG), .png beside .JPG, a byte-order mark, IDRiD's
"Risk of macular edema " and padding columns and rows, folder names with spaces, a download
unpacked one folder deeper ("B. Disease Grading/B. Disease Grading/...").
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import pandas as pd

from data_prep.sources import Listing, Row, Skip, image_files, read_labels, sha256_file, validate
from m2cnn_tf.common import IMAGE_EXTENSIONS
from m2cnn_tf.errors import UsageError

# How deep below the folder the user names a set's files are looked for: its documented layout
# is at most 3 levels deep, and a download unpacks one level deeper at most.
_SEARCH_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class Published:
    """What the manifest and the docs say about a published set."""

    name: str  # short: it labels the set's rows in evaluate.py's external-validation table
    download: str
    licence: str
    citation: str


DATASETS: dict[str, Published] = {
    "aptos": Published(
        name="APTOS 2019",
        download="https://www.kaggle.com/competitions/aptos2019-blindness-detection/data",
        licence="Kaggle competition data: its use is governed by the competition's rules, "
        "accepted on Kaggle before downloading; not redistributable.",
        citation="Karthik, Maggie, Sohier Dane. APTOS 2019 Blindness Detection. Kaggle, 2019. "
        "https://kaggle.com/competitions/aptos2019-blindness-detection",
    ),
    "messidor2": Published(
        name="Messidor-2 (Krause grades)",
        download="images: https://www.adcis.net/en/third-party/messidor2/ ; grades: "
        "https://www.kaggle.com/datasets/google-brain/messidor2-dr-grades",
        licence="Images: research and education only, no redistribution, acknowledging the "
        "Messidor program partners (ADCIS licence agreement). Grades: CC0, as the Kaggle "
        "data card says.",
        citation="Decencière E. et al. Feedback on a publicly distributed image database: the "
        "Messidor database. Image Anal Stereol 33(3):231-234, 2014. doi:10.5566/ias.1155 ; "
        "Abràmoff M.D. et al. Automated analysis of retinal images for detection of referable "
        "diabetic retinopathy. JAMA Ophthalmol 131(3):351-357, 2013. "
        "doi:10.1001/jamaophthalmol.2013.1743 ; Krause J. et al. Grader variability and the "
        "importance of reference standards for evaluating machine learning models for diabetic "
        "retinopathy. Ophthalmology 125(8):1264-1272, 2018. doi:10.1016/j.ophtha.2018.01.034",
    ),
    "idrid": Published(
        name="IDRiD disease grading",
        download="https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-"
        "dataset-idrid",
        licence="CC BY 4.0 (IEEE DataPort).",
        citation="Porwal P. et al. Indian Diabetic Retinopathy Image Dataset (IDRiD): a "
        "database for diabetic retinopathy screening research. Data 3(3):25, 2018. "
        "doi:10.3390/data3030025",
    ),
    "ddr": Published(
        name="DDR DR grading",
        download="https://github.com/nkicsl/DDR-dataset",
        licence="The repository that distributes it carries the MIT licence "
        "(nkicsl/DDR-dataset, LICENSE); cite the paper.",
        citation="Li T., Gao Y., Wang K., Guo S., Liu H., Kang H. Diagnostic assessment of deep "
        "learning algorithms for diabetic retinopathy screening. Information Sciences "
        "501:511-522, 2019. doi:10.1016/j.ins.2019.06.011",
    ),
}


# ---------------------------------------------------------------------------------------------
# Finding a set's files


def _directory(path: str | os.PathLike, setting: str) -> Path:
    root = Path(path).resolve()
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", setting=setting)
    return root


def _find(root: Path, name: str, *, folder: bool = False) -> Path | None:
    """The shallowest file (or folder) called `name`, in any case, at or below `root`; None
    when there is none, a UsageError when two are equally shallow (which one is meant?)."""
    wanted = name.lower()
    matches: list[tuple[int, Path]] = []
    for dirpath, dirs, files in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        entries = dirs if folder else files
        matches += [(depth, Path(dirpath) / e) for e in entries if e.lower() == wanted]
        if depth >= _SEARCH_DEPTH:
            dirs.clear()
    if not matches:
        return None
    shallowest = min(depth for depth, _ in matches)
    found = sorted(path for depth, path in matches if depth == shallowest)
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise UsageError(f"{root} holds several {name!r}: {names}; name the one to use")
    return found[0]


def _require(root: Path, name: str, setting: str, hint: str = "", *, folder: bool = False) -> Path:
    path = _find(root, name, folder=folder)
    if path is None:
        kind = "folder" if folder else "file"
        raise UsageError(f"no {kind} {name!r} at or below {root}{hint}", setting=setting)
    return path


class ImageIndex:
    """The image files below a folder, looked up by file name or, for a name without an image
    extension, by stem; case is ignored (IM000595.jpg finds IM000595.JPG)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_name: dict[str, list[str]] = defaultdict(list)
        self.by_stem: dict[str, list[str]] = defaultdict(list)
        for name, path in image_files(folder):
            self.by_name[name.lower()].append(path)
            self.by_stem[os.path.splitext(name)[0].lower()].append(path)

    def find(self, name: str) -> tuple[str, str]:
        """(path, "") for the one file `name` means; (the path expected, "") when there is none
        (validation reports it missing); ("", reason) when several files fit."""
        found = self.by_name.get(name.lower()) or self.by_stem.get(name.lower(), [])
        if len(found) > 1:
            names = ", ".join(sorted(os.path.basename(p) for p in found))
            return "", f"ambiguous file name ({names})"
        return (found[0] if found else str(self.folder / name)), ""


def _stem(name: str) -> str:
    """An image's id: its file name without an image extension ("IM000595.jpg" → "IM000595")."""
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in IMAGE_EXTENSIONS else name


def _records(df: pd.DataFrame) -> list[dict[str, str]]:
    """The label rows that name something: padding rows (all fields empty, as at the end of
    IDRiD's CSVs) are not images."""
    return [rec for rec in df.to_dict("records") if any(str(v).strip() for v in rec.values())]


def _row(
    split: str,
    name: str,
    grade: str,
    index: ImageIndex,
    *,
    image_id: str = "",
    patient: str | None = None,
    eye: str | None = None,
) -> Row | Skip:
    """A label row's Row (its id the file's stem unless given), or the Skip of a row without a
    name or with an ambiguous file."""
    image_id = image_id or _stem(name)
    if not name:
        return Skip("", "", "no image name in the label row", split)
    path, problem = index.find(name)
    if problem:
        return Skip(image_id, "", problem, split)
    return Row(split, image_id, grade, path, patient, eye)


def _listing(
    kind: str, rows: list[Row | Skip], excluded: list[Skip], source: dict, notes: list[str]
) -> Listing:
    items, bad = validate(r for r in rows if isinstance(r, Row))
    skipped = [r for r in rows if isinstance(r, Skip)] + bad
    dataset = {"id": kind, **dataclasses.asdict(DATASETS[kind])}
    return Listing(items, skipped, {"kind": kind, **source}, {}, notes, excluded, dataset)


# ---------------------------------------------------------------------------------------------
# APTOS 2019


def aptos_listing(aptos_dir: str | os.PathLike) -> Listing:
    """train.csv (id_code, diagnosis 0–4) and train_images/<id_code>.png, all in `test`: the
    set is for validation here. Kaggle never released test.csv's labels, so it is not used.
    No patient ids are published: each image is its own patient."""
    root = _directory(aptos_dir, "aptos_dir")
    hint = " (the unpacked Kaggle download holds train.csv and train_images/)"
    train_csv = _require(root, "train.csv", "aptos_dir", hint)
    images = _require(train_csv.parent, "train_images", "aptos_dir", hint, folder=True)
    df = read_labels(train_csv, ["id_code", "diagnosis"], setting="aptos_dir")
    index = ImageIndex(images)
    rows = [_row("test", rec["id_code"].strip(), rec["diagnosis"], index) for rec in _records(df)]
    test_csv = _find(train_csv.parent, "test.csv")
    unused = f" ({len(_records(read_labels(test_csv, [])))} images)" if test_csv else ""
    notes = [
        f"APTOS's test.csv{unused} has no labels (Kaggle kept them): not used; only train.csv's "
        "labelled images are converted, all into the test split"
    ]
    source = {"dir": str(root), "images": str(images), "csv": {"train.csv": sha256_file(train_csv)}}
    return _listing("aptos", rows, [], source, notes)


# ---------------------------------------------------------------------------------------------
# Messidor-2


def _eye(column: str) -> str:
    words = column.lower()
    return "left" if "left" in words else "right" if "right" in words else ""


def _exams(pairs_csv: Path) -> dict[str, tuple[str, str]]:
    """messidor-2.csv, ADCIS's exam list (a `left;right` header, then one exam a line: its two
    image files separated by ";"): image stem (lower case) → (exam, eye). Exams are numbered in
    the file's order; the eye is the header's name of the column ("" without a header)."""
    lines = pairs_csv.read_text(encoding="utf-8-sig").splitlines()
    rows = [[field.strip() for field in line.split(";")] for line in lines if line.strip()]
    is_header = bool(rows) and not any(_stem(f) != f for f in rows[0])
    eyes = [_eye(c) for c in rows[0]] if is_header else ["", ""]
    exams: dict[str, tuple[str, str]] = {}
    for n, fields in enumerate(rows[1:] if is_header else rows, start=1):
        for eye, name in zip(eyes, fields, strict=False):
            if name:
                exams.setdefault(_stem(name).lower(), (f"exam{n:03d}", eye))
    return exams


def _gradable(value: str) -> bool | None:
    """adjudicated_gradable: 1 gradable, 0 ungradable (its grades are empty), else None."""
    return {"1": True, "1.0": True, "0": False, "0.0": False}.get(value.strip())


def messidor2_listing(
    messidor_dir: str | os.PathLike, grades_csv: str | os.PathLike | None = None
) -> Listing:
    """The ADCIS download (IMAGES/, messidor-2.csv) graded by Krause et al.'s adjudicated
    grades (messidor_data.csv from Kaggle: image_id, adjudicated_dr_grade, adjudicated_dme,
    adjudicated_gradable), all in `test`. Ungradable images are excluded and counted; the two
    images of an exam are one patient (messidor-2.csv), so the bootstrap resamples exams."""
    root = _directory(messidor_dir, "messidor2_dir")
    if grades_csv:
        grades = Path(grades_csv).resolve()
    else:
        hint = (
            " (the adjudicated grades are a separate download: "
            "kaggle.com/datasets/google-brain/messidor2-dr-grades)"
        )
        grades = _require(root, "messidor_data.csv", "grades", hint)
    required = ["image_id", "adjudicated_dr_grade", "adjudicated_gradable"]
    df = read_labels(grades, required, setting="grades")
    images = _find(root, "IMAGES", folder=True) or root
    index = ImageIndex(images)
    pairs = _find(root, "messidor-2.csv")
    exams = _exams(pairs) if pairs else {}
    rows: list[Row | Skip] = []
    excluded: list[Skip] = []
    for rec in _records(df):
        name = rec["image_id"].strip()
        gradable = _gradable(rec["adjudicated_gradable"])
        exam, eye = exams.get(_stem(name).lower(), (None, None))
        row = _row("test", name, rec["adjudicated_dr_grade"], index, patient=exam, eye=eye)
        if isinstance(row, Row) and gradable is None:
            reason = f"adjudicated_gradable {rec['adjudicated_gradable']!r} is not 0 or 1"
            row = Skip(row.image_id, row.path, reason, "test")
        if isinstance(row, Row) and gradable is False:
            reason = "ungradable (adjudicated_gradable 0)"
            excluded.append(Skip(row.image_id, row.path, reason, "test"))
            continue
        rows.append(row)
    notes = []
    if pairs is None:
        notes.append(
            "no messidor-2.csv (ADCIS's exam list) found: each image is its own patient, so the "
            "bootstrap resamples images, not exams"
        )
    elif unpaired := sum(isinstance(r, Row) and r.patient is None for r in rows):
        notes.append(f"{unpaired} image(s) are in no exam of messidor-2.csv: each its own patient")
    csvs = {grades.name: sha256_file(grades), **({pairs.name: sha256_file(pairs)} if pairs else {})}
    source = {"dir": str(root), "images": str(images), "csv": csvs}
    return _listing("messidor2", rows, excluded, source, notes)


# ---------------------------------------------------------------------------------------------
# IDRiD


# split → (its ground-truth CSV, its folder under "1. Original Images")
_IDRID = {
    "train": ("a. IDRiD_Disease Grading_Training Labels.csv", "a. Training Set"),
    "test": ("b. IDRiD_Disease Grading_Testing Labels.csv", "b. Testing Set"),
}


def idrid_listing(idrid_dir: str | os.PathLike) -> Listing:
    """B. Disease Grading: "1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NNN.jpg"
    and "2. Groundtruths/{a,b}. IDRiD_Disease Grading_{Training,Testing} Labels.csv" (Image name,
    Retinopathy grade, "Risk of macular edema "), its own 413/103 train/test split kept. Both
    folders start at IDRiD_001, so ids carry their split ("test/IDRiD_001"); no patient ids are
    published: each image is its own patient."""
    root = _directory(idrid_dir, "idrid_dir")
    rows: list[Row | Skip] = []
    csvs: dict[str, str] = {}
    folders: dict[str, str] = {}
    for split, (csv_name, folder) in _IDRID.items():
        labels = _find(root, csv_name)
        if labels is None:
            continue
        grading = labels.parent.parent  # "B. Disease Grading"
        hint = f" (next to {labels.parent.name!r})"
        images = _require(grading, folder, "idrid_dir", hint, folder=True)
        df = read_labels(labels, ["Image name", "Retinopathy grade"], setting="idrid_dir")
        index = ImageIndex(images)
        for rec in _records(df):
            name = rec["Image name"].strip()
            image_id = f"{split}/{_stem(name)}"
            rows.append(_row(split, name, rec["Retinopathy grade"], index, image_id=image_id))
        csvs[csv_name] = sha256_file(labels)
        folders[split] = str(images)
    if not csvs:
        names = " or ".join(repr(c) for c, _ in _IDRID.values())
        raise UsageError(f"no {names} at or below {root}", setting="idrid_dir")
    notes = [f"no {_IDRID[s][0]!r}: its split is not converted" for s in _IDRID if s not in folders]
    source = {"dir": str(root), "images": folders, "csv": csvs}
    return _listing("idrid", rows, [], source, notes)


# ---------------------------------------------------------------------------------------------
# DDR


# DDR's split names → ours
_DDR = {"train": "train", "valid": "val", "test": "test"}
_UNGRADABLE_DDR = "5"  # DDR's sixth grade: the image cannot be graded


def _ddr_root(root: Path) -> Path:
    """The DR_grading folder: `root` itself when it holds the split lists, else below it."""
    if any(_find_here(root, f"{s}.txt") for s in _DDR):
        return root
    hint = " (DDR-dataset/DR_grading holds train.txt, valid.txt, test.txt and their folders)"
    return _require(root, "DR_grading", "ddr_dir", hint, folder=True)


def _find_here(folder: Path, name: str) -> Path | None:
    return next((folder / n for n in sorted(os.listdir(folder)) if n.lower() == name), None)


def ddr_listing(ddr_dir: str | os.PathLike) -> Listing:
    """DR_grading/{train,valid,test}/ and train.txt, valid.txt, test.txt ("file grade" lines),
    its own splits kept (valid → val). Grade 5 (ungradable) is excluded and counted. No patient
    ids are published: each image is its own patient."""
    root = _ddr_root(_directory(ddr_dir, "ddr_dir"))
    rows: list[Row | Skip] = []
    excluded: list[Skip] = []
    csvs: dict[str, str] = {}
    notes: list[str] = []
    for theirs, split in _DDR.items():
        listed = _find_here(root, f"{theirs}.txt")
        if listed is None:
            notes.append(f"no {theirs}.txt: DDR's {theirs} split is not converted")
            continue
        csvs[listed.name] = sha256_file(listed)
        index = ImageIndex(_find_here(root, theirs) or root / theirs)
        for line in listed.read_text(encoding="utf-8-sig").splitlines():
            row = _ddr_row(line, split, index)
            if isinstance(row, Row) and row.grade.strip() == _UNGRADABLE_DDR:
                excluded.append(Skip(row.image_id, row.path, "ungradable (grade 5)", split))
            elif row is not None:
                rows.append(row)
    if not csvs:
        raise UsageError(f"no train.txt, valid.txt or test.txt in {root}", setting="ddr_dir")
    return _listing("ddr", rows, excluded, {"dir": str(root), "csv": csvs}, notes)


def _ddr_row(line: str, split: str, index: ImageIndex) -> Row | Skip | None:
    """One line of a DDR list, "007-0004-000.jpg 0": its Row; a Skip for a malformed line;
    None for a blank one."""
    fields = line.split()
    if not fields:
        return None
    if len(fields) != 2:
        return Skip("", "", f"line {line.strip()!r} is not 'file grade'", split)
    return _row(split, fields[0], fields[1], index)


# The listing of each published set's command (data_prep.options.published_command).
LISTINGS = {
    "aptos": aptos_listing,
    "messidor2": messidor2_listing,
    "idrid": idrid_listing,
    "ddr": ddr_listing,
}
