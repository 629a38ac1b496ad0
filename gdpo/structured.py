"""Frozen-dataclass configs on OmegaConf: fields with their documentation and bounds, loading (a YAML
mapping plus ``key=value`` overrides, merged onto the schema, ``${key}`` interpolation resolved), errors
in the project's words (the dotted key and what it allows), the reference table, plain dicts.

Used by the training config (``gdpo.config``) and the OFQ experiment config (``compression.ofq``)::

    @dataclass(frozen=True)
    class Section:
        steps: int = doc(20, "training steps", ge=1)

    cfg = build(Schema, read_yaml(path), ["section.steps=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

try:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

    _NO_OMEGACONF = None
except ImportError as _err:  # the schema and its defaults still import (bench/gpu_check.py on a bare GPU machine)
    _NO_OMEGACONF = _err

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


def doc(default: Any, text: str, **bounds: float) -> Any:
    """A dataclass field with a default, its documentation and its bounds (``ge``, ``gt``, ``le``, ``lt``:
    checked at load, shown in the config reference); immutable defaults only."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples / doc_factory for container defaults")
    if set(bounds) - {"ge", "gt", "le", "lt"}:
        raise TypeError(f"unknown bounds {sorted(set(bounds) - {'ge', 'gt', 'le', 'lt'})}")
    return field(default=default, metadata={"doc": text, "bounds": bounds})


def doc_factory(factory: Any, text: str) -> Any:
    return field(default_factory=factory, metadata={"doc": text})


def build(schema: type[T], raw: dict, overrides: Sequence[str] = ()) -> T:
    """The frozen ``schema`` instance of a YAML mapping and ``key=value`` overrides, through OmegaConf:
    overrides (list elements by index), the merge onto the schema (unknown keys, types, Literal values),
    ``${key}`` interpolation; then each field's bounds. Every error names the key."""
    if _NO_OMEGACONF is not None:
        raise ConfigError(f"loading a config needs omegaconf, which does not import here ({_NO_OMEGACONF})")
    tree = OmegaConf.create(raw)
    for item in overrides:
        apply_override(tree, item)
    cfg = _structured(schema, tree, "")
    check_bounds(cfg)
    return cfg


def read_yaml(path: Path) -> dict:
    """A config file's mapping (YAML ``safe_load``: no tags that build objects); errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def apply_override(tree: DictConfig, item: str) -> None:
    """Apply one ``a.b.c=value`` override (the value read as YAML) in place; list elements by index."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {' '.join(str(err).split())}") from None
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):  # OmegaConf would replace a value it has to go below: refuse that
        where = ".".join(parts[: i + 1])
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override key '{where}': index {part!r} is out of range 0..{len(node) - 1}")
            node = node._get_node(int(part))
        elif isinstance(node, DictConfig):
            if part not in node or node._get_node(part)._is_none():
                break  # created as a section by the update
            node = node._get_node(part)
        else:
            above = ".".join(parts[:i])
            raise ConfigError(
                f"override key '{key}' goes below '{above}', which is a value ({node._value()!r}), not a section"
            )
    try:
        OmegaConf.update(tree, key, value, merge=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {item!r}: {err.msg.splitlines()[0]}") from None


def _structured(schema: type[T], tree: Any, prefix: str) -> T:
    """``tree`` merged onto ``schema``; OmegaConf types ``tuple[Dataclass, ...]`` elements as plain mappings,
    so each element is built here against its own dataclass."""
    _check_sections(schema, tree, prefix)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), tree))
    except OmegaConfBaseException as err:
        raise ConfigError(_message(err, schema, tree, prefix)) from None
    return _typed(obj, schema, prefix)


def _check_sections(schema: type, tree: Any, prefix: str) -> None:
    """A section (a dataclass field) must be a mapping: OmegaConf's own error here names no key."""
    if not isinstance(tree, DictConfig):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {_shown(tree)}")
    if tree._is_none():
        return
    hints = typing.get_type_hints(schema)
    for name in tree:
        tp, node = hints.get(name), tree._get_node(name)
        if node._is_none():
            continue
        if dataclasses.is_dataclass(tp):
            _check_sections(tp, node, _join(prefix, name))
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if isinstance(node, ListConfig):
                for i in range(len(node)):
                    _check_sections(typing.get_args(tp)[0], node._get_node(i), _join(prefix, f"{name}.{i}"))


