"""Config dataclasses: one typed validation for every field, wherever the value comes from.

Every Config (training, method, dataset, model) is a frozen dataclass that subclasses
:class:`ConfigBase`. Its ``__post_init__`` first checks each field's value against the field's
declared type (:func:`check_types`), then calls the config's own :meth:`ConfigBase.check` for
ranges. So ``--set lr=true``, ``lr = "abc"`` in a TOML spec and ``TrainConfig(lr="abc")`` in Python
all fail the same way, with the field, the value and the expected type.

Supported annotations: ``bool``, ``int``, ``float`` (an int is accepted), ``str``, ``X | None``,
``Literal[...]``, ``tuple[X, ...]`` / ``list[X]`` (a list or tuple of X), ``dict[str, X]`` /
``Mapping[str, X]``, ``Any``. ``bool`` is never accepted for ``int`` or ``float``.

The textual form of a config value is TOML: :func:`parse_set` reads ``--set key=value`` options
and :func:`format_set` writes one back, so a run's command line reproduces its resolved values.
TOML has no null, so the word ``none`` stands for None in a field that accepts None and does not
accept that string itself (``--set clip_grad_norm=none``, ``clip_grad_norm = "none"`` in a spec):
:func:`textual_none`, applied wherever names and overrides are resolved into a Config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from mmbalance.errors import ConfigError

__all__ = [
    "ConfigBase",
    "check_types",
    "type_name",
    "need",
    "finite",
    "parse_set",
    "format_set",
    "format_value",
    "takes_list",
    "textual_none",
    "NONE_WORD",
]

NONE_WORD = "none"  # the textual None (TOML has no null): ``--set clip_grad_norm=none``

_BARE_WORD = re.compile(r"^[^\s\"'\[\]{}=,#]+$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def type_name(annotation: Any) -> str:
    """Readable name of an annotation: ``an integer``, ``a number or None``, ``one of ('a', 'b')``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " or ".join(type_name(a) for a in args)
        return f"{inner} or None" if len(args) < len(typing.get_args(annotation)) else inner
    if origin is Literal:
        return f"one of {typing.get_args(annotation)!r}"
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        return f"a list of {type_name(args[0]) if args else 'values'}"
    if origin in (dict, Mapping, typing.Mapping) or annotation in (dict, Mapping):
        args = typing.get_args(annotation)
        return f"a table of {type_name(args[1]) if len(args) == 2 else 'values'}"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "None",
    }.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if not isinstance(value, list | tuple):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping, typing.Mapping) or annotation in (dict, Mapping):
        args = typing.get_args(annotation)
        if not isinstance(value, Mapping):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this checker does not know (a Protocol, a callable): left to check()


def check_types(config: Any) -> None:
    """Check every field of a Config dataclass instance against its declared type.

    Raises:
        ConfigError: (a ``ValueError``) naming the first field whose value does not match, the value
            and the expected type.
    """
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        annotation = hints.get(f.name, Any)
        value = getattr(config, f.name)
        if not _matches(value, annotation):
            expected = type_name(annotation)
            raise ConfigError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__})")


def need(config: Any, ok: bool, field_name: str, expected: str) -> None:
    """Range check helper for :meth:`ConfigBase.check`: raise naming the field, value and expectation.

    Raises:
        ConfigError: (a ``ValueError``) unless ``ok``.
    """
    if not ok:
        raise ConfigError(f"{field_name} must be {expected}, got {getattr(config, field_name)!r}")


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (NaN and infinities are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class ConfigBase:
    """Base of every Config dataclass: typed validation of every field, then :meth:`check`.

    Mixins (``HeadConfig``, ``ModulationWindow``) extend ``__post_init__`` cooperatively: each calls
    ``super().__post_init__()`` first, so types are always checked before any range rule runs.
    """

    def __post_init__(self) -> None:
        check_types(self)
        self.check()

    def check(self) -> None:
        """Range rules of the config's own fields; raise ``ValueError`` naming the field."""


# -- the textual form: ``--set key=value`` ---------------------------------------------------------
def _toml_value(text: str) -> Any:
    return tomllib.loads(f"v = {text}")["v"]


def parse_set(items: Sequence[str], *, option: str = "--set") -> dict[str, Any]:
    """``["epochs=3", "method.rho=1.2", "modality=text"]`` -> ``{"epochs": 3, ...}``.

    Values are TOML values (``3``, ``1e-3``, ``true``, ``"text"``, ``[1, 2]``); a bare word without
    spaces or quotes (``text``, ``/data/mosi``) is a string. Later items win. Whether a value fits
    its field is checked when the run is resolved (the Config's declared type).

    Raises:
        ConfigError: naming ``option``, the item and the expected form ``key=value``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ConfigError(f"{option} expects key=value (e.g. {option} epochs=3); got {item!r}")
        if not _KEY_RE.match(key):
            raise ConfigError(
                f"{option} key must be a config field, optionally prefixed (epochs, method.rho); "
                f"got {key!r} in {item!r}"
            )
        try:
            value = _toml_value(raw)
        except tomllib.TOMLDecodeError:
            if not _BARE_WORD.match(raw):
                raise ConfigError(
                    f"{option} value in {item!r} is not a TOML value (number, true/false, \"string\", "
                    "[array]) or a bare word; quote strings that contain spaces or special characters"
                ) from None
            value = raw
        if isinstance(value, dict):
            raise ConfigError(f"{option} value in {item!r} must be a scalar or an array, not a table")
        out[key] = value
    return out


def _accepts(annotation: Any, value: Any) -> bool:
    return _matches(value, annotation)


def takes_list(annotation: Any) -> bool:
    """Whether a field of this type takes a list (``tuple[int, ...]``, ``list[str] | None``)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(takes_list(a) for a in typing.get_args(annotation))
    return origin in (tuple, list) or annotation in (tuple, list)


def textual_none(config_cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the word ``none`` (any case) replaced by None in the fields whose type accepts
    None but not that string (a ``str | None`` field keeps the string: its ``check`` decides)."""
    hints = _hints(config_cls)
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and value.lower() == NONE_WORD and key in hints:
            annotation = hints[key]
            if _accepts(annotation, None) and not _accepts(annotation, value):
                out[key] = None
    return out


def format_value(value: Any) -> str:
    """The TOML text of an override value (None as ``none``), as :func:`parse_set` reads it back."""
    if value is None:
        return NONE_WORD
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, str):
        if _BARE_WORD.match(value):
            try:
                _toml_value(value)
            except tomllib.TOMLDecodeError:
                return value  # parses back as the same bare word
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write override value {value!r} ({type(value).__name__}) as --set")


def format_set(key: str, value: Any) -> str:
    """One shell-quoted ``--set`` argument that :func:`parse_set` reads back as ``{key: value}``."""
    return shlex.quote(f"{key}={format_value(value)}")
