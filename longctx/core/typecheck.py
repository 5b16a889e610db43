"""Type checks of a user's config mapping against a dataclass's annotations (a sweep config, its
`executor:` block, recipe overrides): a quoted number (`train_steps: "4"`, `seeds: ["0"]`) is
refused when the config is loaded, in one line naming the field, the value and the type
expected, instead of failing later as an error row.

`bool` is not an integer here, an integer is a number, and YAML lists stand for tuples.
"""
from __future__ import annotations

import types
import typing
from typing import Any, Union

from longctx.core.errors import LongctxError

_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true or false"), type(None): ("null", "null")}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of dataclass `cls`."""
    return typing.get_type_hints(cls)


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML or JSON gives it) has the annotated type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(conforms(v, args[0] if args else Any) for v in value)
    if origin is dict:
        key, item = args or (Any, Any)
        return isinstance(value, dict) and all(conforms(k, key) and conforms(v, item) for k, v in value.items())
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, type(None) if hint is None else hint)


def describe(hint: Any, plural: bool = False, nested: bool = False) -> str:
    """`hint` in words: `an integer or null`, `a list of (integers or null)`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "anything"
    if hint in _NAMES or hint is None:
        return _NAMES[type(None) if hint is None else hint][plural]
    if origin in (Union, types.UnionType):
        parts = [describe(arg, plural, True) for arg in args]
        text = ", ".join(parts[:-1]) + " or " + parts[-1]
        return f"({text})" if nested else text
    if origin in (list, tuple):
        return ("lists of " if plural else "a list of ") + describe(args[0] if args else Any, True, True)
    if origin is dict:
        item = args[1] if args else Any
        kind = "mappings" if plural else "a mapping"
        return kind if item is Any else f"{kind} to {describe(item, True, True)}"
    return getattr(hint, "__name__", str(hint))


def check_fields(values: dict[str, Any], cls: type, prefix: str = "", where: str = "") -> None:
    """Refuse the first entry of `values` whose value does not have its field's type in `cls`
    (keys that are not fields are left to the caller)."""
    hints = field_types(cls)
    for key, value in values.items():
        if key in hints and not conforms(value, hints[key]):
            place = f" in {where}" if where else ""
            raise LongctxError(f"{prefix}{key}{place} must be {describe(hints[key])}, got {value!r}{_quoted(value)}")


def _quoted(value: Any) -> str:
    """A hint when the value is (or holds) a number written as a string."""
    strings = [value] if isinstance(value, str) else [v for v in _leaves(value) if isinstance(v, str)]
    for text in strings:
        try:
            float(text)
        except ValueError:
            continue
        if "e" in text.lower() and "." not in text:  # YAML 1.1 reads 1e-4 as a string, 1.0e-4 as a number
            return f" (YAML reads {text} as a string: write {text.lower().replace('e', '.0e', 1)})"
        return f" ({text!r} is a string: write the number without quotes)"
    return ""


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
