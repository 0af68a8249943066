"""A command line made from a config dataclass: one flag per field, the field's docstring as its help.

The dataclass stays the one place where a setting, its default and its meaning are written (CleanRL and
tyro read the same attribute docstrings). A flag the user does not give is absent from the parsed
namespace, so the dataclass's own default (or a preset such as `DemoConfig.quick`) applies; values are
checked by the config's `check()`, not by the parser.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, TypeVar

from rlhf.errors import UserError

T = TypeVar("T")
_NONE_WORDS = ("none", "off")


@functools.cache
def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (group, docstring)}: the string literal under each annotated field in the class body, and
    the last `# comment` line above the field (the group its flag is listed under in --help)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    docs, group = {}, ""
    for node, after in zip(body, body[1:]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = lines[node.lineno - 2].strip()
        if above.startswith("#"):
            group = above.lstrip("# ")
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
        docs[node.target.id] = (group, " ".join(str(doc).split()))
    return docs


def _parser_for(kind: Any, optional: bool):
    def parse(text: str):
        if optional and text.lower() in _NONE_WORDS:
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}{' or off' if optional else ''}, got "
                                             f"{text!r}") from None
    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, required: tuple[str, ...] = ()) -> None:
    """Add `--field-name` for every field of the dataclass `cls`; `required` names fields whose default
    suits a library call but that a command line must give (an output folder, say)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, optional = hints[f.name], False
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
            (kind,), optional = [a for a in args if a is not type(None)], True
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        group, help_text = docs.get(f.name, ("", ""))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            optional = optional and default is not None  # "off" only where it differs from leaving it out
            names = [str(c) for c in choices] + (["off"] if optional else [])
            options.update(choices=list(choices) + ([None] if optional else []), metavar="{" + ",".join(names) + "}",
                           type=_parser_for(type(choices[0]), optional))
        else:
            options.update(type=_parser_for(kind, optional), metavar=f.name.upper())
        if not has_default or f.name in required:
            options["required"] = True
        elif default is not None and (kind is not bool or default):  # a None default: the docstring says
            help_text += f" (default: {'off' if default is None and optional else default})"
        options["help"] = help_text.replace("%", "%%")
        if group and group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups.get(group, parser).add_argument("--" + f.name.replace("_", "-"), **options)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass built from the flags that were given (the rest keep their defaults)."""
    return cls(**{**given_fields(cls, args), **overrides})


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that the command line set, for presets that take overrides."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def is_main_process() -> bool:
    """Whether this process prints a command's result: the only one, or rank 0 of an `accelerate launch`."""
    import os

    return os.environ.get("RANK", "0") == "0"


def positive_int(text: str) -> int:
    """argparse type of a count given by hand (a flag not made from a config)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_fields(config: Any, *, positive: tuple[str, ...] = ()) -> None:
    """UserError naming the flag when a Literal field holds another value or a `positive` field is < 1
    (None passes: it means "not set")."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), hints[f.name]
        choices = [c for a in (kind, *typing.get_args(kind)) if typing.get_origin(a) is Literal
                   for c in typing.get_args(a)]
        if choices and value is not None and value not in choices:
            flag, names = f.name.replace("_", "-"), ", ".join(map(str, choices))
            raise UserError(f"--{flag} must be one of {names}, got {value!r}")
        if f.name in positive and value is not None and value < 1:
            raise UserError(f"--{f.name.replace('_', '-')} must be >= 1, got {value}")
