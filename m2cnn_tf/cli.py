"""The one command-line contract of every m2cnn-tf command (train.py, evaluate.py, predict.py,
data_prep.*, and the m2cnn-* entry points):

- flags are absl flags, each command with its own `FlagValues`;
- `--help` prints the command's docstring and its flags, exit 0;
- a bad flag or a `UsageError` is one line on stderr, `PROG: error: ...`, exit 2;
- a `RunFailed` is one line, exit 1; Ctrl-C or `Interrupted`, exit 130; success, exit 0.

Kept free of TensorFlow, so that usage errors are reported before TF loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import flags

from m2cnn_tf.errors import M2cnnError, one_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

Body = Callable[[list[str]], int | None]


def flag_name(setting: str) -> str:
    """The flag of a config field or keyword: batch_size -> --batch-size."""
    return "--" + setting.replace("_", "-")


def error_line(prog: str, err: BaseException) -> str:
    """`PROG: error: MESSAGE`, one line, naming the flag when the error names a setting."""
    message = one_line(err)
    setting = getattr(err, "setting", None)
    if setting and flag_name(setting) not in message:
        message = f"{flag_name(setting)}: {message}"
    return f"{prog}: error: {message}"


def usage_error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _print_help(doc: str, flag_values: flags.FlagValues) -> None:
    """The docstring and the flags; a reader that closes the pipe early (`| head`) is fine."""
    try:
        print(doc.strip() + "\n\nflags:\n" + flag_values.get_help(include_special_flags=False))
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit


def run(
    prog: str,
    doc: str,
    flag_values: flags.FlagValues,
    body: Body,
    argv: Sequence[str] | None = None,
    *,
    positional: bool = False,
) -> int:
    """Parse `argv` into `flag_values`, call `body(rest)` and map the outcome to an exit code.

    `rest` holds the positional arguments (refused unless `positional`). The body returns None
    or an exit code, or raises: every `M2cnnError` carries its own code.
    """
    argv = list(sys.argv if argv is None else argv)
    flag_values.unparse_flags()  # a command may run twice in one process (tests)
    if any(a in ("-h", "--help", "--helpfull", "-help") for a in argv[1:]):
        _print_help(doc, flag_values)
        return EXIT_OK
    try:
        rest = flag_values(argv)[1:]
    except flags.Error as err:
        return usage_error(prog, one_line(err))
    if rest and not positional:
        return usage_error(prog, f"unexpected arguments: {' '.join(rest)}")
    try:
        code = body(rest)
    except M2cnnError as err:
        print(error_line(prog, err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else int(code)


def main(prog: str, doc: str, flag_values: flags.FlagValues, body: Body, **kw) -> None:
    """The `if __name__ == "__main__"` and console-script form of `run`."""
    sys.exit(run(prog, doc, flag_values, body, **kw))
