"""Any labelled fundus folder + CSV → sharded TFRecords.

    python -m data_prep.folder --images DIR --labels CSV --out OUT [--id-column image]
        [--grade-column level] [--ext .png] [--split-column COL | --split-ratio 0.8,0.1,0.1]
    m2cnn-prep folder --images DIR --labels CSV --out OUT [...]

Without --ext, each id is looked up among the image files below DIR (any common extension).
Splits come from a column (train/val/test and common spellings) or a patient-level ratio.
APTOS 2019, Messidor-2, IDRiD and DDR have their own commands, which read them as published.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import flags

from data_prep import options
from data_prep.worker import Settings

if TYPE_CHECKING:
    from data_prep.sources import Listing  # pandas: imported when the command runs

PROG = "data_prep.folder"
FLAGS = options.conversion_flags(
    {
        "images": "folder with the images (searched recursively)",
        "labels": "CSV with one row per image",
        "ext": "image file extension, e.g. .png (default: find by name)",
        "split-column": "CSV column with train/val/test",
        "split-ratio": "train,val[,test] fractions, split by patient (default 0.8,0.1,0.1)",
        "patient-column": "CSV column with the patient (default: the id without a _left/_right "
        "suffix)",
    },
    required=["images", "labels"],
)
flags.DEFINE_string("id-column", "image", "CSV column naming the image file", flag_values=FLAGS)
flags.DEFINE_string("grade-column", "level", "CSV column with the grade 0–4", flag_values=FLAGS)


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


run, main = options.conversion_command(PROG, __doc__, FLAGS, _listing)

if __name__ == "__main__":
    main()
