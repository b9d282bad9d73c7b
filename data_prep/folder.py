"""Any labelled fundus folder (APTOS 2019, Messidor-2, IDRiD, DDR, ...) → sharded TFRecords.

    python -m data_prep.folder --images DIR --labels CSV --out OUT [--id-column image]
        [--grade-column level] [--ext .png] [--split-column COL | --split-ratio 0.8,0.1,0.1]
    m2cnn-prep folder --images DIR --labels CSV --out OUT [...]

Without --ext, each id is looked up among the image files below DIR (any common extension).
Splits come from a column (train/val/test and common spellings) or a patient-level ratio.
Bad inputs are skipped and listed in OUT/manifest.json (--strict: refused, nothing written).
Rerun the same command to resume an interrupted conversion.
Exit codes: 0 done, 1 failed (or --strict found bad inputs), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from absl import flags

from data_prep import options
from data_prep.worker import Settings

if TYPE_CHECKING:
    from data_prep.sources import Listing  # pandas: imported when the command runs

PROG = "data_prep.folder"
FLAGS = flags.FlagValues()
flags.DEFINE_string(
    "images", None, "folder with the images (searched recursively)", flag_values=FLAGS
)
flags.DEFINE_string("labels", None, "CSV with one row per image", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory", flag_values=FLAGS)
flags.DEFINE_string("id-column", "image", "CSV column naming the image file", flag_values=FLAGS)
flags.DEFINE_string("grade-column", "level", "CSV column with the grade 0–4", flag_values=FLAGS)
flags.DEFINE_string(
    "ext", None, "image file extension, e.g. .png (default: find by name)", flag_values=FLAGS
)
flags.DEFINE_string("split-column", None, "CSV column with train/val/test", flag_values=FLAGS)
flags.DEFINE_string(
    "split-ratio",
    None,
    "train,val[,test] fractions, split by patient (default 0.8,0.1,0.1)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "patient-column",
    None,
    "CSV column with the patient (default: the id without a _left/_right suffix)",
    flag_values=FLAGS,
)
options.define_processing_flags(FLAGS)
flags.mark_flags_as_required(["images", "labels", "out"], flag_values=FLAGS)


def _listing(settings: Settings) -> Listing:
    from data_prep.sources import folder_listing

    return folder_listing(
        FLAGS.images,
        FLAGS.labels,
        id_column=FLAGS["id-column"].value,
        grade_column=FLAGS["grade-column"].value,
        ext=FLAGS.ext,
        split_column=FLAGS["split-column"].value,
        split_ratio=FLAGS["split-ratio"].value,
        patient_column=FLAGS["patient-column"].value,
        seed=settings.seed,
    )


def run(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    return options.run_conversion(prog, __doc__, FLAGS, _listing, argv, tool=PROG)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
