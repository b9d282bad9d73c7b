"""train.py's flags, derived from the fields of `m2cnn_tf.config`: one flag per setting, named
after its flat key (`--batch-size`, `--augment-on`), with the field's help, choices and default;
and the `Config` built back from the parsed flags. So adding a setting is one edit, a field.

A switch may also take a word that turns it off (`--augment none`, the spelling of
`--tta none`), besides absl's `--noaugment` and `--augment=false`; `join_switch_words` lets that
word follow after a space. Kept free of TensorFlow, like `config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

from absl import flags

from m2cnn_tf.config import SECTIONS, Config, assemble, flat_key, leaf_fields


def _value_type(section: str | None, f: dataclasses.Field) -> type:
    """The field's type without `| None`."""
    hint = typing.get_type_hints(Config if section is None else SECTIONS[section])[f.name]
    if isinstance(hint, types.UnionType):
        (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
    return hint


class _SwitchParser(flags.BooleanParser):
    """absl's boolean parser that also reads one word as False."""

    def __init__(self, off_word: str):
        super().__init__()
        self.off_word = off_word

    def parse(self, argument: Any) -> bool | None:
        if isinstance(argument, str) and argument.strip().lower() == self.off_word:
            return False
        return super().parse(argument)


def join_switch_words(argv: Iterable[str]) -> list[str]:
    """`--augment none` → `--augment=none`: absl never gives a boolean flag the argument after
    it, so a switch's off word is joined to it before parsing."""
    words = {flat_key(f).replace("_", "-"): f.metadata["off_word"] for _, f in leaf_fields()}
    out: list[str] = []
    for arg in argv:
        previous = out[-1].lstrip("-") if out and out[-1].startswith("-") else None
        if previous in words and arg.strip().lower() == words[previous]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def define_flags(flag_values: flags.FlagValues) -> None:
    """One absl flag per setting, named after its flat key, with the field's help and choices."""
    for section, f in leaf_fields():
        if not f.metadata["flag"]:
            continue
        name, help_text = flat_key(f).replace("_", "-"), f.metadata["help"]
        default = None if f.metadata["required"] else f.default
        kind, choices = _value_type(section, f), f.metadata["choices"]
        if choices is not None:
            strings = [str(c) for c in choices]
            default = None if default is None else str(default)
            flags.DEFINE_enum(name, default, strings, help_text, flag_values=flag_values)
        elif f.metadata["off_word"]:
            parser = _SwitchParser(f.metadata["off_word"])
            switch = flags.Flag(parser, None, name, default, help_text, boolean=True)
            flags.DEFINE_flag(switch, flag_values=flag_values)
        else:
            define = {
                bool: flags.DEFINE_bool,
                int: flags.DEFINE_integer,
                float: flags.DEFINE_float,
                str: flags.DEFINE_string,
            }[kind]
            define(name, default, help_text, flag_values=flag_values)
        if f.metadata["required"]:
            flags.mark_flag_as_required(name, flag_values=flag_values)


def from_flags(flag_values: flags.FlagValues) -> Config:
    """The Config of parsed flags (settings without a flag keep their defaults)."""
    found = []
    for section, f in leaf_fields():
        if not f.metadata["flag"]:
            continue
        value = flag_values[flat_key(f).replace("_", "-")].value
        if value is not None and f.metadata["choices"] is not None:
            value = _value_type(section, f)(value)  # enum flags hold strings
        found.append((section, f.name, value))
    return assemble(found)
