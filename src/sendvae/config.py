"""Typed configs: dataclasses with help text, presets, command-line overrides, and serialisation.

Every component owns a dataclass (``VAEConfig``, ``MapperConfig``, ...). A stage's config nests them.
A field's domain (``option``, ``check_value``, the checks and the argparse types) is declared in
`config_checks` and re-exported here. This module turns any tree of such dataclasses into:
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
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

# the field domains, re-exported: `from sendvae.config import option, positive, positive_int` keeps working
from .config_checks import (
    _type_hints,
    _unwrap_optional,
    check_value,
    device_arg,
    device_name,
    field_arg,
    finite_float,
    nonempty,
    nonnegative_int,
    number_arg,
    option,
    parse_value,
    positive,
    positive_float,
    positive_int,
    unit_interval,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "CONFIG_FORMAT",
    "FORMAT_KEY",
    "PresetRegistry",
    "add_config_arguments",
    "apply_overrides",
    "check_value",
    "config_record",
    "device_arg",
    "device_name",
    "field_arg",
    "field_help",
    "field_of",
    "finite_float",
    "format_config",
    "format_value",
    "from_dict",
    "get_value",
    "iter_fields",
    "load_config",
    "metavar",
    "nonempty",
    "nonnegative_int",
    "number_arg",
    "option",
    "overrides_from_args",
    "parse_value",
    "positive",
    "positive_float",
    "positive_int",
    "to_dict",
    "unit_interval",
    "validate",
]

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass

# The version of a saved config's layout (`config_record`), under FORMAT_KEY at its top level. 1: the
# first versioned one (a config without the key is read as version 1 too). 2: the teachers of train-sit
# as `teachers.config.TeacherConfig` sections; a config class with an ``upgrade(data, fmt)`` static method
# reads older layouts through it.
CONFIG_FORMAT = 2
FORMAT_KEY = "format"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dataclass -> plain dict (tuples become lists, as in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_record(cfg: Any) -> dict[str, Any]:
    """A config as a run folder records it (``config.json``) and ``--dry-run`` prints it: `to_dict` with
    the layout's ``format`` first, and without the hidden testing aids that keep their defaults."""
    data = to_dict(cfg)
    for name, f, _ in iter_fields(type(cfg)):
        if f.metadata.get("hidden") and get_value(cfg, name) == f.default:
            *parents, leaf = name.split(".")
            node = data
            for p in parents:
                node = node[p]
            node.pop(leaf, None)
    return {FORMAT_KEY: CONFIG_FORMAT, **data}


def from_dict(
    cls: type[D],
    data: dict[str, Any],
    strict: bool = True,
    *,
    base: Any = None,
    source: str = "",
    _prefix: str = "",
) -> D:
    """Plain dict -> nested dataclass ``cls``, every value checked (`check_value`). Unknown keys are an
    error when ``strict``; a key the dict lacks takes ``base``'s value (a preset), else the default.

    A top-level ``format`` key (`config_record`) is read and dropped. Errors are one line naming
    ``source`` (the file) and the dotted key.
    """
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ValueError(f"{where}{_prefix.rstrip('.') or 'config'}: expected an object, got {data!r}")
    if not _prefix and FORMAT_KEY in data and FORMAT_KEY not in {f.name for f in dataclasses.fields(cls)}:
        data = dict(data)
        fmt = data.pop(FORMAT_KEY)
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
            raise ValueError(
                f"{where}{FORMAT_KEY}: expected a format version 1..{CONFIG_FORMAT}, got {fmt!r}"
            )
        if fmt > CONFIG_FORMAT:
            raise ValueError(
                f"{where}{FORMAT_KEY}: version {fmt} was written by a newer sendvae (this one reads up to "
                f"{CONFIG_FORMAT})"
            )
        if fmt < CONFIG_FORMAT and hasattr(cls, "upgrade"):
            data = getattr(cls, "upgrade")(data, fmt)  # noqa: B009 (a class without it is fine)
    elif not _prefix and hasattr(cls, "upgrade"):  # no format key: layout 1
        data = getattr(cls, "upgrade")(data, 1)  # noqa: B009
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and strict:
        keys = ", ".join(_prefix + k for k in map(str, unknown))
        raise ValueError(f"{where}unknown {cls.__name__} keys: {keys}; valid keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = getattr(base, f.name) if base is not None else None
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        nested = isinstance(inner, type) and dataclasses.is_dataclass(inner)
        if f.name not in data:
            if base is not None:
                kwargs[f.name] = _deepcopy(sub) if nested and sub is not None else sub
            continue
        value = data[f.name]
        if nested and isinstance(value, dict):
            value = from_dict(inner, value, strict, base=sub, source=source, _prefix=f"{_prefix}{f.name}.")
        elif nested and not (value is None and tp is not inner):
            raise ValueError(f"{where}{_prefix}{f.name}: expected an object, got {value!r}")
        else:
            try:
                value = check_value(f, tp, value)
            except ValueError as e:
                raise ValueError(f"{where}{_prefix}{f.name}: {e}") from None
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a __post_init__ that relates fields
        raise ValueError(f"{where}{_prefix.rstrip('.') or cls.__name__}: {e}") from None


def format_config(cfg: Any) -> str:
    return json.dumps(config_record(cfg), indent=2)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory = f.default_factory
    return factory() if callable(factory) else None


def load_config(cls: type[D], path: str | Path, presets: PresetRegistry | None = None) -> D:
    """A config saved as JSON (a run's ``config.json``, or the run folder holding it), strictly.

    With ``presets``: the file's ``preset`` must be one of them (or ``custom``) and is the base a key the
    file lacks takes its value from. A hidden testing aid is never read from a file: one at its default
    is passed over, any other value refused.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no saved config at {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a JSON config") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON config: {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is not a JSON config: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a config")
    for name, f, _ in iter_fields(cls):
        *parents, leaf = name.split(".")
        node: Any = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if f.metadata.get("hidden") and isinstance(node, dict) and leaf in node:
            default = _default(f)
            if node[leaf] not in (default, list(default) if isinstance(default, tuple) else default):
                raise ValueError(
                    f"{path}: {name}: a testing aid is not read from a file; give --{name} instead"
                )
            del node[leaf]
    base = None
    if presets is not None and "preset" in data:
        name = data["preset"]
        known = ["custom", *sorted(presets)]
        if not isinstance(name, str) or name not in known:
            raise ValueError(
                f"{path}: preset: unknown {presets.kind} preset {name!r}; one of {', '.join(known)}"
            )
        base = presets.build(name) if name in presets else None
    return from_dict(cls, data, base=base, source=str(path))


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
        try:
            if isinstance(value, str):
                value = parse_value(value, tp)
            value = check_value(f, tp, value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--{dotted}: {e}") from None
        setattr(obj, leaf, value)
    return cfg


def validate(cfg: Any, flag: bool = True) -> None:
    """Check every leaf of ``cfg`` against its type and domain (`check_value`): a config built in code (a
    preset, a pipeline's) meets the rules a flag or a file is held to. Errors name the flag (or the key)."""
    for name, f, tp in iter_fields(type(cfg)):
        try:
            check_value(f, tp, get_value(cfg, name))
        except ValueError as e:
            raise ValueError(f"{'--' if flag else ''}{name}: {e}") from None


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
