"""Any labelled fundus folder (APTOS 2019, Messidor-2, IDRiD, DDR, ...) → sharded TFRecords.

    python -m data_prep.folder --images DIR --labels CSV --out OUT [--id-column image]
        [--grade-column level] [--ext .png] [--split-column COL | --split-ratio 0.8,0.1,0.1]

Without --ext, each id is looked up among the image files below DIR (any common extension).
Splits come from a column (train/val/test and common spellings) or a patient-level ratio.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.convert import add_processing_args, convert, run_cli, settings_from_args
from data_prep.sources import folder_listing

PROG = "data_prep.folder"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="folder with the images (searched recursively)")
    p.add_argument("--labels", required=True, help="CSV with one row per image")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--id-column", default="image", help="CSV column naming the image file")
    p.add_argument("--grade-column", default="level", help="CSV column with the grade 0–4")
    p.add_argument("--ext", help="image file extension, e.g. .png (default: find by name)")
    p.add_argument("--split-column", help="CSV column with train/val/test")
    p.add_argument(
        "--split-ratio",
        help="train,val[,test] fractions, split by patient (default 0.8,0.1,0.1)",
    )
    p.add_argument(
        "--patient-column",
        help="CSV column with the patient (default: the id without a _left/_right suffix)",
    )
    add_processing_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = settings_from_args(args)
        listing = folder_listing(
            args.images,
            args.labels,
            id_column=args.id_column,
            grade_column=args.grade_column,
            ext=args.ext,
            split_column=args.split_column,
            split_ratio=args.split_ratio,
            patient_column=args.patient_column,
            seed=settings.seed,
        )
        return convert(listing, args.out, settings, PROG, argv)

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
