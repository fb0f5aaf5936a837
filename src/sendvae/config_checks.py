"""Field domains: what a config value may be, checked one way for flags, presets and saved configs.

``option`` declares a dataclass field with its help text and domain (choices, min / max, a ``check``).
``check_value`` holds a value to its field's type and domain; ``parse_value`` reads a command-line string
into an annotated type. The ``check`` functions (``positive``, ``unit_interval``, ...) and the argparse
``type=`` helpers for plain options (``positive_int``, ``device_arg``, ``field_arg``) live here too.
``sendvae.config`` (the dict / flag / file machinery built on these) re-exports every public name.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any


def option(
    default: Any,
    help: str,
    choices: typing.Sequence[Any] | None = None,
    hidden: bool = False,
    *,
    min: float | None = None,
    max: float | None = None,
    check: Callable[[Any], str | None] | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field carrying its help text (and optional choices) for the command line.

    ``hidden``: an option that works but is not listed in ``--help`` (testing aids; never read from a file).
    The field's domain, declared once and checked for flags, presets and saved configs alike (`check_value`):
    ``choices``, ``min`` / ``max`` (inclusive; each element of a tuple), and ``check(value)``, which returns
    what is wrong with a value (``"must be ..."``) or None. None passes them all where the type allows it.
    """
    meta: dict[str, Any] = {"help": help, "hidden": hidden}
    if choices is not None:
        meta["choices"] = tuple(choices)
    for key, value in (("min", min), ("max", max), ("check", check)):
        if value is not None:
            meta[key] = value
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        # a deep copy per instance: a nested section's sections are never shared between two configs
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


# ---------------------------------------------------------------------------------------------------------
# Type handling


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_value(text: str, tp: Any) -> Any:
    """Parse a command-line string into the annotated type ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if optional and text.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if tp in (int, float, str):
        return tp(text)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        elem = args[0] if args else str
        items = [s for s in text.replace(" ", "").split(",") if s != ""]
        vals = [parse_value(s, elem) for s in items]
        return tuple(vals) if origin is tuple else vals
    if tp is Any:
        return text
    raise TypeError(f"cannot parse a command-line value into {tp!r}")


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_NAMES = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _type_name(tp: Any, plural: bool = False) -> str:
    """How an error names a type: ``an integer or null``, ``a list of 2 numbers``."""
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        args = typing.get_args(inner)
        elem = _type_name(args[0], plural=True) if args else "values"
        fixed = origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
        name = f"a list of {len(args)} {elem}" if fixed else f"a list of {elem}"
    else:
        name = _NAMES.get(inner, (getattr(inner, "__name__", str(inner)),) * 2)[plural]
    return f"{name} or null" if optional else name


def _typed(value: Any, tp: Any) -> Any:
    """``value`` (as JSON or Python holds it) checked against the annotation ``tp``: a bool is a real bool,
    an int is not a bool, a float takes an int (and is finite), a tuple field takes a list of its length.
    Returns the value in the field's type; raises ValueError saying what was expected."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or inner is Any:
            return None
        raise ValueError(f"expected {_type_name(tp)}, got null")
    origin = typing.get_origin(inner)
    wrong = ValueError(f"expected {_type_name(tp)}, got {value!r}")
    if inner is Any:
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise wrong
        args = typing.get_args(inner)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise wrong
            items = [_typed(v, a) for v, a in zip(value, args)]
        else:
            items = [_typed(v, args[0] if args else Any) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise wrong
        return value
    if isinstance(inner, type) and not isinstance(value, inner):
        raise wrong
    return value


def check_value(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """``value`` for field ``f`` (annotated ``tp``): its type (`_typed`), then its declared domain
    (``choices``, ``min``, ``max``, ``check`` of `option`; each element of a list). Returns the typed value;
    raises ValueError with what is wrong, for the caller to prefix with the flag or the file and key."""
    value = _typed(value, tp)
    if value is None:
        return None
    meta = f.metadata
    items = value if isinstance(value, (tuple, list)) else (value,)
    choices = meta.get("choices")
    lo, hi = meta.get("min"), meta.get("max")
    for v in items:
        if choices and v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(map(str, choices))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and v < lo:
                raise ValueError(f"{v!r} is below the minimum {lo}")
            if hi is not None and v > hi:
                raise ValueError(f"{v!r} is above the maximum {hi}")
    check = meta.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise ValueError(f"{value!r} {problem}" if problem.startswith("must") else problem)
    return value


def positive(value: float) -> str | None:
    """A `check` for ``option``: the value (each element of a tuple) must be > 0."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return "must be > 0" if any(v <= 0 for v in items) else None


def unit_interval(value: Any) -> str | None:
    """A `check` for ``option``: each value in [0, 1) (Adam's betas: 1 divides by zero in its bias
    correction)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return "must be in [0, 1)" if any(not 0 <= v < 1 for v in items) else None


def nonempty(value: str) -> str | None:
    """A `check` for ``option``: a name or path that is not empty."""
    return "must not be empty" if not value.strip() else None


def device_name(value: str) -> str | None:
    """A `check` for ``option``: the device names the commands take (auto, cpu, cuda, cuda:N, mps)."""
    if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
        return None
    return "must be a device: auto, cpu, cuda, cuda:N or mps"


# ---------------------------------------------------------------------------------------------------------
# argparse types for plain (non-config) options


def number_arg(kind: type = int, min: float | None = None, max: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type=`` for a plain (non-config) option: an int (or a finite float) in [min, max],
    else argparse's one-line error naming the option."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_type_name(kind)}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (min is not None and value < min) or (max is not None and value > max):
            bounds = f">= {min}" if max is None else f"<= {max}" if min is None else f"in [{min}, {max}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number_arg(int, min=1)
nonnegative_int = number_arg(int, min=0)
finite_float = number_arg(float)


def positive_float(text: str) -> float:
    """An argparse ``type=``: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def device_arg(text: str) -> str:
    """An argparse ``type=`` for ``--device``: auto, cpu, cuda, cuda:N or mps."""
    problem = device_name(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def field_arg(f: dataclasses.Field, tp: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a config field's value and holds it to the field's domain."""

    def parse(text: str) -> Any:
        try:
            return check_value(f, tp, parse_value(text, tp))
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
