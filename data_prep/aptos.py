"""APTOS 2019 (Kaggle) → TFRecords for external validation: train.csv's graded images, as test.

    python -m data_prep.aptos --aptos-dir DIR --out OUT [--sizes 224,448,720] [--workers N]
    m2cnn-prep aptos --aptos-dir DIR --out OUT [...]

DIR is the unpacked Kaggle download: train.csv (id_code, diagnosis 0-4) and
train_images/<id_code>.png. Kaggle never released test.csv's labels, so test.csv is not used
(the command says so). Every image goes into the `test` split; no patient ids are published,
so each image is its own patient. docs/external.md: the layout, licence and citation.
"""

from data_prep import options

PROG, FLAGS, run, main = options.published_command(
    "aptos",
    __doc__,
    {"aptos-dir": "the unpacked Kaggle download (train.csv, train_images/)"},
)

if __name__ == "__main__":
    main()
