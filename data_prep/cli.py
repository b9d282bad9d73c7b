"""m2cnn-prep: the data preparation commands under one name.

    m2cnn-prep kaggle --kaggle-dir DIR --out OUT [flags]   Kaggle EyePACS → TFRecords
    m2cnn-prep folder --images DIR --labels CSV --out OUT  any labelled folder → TFRecords
    m2cnn-prep aptos --aptos-dir DIR --out OUT             APTOS 2019, as Kaggle ships it
    m2cnn-prep messidor2 --messidor2-dir DIR --out OUT     Messidor-2 + Krause et al.'s grades
    m2cnn-prep idrid --idrid-dir DIR --out OUT             IDRiD disease grading
    m2cnn-prep ddr --ddr-dir DIR --out OUT                 DDR DR grading
    m2cnn-prep demo --out DIR                              write the synthetic demo dataset
    m2cnn-prep COMMAND --help                              that command's flags

Each command is the same as `python -m data_prep.COMMAND` (same flags, outputs, exit codes).
"""

from __future__ import annotations

import importlib
import sys

from m2cnn_tf import cli

PROG = "m2cnn-prep"
COMMANDS = ("kaggle", "folder", "aptos", "messidor2", "idrid", "ddr", "demo")


def _summary(name: str) -> str:
    doc = importlib.import_module(f"data_prep.{name}").__doc__ or ""
    return doc.strip().splitlines()[0]


def run(argv: list[str] | None = None) -> int:
    """Dispatch `argv[1]` to data_prep.<command>.run with the remaining arguments."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2:
        return cli.usage_error(PROG, f"missing command; choose {', '.join(COMMANDS)}")
    name = argv[1]
    if name in ("-h", "--help", "-help", "--helpfull", "help"):
        print(__doc__.strip() + "\n\ncommands:")
        for command in COMMANDS:
            print(f"  {command:9} {_summary(command)}")
        return cli.EXIT_OK
    if name not in COMMANDS:
        return cli.usage_error(PROG, f"unknown command {name!r}; choose {', '.join(COMMANDS)}")
    command = importlib.import_module(f"data_prep.{name}")
    return command.run([f"{PROG} {name}", *argv[2:]], prog=f"{PROG} {name}")


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
