"""Kaggle EyePACS → preprocessed, sharded TFRecords (§III-A splits: 35,126 / 10,906 / 42,670).

    python -m data_prep.kaggle --kaggle-dir DIR --out OUT [--sizes 224,448,720] [--workers N]
    m2cnn-prep kaggle --kaggle-dir DIR --out OUT [...]

DIR holds train/*.jpeg, test/*.jpeg, trainLabels.csv and (optionally) retinopathy_solution.csv.
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

PROG = "data_prep.kaggle"
FLAGS = flags.FlagValues()
flags.DEFINE_string("kaggle-dir", None, "unzipped Kaggle competition data", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory", flag_values=FLAGS)
flags.DEFINE_float(
    "val-from-train",
    None,
    "FRACTION: carve val from train by patient instead of using Usage=Public",
    flag_values=FLAGS,
)
options.define_processing_flags(FLAGS)
flags.mark_flags_as_required(["kaggle-dir", "out"], flag_values=FLAGS)


def _listing(settings: Settings) -> Listing:
    from data_prep.sources import kaggle_listing

    return kaggle_listing(FLAGS["kaggle-dir"].value, FLAGS["val-from-train"].value, settings.seed)


def run(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    return options.run_conversion(prog, __doc__, FLAGS, _listing, argv, tool=PROG)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
