"""Kaggle EyePACS → preprocessed, sharded TFRecords (§III-A splits: 35,126 / 10,906 / 42,670).

    python -m data_prep.kaggle --kaggle-dir DIR --out OUT [--sizes 224,448,720] [--workers N]

DIR holds train/*.jpeg, test/*.jpeg, trainLabels.csv and (optionally) retinopathy_solution.csv.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.convert import add_processing_args, convert, run_cli, settings_from_args
from data_prep.sources import kaggle_listing

PROG = "data_prep.kaggle"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--kaggle-dir", required=True, help="unzipped Kaggle competition data")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--val-from-train",
        type=float,
        metavar="FRACTION",
        help="carve val from train by patient instead of using Usage=Public",
    )
    add_processing_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = settings_from_args(args)
        listing = kaggle_listing(args.kaggle_dir, args.val_from_train, settings.seed)
        return convert(listing, args.out, settings, PROG, argv)

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
