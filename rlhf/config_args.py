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

T = TypeVar("T")
_NONE_WORDS = ("none", "off")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal under each annotated field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
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


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add `--field-name` for every field of the dataclass `cls` (except `skip`)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind, optional = hints[f.name], False
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
            (kind,), optional = [a for a in args if a is not type(None)], True
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            names = [str(c) for c in choices] + (["off"] if optional else [])
            options.update(choices=list(choices) + ([None] if optional else []), metavar="{" + ",".join(names) + "}",
                           type=_parser_for(type(choices[0]), optional))
        else:
            options.update(type=_parser_for(kind, optional), metavar=f.name.upper())
        if not has_default:
            options["required"] = True
        elif kind is not bool or default:
            help_text += f" (default: {'off' if default is None and optional else default})"
        options["help"] = help_text.replace("%", "%%")
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass built from the flags that were given (the rest keep their defaults)."""
    return cls(**{**given_fields(cls, args), **overrides})


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that the command line set, for presets that take overrides."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
