"""Messidor-2 with Krause et al.'s adjudicated grades → TFRecords for external validation.

    python -m data_prep.messidor2 --messidor2-dir DIR --out OUT [--grades CSV] [--sizes ...]
    m2cnn-prep messidor2 --messidor2-dir DIR --out OUT [...]

DIR is the unpacked ADCIS download (IMAGES/ with .png and .JPG files, messidor-2.csv: the
exams, left;right). The grades are Kaggle's google-brain/messidor2-dr-grades messidor_data.csv
(image_id, adjudicated_dr_grade, adjudicated_dme, adjudicated_gradable): found below DIR, or
named with --grades. Ungradable images (adjudicated_gradable 0) are excluded and counted. Every
image goes into the `test` split; the two images of an exam are one patient. docs/external.md:
the layout, licence and citations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from data_prep import options
from data_prep.worker import Settings

if TYPE_CHECKING:
    from data_prep.sources import Listing  # pandas: imported when the command runs

PROG = "data_prep.messidor2"
FLAGS = options.conversion_flags(
    {
        "messidor2-dir": "the unpacked ADCIS download (IMAGES/, messidor-2.csv)",
        "grades": "Kaggle's messidor_data.csv (default: found below --messidor2-dir)",
    },
    ["messidor2-dir"],
)


def _listing(_settings: Settings) -> Listing:
    from data_prep.external import messidor2_listing

    return messidor2_listing(FLAGS["messidor2-dir"].value, FLAGS.grades)


run, main = options.conversion_command(PROG, __doc__, FLAGS, _listing)

if __name__ == "__main__":
    main()
