"""Typed configs: dataclasses with help text, presets, command-line overrides, and serialisation.

Every component owns a dataclass (``VAEConfig``, ``MapperConfig``, ...). A stage's config nests them.
This module turns any such tree into:
  * command-line flags ``--section.field VALUE`` (types, choices and help taken from the dataclass),
  * a dict / JSON for the run folder and checkpoints (``to_dict`` / ``from_dict``),
  * a readable dump for ``--dry-run`` (``format_config``), and back (``load_config``: ``--config``).

Every ``--section.field`` help line ends with its default (the default preset's value) and its choices.

Why our own and not tyro or jsonargparse: both would replace the flag generation below (~100 lines) but
not what the commands need around it (named presets as the base, the reference scripts' short options
as aliases of dotted keys, strict ``from_dict`` of saved configs and checkpoints, the resume comparison
of ``to_dict`` trees), so they would remove little code while adding a dependency to every command's
start-up and their own spelling of nested options and config files next to the ``--section.field VALUE``
form that saved commands, tests and the README use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")


def option(
    default: Any, help: str, choices: typing.Sequence[Any] | None = None, hidden: bool = False, **kw: Any
) -> Any:
    """A dataclass field carrying its help text (and optional choices) for the command line.

    ``hidden``: an option that works but is not listed in ``--help`` (testing aids).
    """
    meta: dict[str, Any] = {"help": help, "hidden": hidden}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=meta, **kw)
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


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dataclass -> plain dict (tuples become lists, as in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[D], data: dict[str, Any], strict: bool = True) -> D:
    """Plain dict -> nested dataclass ``cls``. Unknown keys are an error when ``strict``."""
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and strict:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        value = data[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, strict=strict)
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def format_config(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def load_config(cls: type[D], path: str | Path) -> D:
    """A config saved as JSON (a run's ``config.json``, or the run folder holding it), strictly."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no saved config at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON config: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a config")
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a {cls.__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Command line


def iter_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted name, field, type) for every leaf field of a nested dataclass type."""
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        name = f"{prefix}{f.name}"
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            yield from iter_fields(inner, prefix=f"{name}.")
        else:
            yield name, f, tp


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: typing.Iterable[str] = (),
    base: Any = None,
    title: str = "config overrides (each overrides the preset's value)",
) -> None:
    """Add ``--section.field`` for each leaf of ``cls``. Values given override the chosen preset.

    Each help line ends with ``(default: X; choices: ...)``; ``base`` is the config whose values are shown
    as the defaults (the command's default preset), else the dataclass defaults.
    """
    group = parser.add_argument_group(title)
    skip = set(skip)
    base = cls() if base is None else base
    for name, f, tp in iter_fields(cls):
        if name in skip:
            continue
        help_text = field_help(f.metadata.get("help", ""), get_value(base, name), f.metadata.get("choices"))
        group.add_argument(
            f"--{name}",
            dest=f"cfg:{name}",
            metavar=metavar(tp),
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS if f.metadata.get("hidden") else help_text,
        )


def field_help(text: str, default: Any, choices: typing.Sequence[Any] | None = None) -> str:
    """``text (default: X; choices: a, b)``, escaped for argparse (which %-formats help strings). A text
    that states its default itself ("(default: the store's)") keeps its own words."""
    tail = [] if "(default" in text else [f"default: {format_value(default)}"]
    if choices:
        tail.append(f"choices: {', '.join(map(str, choices))}")
    return (f"{text} ({'; '.join(tail)})" if tail else text).replace("%", "%%")


def format_value(value: Any) -> str:
    """A config value as it is typed on the command line (``none``, ``true``, ``0.9,0.999``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(format_value, value)) if value else "empty"
    return str(value)


def get_value(cfg: Any, dotted: str) -> Any:
    """``cfg.a.b`` for ``dotted = "a.b"``."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def field_of(cls: type, dotted: str) -> tuple[dataclasses.Field, Any]:
    """(field, annotated type) of a dotted leaf name of ``cls``."""
    for name, f, tp in iter_fields(cls):
        if name == dotted:
            return f, tp
    raise ValueError(f"unknown config key {dotted!r}")


def metavar(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        return "BOOL"
    if origin in (tuple, list):
        return "A,B,..."
    return getattr(inner, "__name__", "X").upper()


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def apply_overrides(cfg: D, overrides: dict[str, Any]) -> D:
    """Return a copy of ``cfg`` with dotted-name overrides applied; strings are parsed by field type."""
    cfg = _deepcopy(cfg)
    for dotted, value in overrides.items():
        obj = cfg
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not hasattr(obj, p):
                raise ValueError(f"unknown config section {p!r} in {dotted!r}")
            obj = getattr(obj, p)
        leaf = parts[-1]
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"unknown config key {dotted!r}")
        f = next(f for f in dataclasses.fields(obj) if f.name == leaf)
        tp = _type_hints(type(obj))[leaf]
        if isinstance(value, str):
            try:
                value = parse_value(value, tp)
            except (ValueError, TypeError) as e:
                raise ValueError(f"--{dotted}: {e}") from None
        choices = f.metadata.get("choices")
        if choices and value not in choices and value is not None:
            raise ValueError(f"--{dotted}: {value!r} is not one of {', '.join(map(str, choices))}")
        setattr(obj, leaf, value)
    return cfg


def _deepcopy(cfg: D) -> D:
    return from_dict(type(cfg), dataclasses.asdict(cfg))


class PresetRegistry(dict[str, Callable[[], Any]]):
    """name -> zero-argument factory of a config. ``get`` raises a helpful error for unknown names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
        def deco(fn: Callable[[], T]) -> Callable[[], T]:
            self[name] = fn
            return fn

        return deco

    def build(self, name: str) -> Any:
        if name not in self:
            raise ValueError(f"unknown {self.kind} preset {name!r}; choose one of: {', '.join(sorted(self))}")
        return self[name]()
