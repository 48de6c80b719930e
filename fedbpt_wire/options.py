"""Command-line flags derived from a settings class: one field, with its type, default and description, is one
flag in every front end that offers it (`fedbpt aggregator`, `fedbpt demo`, the service's limits).

A field's flag is `--field-name`, unless its metadata names others (`flags`: the first is the one help shows, the
rest are aliases); a field whose type is a Literal gets its values as choices; a boolean that defaults to true is
switched off by `--no-field-name`. Works on pydantic models (the field's `description` and `json_schema_extra`)
and dataclasses (`metadata["help"]`, `metadata["flags"]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

NOT_GIVEN = None  # a flag's parsed value when the command line left it out, where the caller asks to tell


@dataclass(frozen=True)
class Setting:
    """One field of a settings class, as a flag sees it."""

    name: str
    annotation: Any
    default: Any
    help: str | None
    flags: tuple[str, ...] = ()  # replace --field-name

    @property
    def options(self) -> tuple[str, ...]:
        if self.flags:
            return self.flags
        stem = self.name.replace("_", "-")
        return (f"--no-{stem}" if self.default is True else f"--{stem}",)


def settings_of(cls: type) -> dict[str, Setting]:
    """The fields of a pydantic model or a dataclass, in declaration order."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {
            f.name: Setting(
                f.name,
                hints[f.name],
                f.default if f.default is not dataclasses.MISSING else None,
                f.metadata.get("help"),
                tuple(f.metadata.get("flags", ())),
            )
            for f in dataclasses.fields(cls)
        }
    out = {}
    for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flags = extra.get("flags")
        out[name] = Setting(
            name,
            info.annotation,
            None if info.is_required() else info.default,
            info.description,
            tuple(flags) if isinstance(flags, list) else (),
        )
    return out


def _scalar(annotation: Any) -> tuple[Any, tuple | None]:
    """(the type a flag's text is converted with, the choices) of an annotation; Optional[X] counts as X."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _scalar(members[0])
    if origin is Literal:
        choices = get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def add_setting_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    not_given: bool = False,
    help_default: str = "(default {default})",
) -> dict[str, Setting]:
    """Add a flag per field of `cls` (those in `only`, in their order, else all), dest = the field's name.

    `defaults` replace the class's own for this front end. With `not_given`, every flag parses to None when left
    out (its help still shows the effective default), so the caller can tell what the user set from what it did
    not; `help_default` formats that default into the help (left out for a None default, whose meaning the field's
    help says). A field of a type no flag can take is a TypeError here, when the parser is built."""
    settings = settings_of(cls)
    names = list(only) if only is not None else list(settings)
    defaults = defaults or {}
    added = {}
    for name in names:
        s = settings[name]
        default = defaults.get(name, s.default)
        text = (s.help or "").replace("%", "%%")  # argparse %-formats help
        if default is not None:
            note = help_default.format(default=default).replace("%", "%%")
            text = f"{text} {note}" if text else note
        kwargs: dict[str, Any] = {"dest": name, "help": text}
        if s.annotation is bool:
            kwargs.update(action="store_const", const=not default)
        else:
            kind, choices = _scalar(s.annotation)
            if kind not in (int, float, str):
                raise TypeError(f"{cls.__name__}.{name}: no flag for a field of type {s.annotation}")
            kwargs["choices"] = choices
            if kind is not str:  # argparse's own reading of text
                kwargs["type"] = kind
        kwargs["default"] = NOT_GIVEN if not_given else default
        parser.add_argument(*s.options, **kwargs)
        added[name] = s
    return added


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The fields among `names` that the command line set (flags added with `not_given`)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, NOT_GIVEN) is not NOT_GIVEN}
