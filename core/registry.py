"""One registry mechanism for every kind of plugin (backbones, objectives, parametrizations, augmentations, priors,
data sources), after timm's ``@register_model`` and ``timm/models/_registry.py``.

An entry carries what callers need without building the plugin: its name and kind, the paper it implements, a
one-line description, free metadata (e.g. a backbone's BatchNorm flag) and the schema of its options (the fields of
the plugin's nested ``Config`` dataclass: name, type, default, doc).

Built-ins register by decorator when their modules are imported; a registry imports its built-in modules on first
use. Third parties join through an entry-point group, and for safety their code is imported only when a name is asked
for that no built-in has (:meth:`Registry.get`); :meth:`Registry.names` and :meth:`Registry.entries` list them too and
so do import every installed plugin of the group. A plugin may not shadow a built-in name, and a plugin that fails to
import is an error when it is the one asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from distillset.core.errors import DistillError, unknown_name

log = logging.getLogger("distillset.registry")


@dataclass(frozen=True)
class Option:
    """One field of a plugin's ``Config``: what ``distillset methods NAME`` prints."""

    name: str
    type: str
    default: Any
    doc: str = ""


@dataclass(frozen=True)
class Entry:
    """A registered plugin and its metadata.

    Attributes:
        name: the registry name (what recipes write).
        kind: the registry's kind (objective, backbone, ...).
        obj: the registered class or builder function.
        paper: the publication the plugin implements ("" if none).
        description: one line (default: the first line of the object's docstring).
        metadata: kind-specific facts (e.g. ``has_bn`` of a backbone).
        builtin: registered by distillset itself (False: by a third-party plugin).
    """

    name: str
    kind: str
    obj: Any
    paper: str = ""
    description: str = ""
    metadata: dict = field(default_factory=dict)
    builtin: bool = True

    @property
    def config(self) -> type | None:
        """The plugin's options dataclass, if it has one."""
        cfg = getattr(self.obj, "Config", None)
        return cfg if isinstance(cfg, type) and dataclasses.is_dataclass(cfg) else None

    def options(self) -> list[Option]:
        """The option schema: one :class:`Option` per field of :attr:`config`."""
        return options_of(self.config) if self.config is not None else []

    def to_json(self) -> dict:
        """Plain-data view (for ``--json`` listings)."""
        return {"name": self.name, "kind": self.kind, "paper": self.paper, "description": self.description,
                "builtin": self.builtin, "metadata": _plain(self.metadata),
                "options": [{"name": o.name, "type": o.type, "default": _plain(o.default), "doc": o.doc}
                            for o in self.options()]}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def options_of(cls: type) -> list[Option]:
    """The fields of an options dataclass with their types, defaults and ``Attributes:`` docs."""
    from distillset.core.config import field_default, field_docs

    docs = field_docs(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  (an annotation that cannot be evaluated here: show it as written)
        hints = {}
    out = []
    for f in dataclasses.fields(cls):
        out.append(Option(f.name, _type_name(hints.get(f.name, f.type)), field_default(f), docs.get(f.name, "")))
    return out


def _first_line(obj: Any) -> str:
    """The first sentence of the docstring's first paragraph."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    para = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
    head, sep, _ = para.partition(". ")
    return head + ("." if sep else "")


def _package_of(ep) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return name or ep.value.partition(":")[0]


class Registry:
    """Named plugins of one kind.

    Args:
        kind: what the entries are, in messages (``objective``, ``backbone``, ``data source``, ...).
        entry_point_group: the group third-party packages declare (e.g. ``distillset.objectives``).
        builtins: modules whose import registers the built-in entries (imported on first use).
    """

    def __init__(self, kind: str, entry_point_group: str, builtins: Iterable[str] = ()):
        self.kind, self.group = kind, entry_point_group
        self._builtin_modules = tuple(builtins)
        self._entries: dict[str, Entry] = {}
        self._builtins_loaded = not self._builtin_modules
        self._plugins_loaded = False
        self._loading_plugin: str | None = None  # the package being imported (its registrations are not built-in)

    # ---------------------------------------------------------------------------------------------- register

    def register(self, name: str, *, paper: str = "", description: str = "", **metadata: Any) -> Callable:
        """Decorator registering a class or builder under ``name`` with its metadata."""

        def deco(obj):
            self.add(name, obj, paper=paper, description=description, **metadata)
            return obj

        return deco

    def add(self, name: str, obj: Any, *, paper: str = "", description: str = "", **metadata: Any) -> Entry:
        """Register ``obj`` under ``name`` (what :meth:`register` does); a name taken by another object is an error."""
        old = self._entries.get(name)
        if old is not None and old.obj is not obj:
            who = f"plugin package '{self._loading_plugin}'" if self._loading_plugin else f"{obj!r}"
            raise DistillError(f"{who} registers {self.kind} '{name}', which is already taken by "
                               f"{'a built-in' if old.builtin else 'another plugin'}; plugins may not shadow "
                               "registered names: rename it or uninstall the package.")
        if isinstance(obj, type) and hasattr(obj, "name"):
            obj.name = name  # a plugin class knows its registry name (messages, manifests)
        entry = Entry(name, self.kind, obj, paper, description or _first_line(obj), dict(metadata),
                      builtin=self._loading_plugin is None)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests registering temporary plugins clean up with this)."""
        self._entries.pop(name, None)

    def forget_plugins(self) -> None:
        """Drop every third-party entry, so the next lookup reads the entry points again."""
        self._entries = {k: e for k, e in self._entries.items() if e.builtin}
        self._plugins_loaded = False

    # ------------------------------------------------------------------------------------------------ lookup

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for mod in self._builtin_modules:
            importlib.import_module(mod)

    def _entry_points(self, name: str | None = None) -> list:
        from importlib.metadata import entry_points

        eps = entry_points(group=self.group)
        return [ep for ep in eps if name is None or ep.name == name]

    def _load_plugin(self, ep) -> Entry:
        """Import one entry point and register what it names (a one-line error when it cannot be imported)."""
        pkg = _package_of(ep)
        if ep.name in self._entries and self._entries[ep.name].builtin:
            raise DistillError(f"plugin package '{pkg}' declares {self.kind} '{ep.name}' (entry point {ep.value}), "
                               f"a built-in name; plugins may not shadow built-ins: rename it or uninstall '{pkg}'.")
        self._loading_plugin = pkg
        try:
            obj = ep.load()
        except DistillError:
            raise
        except Exception as e:  # noqa: BLE001  (a plugin may fail in any way; it becomes one line)
            raise DistillError(f"{self.kind} '{ep.name}' comes from plugin package '{pkg}' ({ep.value}), which "
                               f"fails to import ({type(e).__name__}: {e}); fix or uninstall '{pkg}'.") from None
        finally:
            self._loading_plugin = None
        if ep.name in self._entries and self._entries[ep.name].obj is obj:
            return self._entries[ep.name]  # the plugin registered itself on import
        self._loading_plugin = pkg
        try:
            return self.add(ep.name, obj)
        finally:
            self._loading_plugin = None

    def _load_all_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in self._entry_points():
            existing = self._entries.get(ep.name)
            if existing is not None and not existing.builtin:
                continue
            try:
                self._load_plugin(ep)
            except DistillError as e:
                if existing is not None and existing.builtin:
                    raise
                # listing must not fail for a broken plugin nobody asked for; asking for it by name is the error
                log.warning("%s", e)

    def entry(self, name: str) -> Entry:
        """The entry of ``name``: a built-in, else the installed plugin of that name (imported only now)."""
        self._load_builtins()
        if name in self._entries:
            return self._entries[name]
        eps = self._entry_points(name)
        if eps:
            return self._load_plugin(eps[0])
        # the names of installed plugins are read from their metadata: nothing is imported to list them here
        raise unknown_name(self.kind, name, sorted(set(self._entries) | {ep.name for ep in self._entry_points()}))

    def get(self, name: str) -> Any:
        """The class or builder registered under ``name`` (see :meth:`entry`)."""
        return self.entry(name).obj

    def registered(self, name: str) -> bool:
        """Whether ``name`` is registered already (no module is imported: a name registered at run time, e.g. in a
        notebook or a test, counts)."""
        return name in self._entries

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries or bool(self._entry_points(name))

    def names(self, plugins: bool = True) -> list[str]:
        """Sorted registered names; with ``plugins`` (default) every installed plugin of the group is imported."""
        self._load_builtins()
        if plugins:
            self._load_all_plugins()
        return sorted(self._entries)

    def entries(self, plugins: bool = True) -> list[Entry]:
        """Every entry, sorted by name (imports installed plugins like :meth:`names`)."""
        return [self._entries[n] for n in self.names(plugins)]