def _typed(obj: Any, schema: type, prefix: str) -> Any:
    """Lists of the schema's ``tuple`` fields as tuples; mappings in ``tuple[Dataclass, ...]`` built."""
    hints, changes = typing.get_type_hints(schema), {}
    for f in dataclasses.fields(schema):
        tp, value, key = hints[f.name], getattr(obj, f.name), _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            changes[f.name] = _typed(value, tp, key)
        elif typing.get_origin(tp) is tuple and value is not None:
            item = typing.get_args(tp)[0]
            if dataclasses.is_dataclass(item):
                value = [
                    v if isinstance(v, item) else _structured(item, OmegaConf.create(v), f"{key}.{i}")
                    for i, v in enumerate(value)
                ]
            changes[f.name] = tuple(value)
    return dataclasses.replace(obj, **changes)


def _message(err: OmegaConfBaseException, schema: type, tree: Any, prefix: str) -> str:
    """OmegaConf's error in the project's words: the dotted key and what it allows."""
    key = (err.full_key or "").replace("[", ".").replace("]", "")
    full = _join(prefix, key)
    parts = key.split(".") if key else []
    cls, tp = schema, None
    for part in parts:  # the dataclass the key lives in, and the field's type
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        tp = hints.get(part)
        if dataclasses.is_dataclass(tp) and part != parts[-1]:
            cls = tp
    if isinstance(err, ConfigKeyError) and parts:
        fields = [f.name for f in dataclasses.fields(cls)]
        near = difflib.get_close_matches(parts[-1], fields, n=1)
        hint = f"; did you mean '{_join(prefix, '.'.join(parts[:-1] + near))}'?" if near else ""
        return f"unknown config key '{full}'{hint} (allowed: {', '.join(sorted(fields))})"
    if isinstance(err, InterpolationResolutionError):
        return f"config key '{full}': {err.msg.splitlines()[0]}"
    if isinstance(err, ValidationError) and tp is not None:
        value = OmegaConf.select(tree, key, throw_on_missing=False)
        if typing.get_origin(tp) is Literal:
            allowed = ", ".join(map(repr, typing.get_args(tp)))
            return f"config key '{full}' = {_plain(value)!r} is not allowed (allowed: {allowed})"
        return f"config key '{full}' must be {_kind(tp)}, got {_shown(value)}"
    return f"config key '{full or '<root>'}': {err.msg.splitlines()[0]}"


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}


def _kind(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(tp) is tuple:
        return "a list"
    return _KINDS.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        return type(OmegaConf.to_container(value)).__name__
    return repr(_plain(value))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else str(prefix or key)


def check_bounds(cfg: Any, prefix: str = "") -> None:
    """Every number finite, and within its field's ``bounds`` (``doc(..., ge=1)``); null where allowed."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, key)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, v in enumerate(value):
                check_bounds(v, f"{key}.{i}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and f.metadata.get("bounds"):
            bounds = f.metadata["bounds"]
            if not all(_OPS[op](value, limit) for op, limit in bounds.items()):
                raise ConfigError(f"config key '{key}': must be {bounds_text(bounds)}, got {value!r}")


_OPS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def bounds_text(bounds: dict) -> str:
    """``{"gt": 0, "le": 1}`` -> ``in (0, 1]``; one bound -> ``> 0``."""
    low = [(op, v) for op, v in bounds.items() if op in ("ge", "gt")]
    high = [(op, v) for op, v in bounds.items() if op in ("le", "lt")]
    if low and high:
        (lo, a), (hi, b) = low[0], high[0]
        return f"in {'[' if lo == 'ge' else '('}{a}, {b}{']' if hi == 'le' else ')'}"
    op, v = (low or high)[0]
    return f"{ {'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'}[op] } {v}"


def reference_table(schema: type) -> str:
    """Markdown table of every key of ``schema``: type (with bounds), default, documentation."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints_cache: dict[type, dict] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = hints_cache.setdefault(cls, typing.get_type_hints(cls))
        for f in dataclasses.fields(cls):
            key = _join(prefix, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, key)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if typing.get_origin(tp) is tuple and default and dataclasses.is_dataclass(default[0]):
                lines.append(f"| `{key}` | list | see below | {f.metadata['doc']} |")
                walk(type(default[0]), f"{key}.N")
                continue
            bounds = f" ({bounds_text(f.metadata['bounds'])})" if f.metadata.get("bounds") else ""
            lines.append(f"| `{key}` | {_type_name(tp)}{bounds} | `{_plain(default)}` | {f.metadata['doc']} |")

    walk(schema, "")
    return "\n".join(lines) + "\n"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args).replace("NoneType", "null")
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-ready mapping of a config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)
