"""IDRiD disease grading → TFRecords for external validation, its own train/test split kept.

    python -m data_prep.idrid --idrid-dir DIR --out OUT [--sizes 224,448,720] [--workers N]
    m2cnn-prep idrid --idrid-dir DIR --out OUT [...]

DIR is "B. Disease Grading" as IEEE DataPort's download unpacks it (or a folder above it):
"1. Original Images/a. Training Set" (413 .jpg) and "b. Testing Set" (103), and "2.
Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv" and "b. ..._Testing Labels.csv"
(Image name, Retinopathy grade, "Risk of macular edema "). Both folders start at IDRiD_001, so
ids carry their split ("test/IDRiD_001"); each image is its own patient. docs/external.md: the
layout, licence and citation.
"""

from data_prep import options

PROG, FLAGS, run, main = options.published_command(
    "idrid",
    __doc__,
    {"idrid-dir": 'the unpacked "B. Disease Grading" (or a folder above it)'},
)

if __name__ == "__main__":
    main()
