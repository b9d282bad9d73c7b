"""What every data_prep conversion command (kaggle, folder, aptos, messidor2, idrid, ddr) shares
on the command line: its flags (the inputs, --out, the processing flags), the Settings they
make, the end of its --help, its `run` and `main`, and how a conversion's outcome is reported.
A command module holds only what is its own: its docstring, its input flags and its listing.

Each flag is derived from a field of `PreprocessParams` (§II-A, Eq. (1)) or `Settings` that
carries `help` metadata: its name is the field's (or the metadata's `flag`), its default and
type the field's. A field with a `no-...` flag is a switch that turns the setting off. So adding
a processing setting is one edit: the field.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from absl import flags

from data_prep.worker import Settings
from m2cnn_tf import cli
from m2cnn_tf.errors import UsageError
from m2cnn_tf.preprocessing import PreprocessParams

if TYPE_CHECKING:
    from data_prep.sources import Listing  # pandas: imported when a command runs

# The end of every conversion command's --help.
EPILOG = """
Bad inputs are skipped and listed in OUT/manifest.json (--strict: refused, nothing written).
Rerun the same command to resume an interrupted conversion.
Exit codes: 0 done, 1 failed (or --strict found bad inputs), 2 usage, 130 interrupted.
"""

MakeListing = Callable[[Settings], "Listing"]


def _flag_fields(owner: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(owner) if "help" in f.metadata]


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", field.name.replace("_", "-"))


def _define(fv: flags.FlagValues, field: dataclasses.Field, default: Any) -> None:
    name, text = _flag_name(field), field.metadata["help"]
    if isinstance(default, bool):
        flags.DEFINE_bool(name, default != name.startswith("no-"), text, flag_values=fv)
    elif isinstance(default, tuple):
        flags.DEFINE_list(name, [str(v) for v in default], text, flag_values=fv)
    elif "choices" in field.metadata:
        flags.DEFINE_enum(name, default, field.metadata["choices"], text, flag_values=fv)
    elif isinstance(default, int):
        flags.DEFINE_integer(name, default, text, flag_values=fv)
    elif isinstance(default, float):
        flags.DEFINE_float(name, default, text, flag_values=fv)
    else:
        raise TypeError(f"no flag type for {field.name}: {type(default).__name__}")


def define_processing_flags(fv: flags.FlagValues) -> None:
    """The flags of Eq. (1) and the mask (PreprocessParams), then of output and execution
    (Settings), on the command's own `fv`."""
    for owner in (PreprocessParams(), Settings()):
        for field in _flag_fields(owner):
            _define(fv, field, getattr(owner, field.name))


def _values(owner: type, fv: flags.FlagValues) -> dict[str, Any]:
    """The fields of `owner` that have a flag, from the parsed flags."""
    values = {}
    for field in _flag_fields(owner):
        name = _flag_name(field)
        value = fv[name].value
        values[field.name] = (not value) if name.startswith("no-") else value
    return values


def parse_sizes(values: Sequence[str]) -> tuple[int, ...]:
    """["224", "448"] → (224, 448); UsageError for anything but integers."""
    try:
        return tuple(int(v) for v in values if str(v).strip())
    except ValueError:
        raise UsageError(
            f"must be integers like 224,448,720, got {','.join(values)!r}", setting="sizes"
        ) from None


def settings_from_flags(fv: flags.FlagValues) -> Settings:
    """The Settings the processing flags describe; UsageError for values that cannot work."""
    params = PreprocessParams(**_values(PreprocessParams, fv))
    values = _values(Settings, fv)
    values["sizes"] = parse_sizes(values["sizes"])
    return Settings(params=params, **values)


def command_line(prog: str, argv: Sequence[str]) -> list[str]:
    """How this conversion was started, for the manifest: `python -m data_prep.kaggle ...`, or
    `m2cnn-prep kaggle ...` through the dispatcher."""
    head = ["python", "-m", prog] if prog.startswith("data_prep.") else prog.split()
    return [*head, *argv[1:]]


def conversion_flags(inputs: dict[str, str], required: Sequence[str] = ()) -> flags.FlagValues:
    """A command's own FlagValues: a string flag per input (name → help; `required` ones must
    be given), --out, and the processing flags."""
    fv = flags.FlagValues()
    for name, text in inputs.items():
        flags.DEFINE_string(name, None, text, flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    define_processing_flags(fv)
    flags.mark_flags_as_required([*required, "out"], flag_values=fv)
    return fv


def conversion_command(
    tool: str, doc: str, fv: flags.FlagValues, make_listing: MakeListing
) -> tuple[Callable[..., int], Callable[[], None]]:
    """A conversion command's `run(argv=None, *, prog=tool)` and `main()`: `tool` is its
    module (recorded in the manifest), `prog` what its lines are prefixed with
    (`m2cnn-prep NAME` through the dispatcher)."""

    def run(argv: list[str] | None = None, *, prog: str = tool) -> int:
        return run_conversion(prog, doc, fv, make_listing, argv, tool=tool)

    def main() -> None:
        sys.exit(run())

    return run, main


def published_command(
    name: str, doc: str, inputs: dict[str, str]
) -> tuple[str, flags.FlagValues, Callable[..., int], Callable[[], None]]:
    """A published set's command, data_prep.NAME: PROG, FLAGS, run and main. Its `inputs`
    flags (the first required) are passed, in order, to data_prep.external's listing of it."""
    tool = f"data_prep.{name}"
    fv = conversion_flags(inputs, [next(iter(inputs))])

    def make_listing(_settings: Settings) -> Listing:
        from data_prep.external import LISTINGS  # pandas: imported when the command runs

        return LISTINGS[name](*(fv[flag].value for flag in inputs))

    return tool, fv, *conversion_command(tool, doc, fv, make_listing)


def run_conversion(
    prog: str,
    doc: str,
    fv: flags.FlagValues,
    make_listing: MakeListing,
    argv: Sequence[str] | None,
    *,
    tool: str,
) -> int:
    """The whole of a conversion command (cli.run): flags → Settings → `make_listing` →
    convert into --out, progress lines prefixed with `prog`."""
    argv = list(sys.argv if argv is None else argv)

    def body(_rest: list[str]) -> int:
        settings = settings_from_flags(fv)
        listing = make_listing(settings)
        return _convert(listing, fv["out"].value, settings, prog, tool, command_line(prog, argv))

    return cli.run(prog, doc.rstrip() + "\n" + EPILOG, fv, body, argv)


def _convert(
    listing: Listing, out: str, settings: Settings, prog: str, tool: str, command: list[str]
) -> int:
    """A strict-mode failure ends in its one error line with every bad input listed under it."""
    from data_prep.convert import BadInputs, convert

    log = functools.partial(print, f"{prog}:")
    try:
        convert(listing, out, settings, tool=tool, command=command, log=log)
    except BadInputs as e:
        print(cli.error_line(prog, e), file=sys.stderr)
        for p in e.problems[:20]:
            print(f"  {p.image_id or p.path}: {p.reason}", file=sys.stderr)
        if len(e.problems) > 20:
            print(f"  ... and {len(e.problems) - 20} more", file=sys.stderr)
        return e.exit_code
    return cli.EXIT_OK
