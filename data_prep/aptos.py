"""APTOS 2019 (Kaggle) → TFRecords for external validation: train.csv's graded images, as test.

    python -m data_prep.aptos --aptos-dir DIR --out OUT [--sizes 224,448,720] [--workers N]
    m2cnn-prep aptos --aptos-dir DIR --out OUT [...]

DIR is the unpacked Kaggle download: train.csv (id_code, diagnosis 0-4) and
train_images/<id_code>.png. Kaggle never released test.csv's labels, so test.csv is not used
(the command says so). Every image goes into the `test` split; no patient ids are published,
so each image is its own patient. docs/external.md: the layout, licence and citation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from data_prep import options
from data_prep.worker import Settings

if TYPE_CHECKING:
    from data_prep.sources import Listing  # pandas: imported when the command runs

PROG = "data_prep.aptos"
FLAGS = options.conversion_flags(
    {"aptos-dir": "the unpacked Kaggle download (train.csv, train_images/)"}, ["aptos-dir"]
)


def _listing(_settings: Settings) -> Listing:
    from data_prep.external import aptos_listing

    return aptos_listing(FLAGS["aptos-dir"].value)


run, main = options.conversion_command(PROG, __doc__, FLAGS, _listing)

if __name__ == "__main__":
    main()
