"""Typed pass options: parsed from the textual pipeline and printed back.

Options are frozen dataclasses. Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``Optional[...]`` of those, and ``tuple[T, ...]`` (items joined with ``+`` in text). Printing writes the fields
that differ from their defaults, in declaration order, so ``format(parse(text)) == text`` for canonical text.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import types
import typing
from typing import Any

from graphopt.errors import PipelineError, first_line

LIST_SEP = "+"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _fields(options_cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(options_cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(options_cls)}


def _convert(pass_name: str, key: str, text: str, hint: Any, kind: str = "pass") -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = lambda what: PipelineError(f"{kind} '{pass_name}': option '{key}' expects {what}, got '{text}'")  # noqa: E731
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text.lower() == "none" and len(inner) < len(args):
            return None
        for i, alternative in enumerate(inner):  # the first type the text parses as (int | float: 2 -> 2, 1.5 -> 1.5)
            try:
                return _convert(pass_name, key, text, alternative, kind)
            except PipelineError:
                if i == len(inner) - 1:
                    raise bad(" or ".join(_type_name(a) for a in inner)) from None
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise bad("one of " + ", ".join(str(a) for a in args))
    if origin is tuple:
        parts = text.split(LIST_SEP) if text else []
        if len(args) == 2 and args[1] is Ellipsis or not args:  # tuple[T, ...]: any number of items
            return tuple(_convert(pass_name, key, part, args[0] if args else str, kind) for part in parts)
        if len(parts) != len(args):  # tuple[A, B]: exactly that many
            raise bad(f"{len(args)} items joined by '{LIST_SEP}'")
        return tuple(_convert(pass_name, key, part, item, kind) for part, item in zip(parts, args))
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad("true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise bad("a number") from None
    if hint is str:
        return text
    raise PipelineError(f"{kind} '{pass_name}': option '{key}' has a type graphopt cannot parse ({hint})")


def parse_options(pass_name: str, options_cls: type, items: dict[str, str], kind: str = "pass") -> Any:
    """Build ``options_cls`` from ``{"key": "text"}``, naming the pass (or ``kind``: a backend's options are
    parsed the same way) and option in every error."""
    fields = _fields(options_cls)
    values = {}
    for key, text in items.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PipelineError(f"{kind} '{pass_name}' has no option '{key}' (its options: {known})")
        values[key] = _convert(pass_name, key, text, fields[key][1], kind)
    required = [name for name, (f, _) in fields.items() if name not in values and _default(f) is dataclasses.MISSING]
    if required:
        raise PipelineError(f"{kind} '{pass_name}': option '{required[0]}' has no default: give it "
                            f"({pass_name}:{required[0]}=...)")
    try:
        return options_cls(**values)
    except Exception as exc:  # __post_init__ validation (ValueError; a plugin's assert, ...)
        raise PipelineError(f"{kind} '{pass_name}': {first_line(exc)}") from None


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return LIST_SEP.join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_options(options: Any) -> str:
    """``key=value`` pairs joined by ``:`` for the fields that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value != _default(f):
            parts.append(f"{f.name}={format_value(value)}")
    return ":".join(parts)


def describe_options(options_cls: type) -> list[tuple[str, str, str]]:
    """``(name, type, default)`` for each option, for ``graphopt passes``."""
    rows = []
    for name, (f, hint) in _fields(options_cls).items():
        default = _default(f)
        rows.append((name, _type_name(hint), "required" if default is dataclasses.MISSING else format_value(default)))
    return rows


def _default(f: dataclasses.Field) -> Any:
    """A field's default (its factory's value), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _type_name(hint: Any) -> str:
    """How ``graphopt passes`` shows an option's type: ``one of l1|l2`` for a Literal, ``list of str`` for a
    tuple, ``float or none`` for an Optional."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + "|".join(format_value(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis or origin is tuple and not args:
        return f"list of {_type_name(args[0]) if args else 'str'} (joined by {LIST_SEP})"
    if origin is tuple:
        return f"{' + '.join(_type_name(a) for a in args)} (joined by {LIST_SEP})"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" or none" if len(inner) < len(args) else "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def name_matches(pattern: str, name: str) -> bool:
    """How ``ignore``-style options pick nodes: the name itself, anything below it (``layer1`` matches
    ``layer1.0.conv1`` and ``/layer1/...``), or an fnmatch glob (``*`` only from Python: the pipeline syntax
    refuses it because an unquoted shell would expand it)."""
    return name == pattern or name.startswith((pattern + "/", pattern + ".")) or fnmatch.fnmatchcase(name, pattern)
