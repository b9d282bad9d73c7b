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

from data_prep import options

PROG, FLAGS, run, main = options.published_command(
    "messidor2",
    __doc__,
    {
        "messidor2-dir": "the unpacked ADCIS download (IMAGES/, messidor-2.csv)",
        "grades": "Kaggle's messidor_data.csv (default: found below --messidor2-dir)",
    },
)

if __name__ == "__main__":
    main()
