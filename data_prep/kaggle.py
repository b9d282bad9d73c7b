"""Kaggle EyePACS → preprocessed, sharded TFRecords (§III-A splits: 35,126 / 10,906 / 42,670).

    python -m data_prep.kaggle --kaggle-dir DIR --out OUT [--sizes 224,448,720] [--workers N]
    m2cnn-prep kaggle --kaggle-dir DIR --out OUT [...]

DIR holds train/*.jpeg, test/*.jpeg, trainLabels.csv and (optionally) retinopathy_solution.csv.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import flags

from data_prep import options
from data_prep.worker import Settings

if TYPE_CHECKING:
    from data_prep.sources import Listing  # pandas: imported when the command runs

PROG = "data_prep.kaggle"
FLAGS = options.conversion_flags(
    {"kaggle-dir": "unzipped Kaggle competition data"}, required=["kaggle-dir"]
)
flags.DEFINE_float(
    "val-from-train",
    None,
    "FRACTION: carve val from train by patient instead of using Usage=Public",
    flag_values=FLAGS,
)


def _listing(settings: Settings) -> Listing:
    from data_prep.sources import kaggle_listing

    return kaggle_listing(FLAGS["kaggle-dir"].value, FLAGS["val-from-train"].value, settings.seed)


run, main = options.conversion_command(PROG, __doc__, FLAGS, _listing)

if __name__ == "__main__":
    main()
