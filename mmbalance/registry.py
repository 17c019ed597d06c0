"""One generic registry for methods, datasets and models.

A registry maps a lowercase snake_case name to a class that subclasses the registry's base. Each
registered class carries a frozen dataclass ``Config`` whose defaults are the paper's, a mapping
``presets`` of per-dataset settings, and optional capability metadata read by :meth:`Registry.names`.

Contracts (see DESIGN.md "Registries"):

* a duplicate name raises, naming the module of the first registration and of the second;
* an unknown name raises with the available names and a close-match suggestion, never a fallback;
* :meth:`Registry.resolve_config` merges ``Config`` defaults <- preset <- overrides and raises on an
  unknown key, listing the valid fields;
* built-in entries are imported by an explicit loader on first use; if one fails to import, every
  lookup raises (chained to the import error) instead of serving a silently partial registry;
* third-party entries come from an entry-point group; a plugin that fails to import is listed as
  ``broken`` and re-raises (chained) when requested; a plugin whose name is already taken by another
  entry raises, naming both, when the plugins are loaded (never silently skipped);
* an optional ``validate(cls)`` checks each class at registration (e.g. a dataset's declared
  task, modalities and defaults, which the runner reads without building the dataset).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

from mmbalance.config import textual_none
from mmbalance.errors import ConfigError, RegistryError

__all__ = ["Registry", "resolve_dataclass", "config_fields"]

T = TypeVar("T", bound=type)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def config_fields(config_cls: type) -> list[str]:
    """Names of the fields of a Config dataclass, in declaration order."""
    return [f.name for f in dataclasses.fields(config_cls)]


def resolve_dataclass(config_cls: type, values: Mapping[str, Any], *, owner: str) -> Any:
    """Build ``config_cls(**values)`` after checking every key is a field; the word ``none`` is None
    where the field accepts None (:func:`mmbalance.config.textual_none`).

    Raises:
        ConfigError: naming the unknown key, the owner and the valid fields. Range checks are the
            dataclass's own ``__post_init__``; their ``ValueError`` is re-raised as ConfigError.
    """
    valid = config_fields(config_cls)
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r} for {owner}{hint} Valid keys: {', '.join(valid) or '(none)'}"
            )
    try:
        return config_cls(**textual_none(config_cls, values))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config for {owner}: {exc}") from exc


class _Broken:
    """Placeholder listed for a plugin whose import failed; requesting it re-raises."""

    def __init__(self, name: str, source: str, error: BaseException) -> None:
        self.name, self.source, self.error = name, source, error


class Registry(Generic[T]):
    """Name -> class map with capability filters and entry-point plugins.

    Args:
        kind: what is registered ("method", "dataset", "model"), used in messages.
        base: every registered class must subclass it.
        entry_point_group: group scanned once, lazily, for third-party entries.
        loader: callable importing the built-in entries (explicit imports), run lazily on first use.
        validate: called with each class at registration; raises (e.g. RegistryError) to refuse it.
    """

    def __init__(
        self,
        kind: str,
        base: type,
        *,
        entry_point_group: str | None = None,
        loader: Callable[[], None] | None = None,
        validate: Callable[[type], None] | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self.entry_point_group = entry_point_group
        self._loader = loader
        self._validate = validate
        self._entries: dict[str, type] = {}
        self._broken: dict[str, _Broken] = {}
        self._plugin_names: set[str] = set()
        self._loaded = False
        self._load_error: BaseException | None = None
        self._plugin_error: RegistryError | None = None
        self._plugins_loaded = False

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@METHODS.register("cggm")``. Sets ``cls.name``."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RegistryError(f"{self.kind} name must be lowercase snake_case, got {name!r}")

        def decorator(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise RegistryError(
                    f"{self.kind} {name!r}: {cls!r} must subclass "
                    f"{self.base.__module__}.{self.base.__qualname__}"
                )
            if name in self._entries:
                first = self._entries[name]
                raise RegistryError(
                    f"duplicate {self.kind} name {name!r}: already registered by "
                    f"{first.__module__}.{first.__qualname__}, again by {cls.__module__}.{cls.__qualname__}"
                )
            if self._validate is not None:
                self._validate(cls)
            cls.name = name
            self._entries[name] = cls
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and interactive use)."""
        self._entries.pop(name, None)
        self._broken.pop(name, None)
        self._plugin_names.discard(name)

    # -- lookup -------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            if self._loader is not None:
                try:
                    self._loader()
                except Exception as exc:  # any import failure; kept, so that every lookup re-raises it
                    self._load_error = exc
        if self._load_error is not None:
            raise RegistryError(
                f"built-in {self.kind}s failed to import, so the {self.kind} registry would be incomplete: "
                f"{self._load_error!r}"
            ) from self._load_error
        if not self._plugins_loaded:
            self._plugins_loaded = True
            try:
                self.load_plugins()
            except RegistryError as exc:  # a name collision: kept, so that every lookup re-raises it
                self._plugin_error = exc
        if self._plugin_error is not None:
            raise RegistryError(str(self._plugin_error)) from self._plugin_error

    def load_plugins(self) -> None:
        """Import the entry points of ``entry_point_group``; failures are recorded as broken.

        Raises:
            RegistryError: an entry point's name is already registered by another entry (a built-in
                or another plugin), naming both.
        """
        if self.entry_point_group is None:
            return
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._plugin_names:
                continue  # loaded by an earlier scan
            if ep.name in self._entries:
                first = self._entries[ep.name]
                raise RegistryError(
                    f"plugin {ep.name!r} ({ep.value}, entry-point group {self.entry_point_group!r}) collides "
                    f"with the {self.kind} {ep.name!r} already registered by "
                    f"{first.__module__}.{first.__qualname__}; "
                    "rename the plugin's entry point or uninstall it"
                )
            self._plugin_names.add(ep.name)
            try:
                obj = ep.load()
            except Exception as exc:  # a plugin can fail in any way; keep it listed, re-raise on use
                self._broken[ep.name] = _Broken(ep.name, ep.value, exc)
                continue
            if ep.name not in self._entries:
                # The module imported but did not register under the advertised name.
                if isinstance(obj, type) and issubclass(obj, self.base):
                    self.register(ep.name)(obj)
                else:
                    err = RegistryError(
                        f"plugin {ep.name!r} ({ep.value}) did not register a {self.kind} named {ep.name!r}"
                    )
                    self._broken[ep.name] = _Broken(ep.name, ep.value, err)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def get(self, name: str) -> T:
        """The class registered as ``name``.

        Raises:
            RegistryError: unknown name (with the available names and a close match), or a broken
                plugin (chained to its import error).
        """
        self._ensure_loaded()
        if name in self._entries:
            return self._entries[name]  # type: ignore[return-value]
        if name in self._broken:
            broken = self._broken[name]
            raise RegistryError(
                f"{self.kind} plugin {name!r} ({broken.source}) failed to import: {broken.error!r}"
            ) from broken.error
        available = sorted(self._entries)
        close = difflib.get_close_matches(str(name), available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(available) or '(none)'}"
        )

    def broken(self) -> dict[str, BaseException]:
        """Plugins that failed to import, with their errors."""
        self._ensure_loaded()
        return {name: b.error for name, b in self._broken.items()}

    def names(self, pattern: str = "*", **capabilities: Any) -> list[str]:
        """Sorted names matching an fnmatch ``pattern`` and every capability filter.

        Capability filters are passed to the class's ``supports(**capabilities)`` classmethod
        (e.g. ``task="seg"``, ``modalities=4``); a ``None`` value means "any".
        """
        self._ensure_loaded()
        caps = {k: v for k, v in capabilities.items() if v is not None}
        out = []
        for name, cls in self._entries.items():
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            if caps and not cls.supports(**caps):
                continue
            out.append(name)
        return sorted(out)

    def items(self) -> Iterable[tuple[str, type]]:
        self._ensure_loaded()
        return sorted(self._entries.items())

    # -- configuration ------------------------------------------------------------------------
    def resolve_config(
        self, name: str, preset: str | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Any:
        """Config defaults <- preset <- overrides, validated.

        Raises:
            RegistryError: unknown name or unknown preset (listing the presets).
            ConfigError: unknown key (listing valid fields) or out-of-range value.
        """
        cls = self.get(name)
        values: dict[str, Any] = {}
        if preset is not None:
            presets = getattr(cls, "presets", {}) or {}
            if preset not in presets:
                raise RegistryError(
                    f"unknown preset {preset!r} for {self.kind} {name!r}; "
                    f"available: {', '.join(sorted(presets)) or '(none)'}"
                )
            values.update(presets[preset])
        values.update(overrides or {})
        return resolve_dataclass(cls.Config, values, owner=f"{self.kind} {name!r}")

    def build(self, name: str, preset: str | None = None, /, *args: Any, **overrides: Any) -> Any:
        """Instantiate ``name`` with its resolved config: ``cls(config, *args)``."""
        config = self.resolve_config(name, preset, overrides)
        return self.get(name)(config, *args)
