"""DDR (DR grading) → TFRecords for external validation, its own train/valid/test split kept.

    python -m data_prep.ddr --ddr-dir DIR --out OUT [--sizes 224,448,720] [--workers N]
    m2cnn-prep ddr --ddr-dir DIR --out OUT [...]

DIR is DDR-dataset/DR_grading as the download unpacks it (or a folder above it):
train/, valid/, test/ and train.txt, valid.txt, test.txt ("007-0004-000.jpg 2" lines). valid
becomes our val split. Grade 5 (ungradable) is excluded and counted. No patient ids are
published, so each image is its own patient. docs/external.md: the layout, licence and citation.
"""

from data_prep import options

PROG, FLAGS, run, main = options.published_command(
    "ddr",
    __doc__,
    {"ddr-dir": "the unpacked DDR-dataset/DR_grading (or a folder above it)"},
)

if __name__ == "__main__":
    main()
