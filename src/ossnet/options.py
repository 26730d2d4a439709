"""Options declared once: a dataclass field carries its default, its help text and (through its type) its check.

Every setting a user can give (`TrainConfig`, `PredictOptions`, `PreprocessConfig`, `OccupancyConfig` ...)
is a field declared with `option(default, "help text")`. The command line is built from these fields
(`ossnet.cli`), and each class's `__post_init__` starts with `check_fields(self)`, which converts JSON's
lists back into tuples and rejects a value of the wrong type with an `OssnetError` naming the field. So a bad
value is refused with the same message whether it came from the command line, the Python API, an
`--override` or a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from ossnet.errors import OssnetError


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           **cli: Any) -> Any:
    """A dataclass field with its help text; `cli` holds command-line details that `ossnet.cli.add_options`
    reads: flags (e.g. ("-o", "--output"); default --FIELD-NAME), metavar, choices (words the value must be
    one of, where the annotation does not list them), nargs (several words, which the class's `__post_init__`
    turns into the value), positional=True (an argument without a flag, e.g. `ossnet info PATH`; required)
    and hidden=True (no argument: the field keeps its default, or the value the caller gives)."""
    metadata = {"help": help, **cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(instance: Any, what: str | None = None) -> None:
    """Check every field of the dataclass `instance` against its annotation, converting lists to tuples,
    ints to floats and strings to paths where the annotation asks for them (frozen classes too).

    Raises OssnetError("WHAT: FIELD must be ..., got ...") on the first mismatch."""
    what = what or type(instance).__name__
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        converted = _convert(value, hints[field.name], f"{what}: {field.name}")
        if converted is not value:
            object.__setattr__(instance, field.name, converted)


def finite(value: float, name: str, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> None:
    """Raise OssnetError unless `value` is a finite number within [low, high] (or (low, high] if low_open)."""
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        bounds = " ".join(filter(None, [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
                                        f"<= {high:g}" if high is not None else ""]))
        raise OssnetError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")


def positive(values: dict[str, int | None], what: str, minimum: int = 1) -> None:
    """Raise OssnetError naming every entry of `values` (name -> int or None) below `minimum`."""
    if bad := [name for name, value in values.items() if value is not None and value < minimum]:
        raise OssnetError(f"{what}: {', '.join(bad)} must be at least {minimum}")


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """`value` as the type `annotation` asks for, or OssnetError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option_type in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option_type, name)
            except OssnetError as error:
                errors.append((option_type, error))
        # the message of the alternative of the value's own kind: "must be one of median, native" for a word
        word = isinstance(value, str)
        raise next((error for option_type, error in errors
                    if word == (option_type is str or typing.get_origin(option_type) is Literal)), errors[0][1])
    if origin is Literal:
        if value not in args:
            raise OssnetError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise OssnetError(f"{name} must be a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(item, args[0], name) for item in value]
        else:
            if len(value) != len(args):
                raise OssnetError(f"{name} must have {len(args)} values, got {len(value)} ({list(value)})")
            items = [_convert(item, arg, name) for item, arg in zip(value, args)]
        converted = tuple(items)
        return value if converted == value and isinstance(value, tuple) else converted
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise OssnetError(f"{name} must be a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, annotation):
            raise OssnetError(f"{name} must be a {annotation.__name__}, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise OssnetError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OssnetError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OssnetError(f"{name} must be a number, got {value!r}")
        return value if isinstance(value, float) else float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise OssnetError(f"{name} must be a string, got {value!r}")
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise OssnetError(f"{name} must be a path, got {value!r}")
        return value if isinstance(value, Path) else Path(value)
    raise TypeError(f"{name}: unsupported option type {annotation!r}")
