"""What the command lines do with bad input: one line on stderr and exit code 2, no traceback.

Kept free of TensorFlow imports so that usage errors are reported before TF loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import flags


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """An absl `app.run(flags_parser=...)` that turns a flag error into `fail`."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as err:
            fail(prog, str(err))

    return parse
