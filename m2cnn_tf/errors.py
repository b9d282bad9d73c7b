"""What can go wrong, as typed exceptions: the library raises them, `m2cnn_tf.cli` maps them
to exit codes in one place (0 done, 1 the run failed, 2 usage, 130 interrupted).

Messages say what is wrong in the library's words. An error caused by one setting names it in
`setting` (a config field such as "batch_size"); a command line adds the flag to use.
Kept free of TensorFlow so that every command can report an error before TF loads.
"""

from __future__ import annotations


class M2cnnError(Exception):
    """Base class: a one-line message, and the exit code a command line ends with."""

    exit_code = 1

    def __init__(self, message: str, *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class UsageError(M2cnnError, ValueError):
    """The input the user gave cannot work: a bad setting, a missing file or folder (exit 2)."""

    exit_code = 2


class RunFailed(M2cnnError, RuntimeError):
    """The work started and had to stop: NaN loss, out of memory, a failed step (exit 1)."""

    exit_code = 1


class Interrupted(M2cnnError):
    """Stopped by Ctrl-C after saving what can be resumed (exit 130)."""

    exit_code = 130


def one_line(err: BaseException) -> str:
    """An error's reason in one line: its `reason` or message, first line only, white space
    folded; the exception's type name when it has no text. Every place that shows an error to a
    person (a command's error line, a CSV row, an HTTP response) shows this."""
    text = str(getattr(err, "reason", None) or err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return " ".join(first.split())
