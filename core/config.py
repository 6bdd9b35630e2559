"""Typed configs: one dataclass per stage is the single source of truth; YAML recipes and CLI flags only fill it.

``from_dict`` rejects unknown keys with a hint, converts YAML scalars to the field types, and runs the dataclass's
``__post_init__`` checks. ``add_flags``/``flags_to_dict`` derive ``--field value`` flags from the fields, so a new
field is a new flag with no CLI code.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distillset.core.errors import DistillError, unknown_name

T = TypeVar("T")


def field_docs(cls) -> dict[str, str]:
    """Per-field help parsed from the ``Attributes:``-style lines (``name: text``) of the class docstring and of its
    dataclass bases (a subclass documents the fields it adds or changes)."""
    docs: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        current = None
        for line in (klass.__dict__.get("__doc__") or "").splitlines():
            s = line.strip()
            head, sep, rest = s.partition(":")
            if sep and head in names:
                current = head
                docs[head] = rest.strip()
            elif current and s:
                docs[current] += " " + s
            else:
                current = None
    return docs


def _convert(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, name)
            except DistillError as e:
                errors.append(str(e))
        raise DistillError(errors[0] if errors else f"bad value for {name}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise DistillError(f"config '{name}' must be a list, got {value!r}.")
        return [_convert(v, args[0] if args else Any, name) for v in value]
    if origin is tuple:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise DistillError(f"config '{name}' needs {len(args)} values (e.g. {','.join(['0.5'] * len(args))}), "
                               f"got {len(value)}: {value!r}.")
        types_ = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args) or [Any] * len(value)
        return tuple(_convert(v, a, name) for v, a in zip(value, types_))
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = parse_yaml_value(value, name) or {}
        if not isinstance(value, dict):
            raise DistillError(f"config '{name}' must be a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise DistillError(f"config '{name}' must be true or false, got {value!r}.")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise DistillError(f"config '{name}' must be {tp.__name__}, got {value!r}.") from None
    return value


def parse_yaml_value(text: str, name: str) -> Any:
    """A flag's value parsed as YAML (``{a: 1}``, ``[x, y]``); bad YAML is a one-line error naming the flag."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistillError(f"--{name.replace('_', '-')} {text!r} is not valid YAML ({first}); write a mapping as "
                           "'{key: value}' or a list as '[a, b]'.") from None


def check_number(value: float, name: str, low: float = 0.0, high: float = 1e6, allow_low: bool = False) -> None:
    """Refuse a non-finite ``value`` or one outside ``(low, high]`` (``[low, high]`` with ``allow_low``), e.g. an
    ``lr`` of -1, nan or 1e38 that would otherwise train to NaN or silently do nothing."""
    ok = math.isfinite(value) and (value >= low if allow_low else value > low) and value <= high
    if not ok:
        bound = f"{'[' if allow_low else '('}{low:g}, {high:g}]"
        raise DistillError(f"{name} must be a finite number in {bound}, got {value!r}.")


def from_dict(cls: type[T], data: dict | None, what: str = "") -> T:
    """Build ``cls`` from a mapping; unknown keys and wrong types are one-line errors.

    Args:
        cls: the config dataclass.
        data: field values (YAML scalars are converted to the field types).
        what: what the options belong to, for messages (e.g. ``objective 'dm'``); default: the class name.
    """
    if data is not None and not isinstance(data, dict):
        raise DistillError(f"{what or cls.__name__} options must be a mapping, got {data!r}.")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            if what and not fields:
                raise DistillError(f"{what} takes no options, got '{key}'; remove it.")
            raise unknown_name(f"{what} option" if what else f"{cls.__name__} option", key, list(fields))
    try:
        kwargs = {k: _convert(v, hints[k], k) for k, v in data.items()}
        return cls(**kwargs)
    except TypeError as e:
        raise DistillError(f"{what or cls.__name__}: {e}") from None
    except DistillError as e:
        if what and not str(e).startswith(what):
            raise DistillError(f"{what}: {e}") from None
        raise


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DistillError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DistillError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DistillError(f"{path} must hold a mapping of options.")
    return data


def fingerprint(cfg: Any, ignore: tuple[str, ...] = ()) -> str:
    """Hash of the options that change the result (``ignore`` lists those that do not, e.g. log frequency).

    Options left at their default are not hashed, so a release that adds an option (with a default that keeps the
    old behaviour) still recognises, and resumes, the output folders of earlier releases.
    """
    try:
        defaults = to_dict(type(cfg)())
    except (TypeError, DistillError):  # a config without a default for every field: hash them all
        defaults = {}
    d = {k: v for k, v in to_dict(cfg).items() if k not in ignore and (k not in defaults or v != defaults[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict | None, new: dict, ignore: tuple[str, ...] = ()) -> str:
    """The fields that differ between two resolved configs, as ``name: old -> new`` (at most 6, nested options
    joined with dots), for the message that refuses to mix two runs in one folder."""
    if not isinstance(old, dict):
        return ""
    out: list[str] = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            if not prefix and k in ignore:
                continue
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, f"{prefix}{k}.")
            elif x != y:
                out.append(f"{prefix}{k}: {json.dumps(x, default=str)} -> {json.dumps(y, default=str)}")

    walk(old, json.loads(json.dumps(new, default=str)), "")
    return ", ".join(out[:6]) + (f" and {len(out) - 6} more" if len(out) > 6 else "")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--name`` flag per field (``_`` and ``-`` both accepted); values are parsed by :func:`from_dict`."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] if "_" not in f.name else [flag, "--" + f.name]
        metavar, default = _flag_form(hints.get(f.name, str), f)
        text = docs.get(f.name, "").replace("%", "%%")
        parser.add_argument(*names, dest=f"cfg_{f.name}", default=None, metavar=metavar,
                            help=f"{text} (default: {default})" if text else f"default: {default}")


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (a fresh one from its factory), ``None`` when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _flag_form(tp: Any, f: dataclasses.Field) -> tuple[str, str]:
    """``(metavar, default as typed on the command line)`` of a config field, for ``--help``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), str)
        origin = typing.get_origin(tp)
    value = field_default(f)
    if tp is bool:
        return "{true,false}", str(value).lower()
    if origin is list or origin is tuple:
        return "A,B,...", ",".join(map(str, value)) if value else "none"
    if origin is dict or tp is dict:
        return "'{KEY: VALUE}'", json.dumps(value) if value else "{}"
    name = getattr(tp, "__name__", "VALUE").upper()
    return name, repr(value) if isinstance(value, str) else str(value)


def flags_to_dict(ns: argparse.Namespace, cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f"cfg_{f.name}", None)
        if v is not None:
            out[f.name] = parse_yaml_value(v, f.name) if isinstance(v, str) and v[:1] in "{[" else v
    return out


def write_config(folder: str | Path, cfg: Any) -> None:
    from distillset.core.io import write_text

    write_text(Path(folder) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
