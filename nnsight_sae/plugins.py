"""The plugin manager: loads entry points of group ``nnsight_sae`` and collects
what each plugin registers, remembering which plugin registered what.

First-party plugins (those shipped in this distribution's ``plugins/`` folder)
are loaded through the same entry-point group as third-party ones.
``NNSIGHT_SAE_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the first-party ones;
``NNSIGHT_SAE_BLOCK_PLUGINS=a,b`` blocks plugins by entry-point name.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError

GROUP = "nnsight_sae"
DISTRIBUTION = "nnsight-sae"

# registration hook -> (registry attribute, what one entry is called in messages)
KINDS = {
    "nnsight_sae_dictionary_types": ("dictionary_types", "dictionary type"),
    "nnsight_sae_analyses": ("analyses", "analysis"),
    "nnsight_sae_circuit_methods": ("circuit_methods", "circuit method"),
    "nnsight_sae_tasks": ("tasks", "task"),
    "nnsight_sae_architectures": ("architectures", "architecture"),
    "nnsight_sae_formats": ("formats", "dictionary format"),
}


@dataclass(frozen=True)
class Entry:
    """One registered thing and the plugin that registered it."""

    name: str
    obj: object
    plugin: str


@dataclass
class Registry:
    """Everything the plugins registered, by kind then name."""

    pm: pluggy.PluginManager | None = None  # for the answer hooks
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution
    dictionary_types: dict[str, Entry] = field(default_factory=dict)
    analyses: dict[str, Entry] = field(default_factory=dict)
    circuit_methods: dict[str, Entry] = field(default_factory=dict)
    tasks: dict[str, Entry] = field(default_factory=dict)
    architectures: dict[str, Entry] = field(default_factory=dict)
    formats: dict[str, Entry] = field(default_factory=dict)

    def get(self, kind: str, name: str):
        """The object registered as ``name`` in ``kind`` (e.g. "dictionary_types")."""
        table = getattr(self, kind)
        if name not in table:
            what = dict(KINDS.values())[kind]
            known = ", ".join(sorted(table)) or "none"
            raise UnknownNameError(f"unknown {what} {name!r}; registered: {known}")
        return table[name].obj

    def to_json(self) -> dict:
        def table(entries):
            return {n: {"plugin": e.plugin, **_describe(e.obj)} for n, e in sorted(entries.items())}

        return {"plugins": dict(sorted(self.plugins.items())),
                **{attr: table(getattr(self, attr)) for attr, _ in KINDS.values()}}


def _describe(obj) -> dict:
    doc = (getattr(obj, "help", None) or (obj.__doc__ or "")).strip().splitlines()
    out = {"help": doc[0] if doc else ""}
    if getattr(obj, "model_types", None):
        out["model_types"] = list(obj.model_types)
    if getattr(obj, "library", None):  # a file format: the maker's code it was checked against
        out.update(library=obj.library, writes=obj.writes)
    options = getattr(obj, "config_class", None) or getattr(obj, "Options", None)
    if options is not None:  # the settings it takes, with their defaults (None: required or unset)
        out["options"] = {name: None if o.required else o.default for name, o in options.declared().items() if o.cli}
    return out


def _env_list(var: str) -> list[str]:
    return [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]


def build_plugin_manager(*, autoload: bool | None = None, blocked: list[str] | None = None,
                         extra: list[object] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager, its plugins loaded by pluggy's entry-point loader.

    autoload: load third-party entry points too (default: unless
    NNSIGHT_SAE_DISABLE_PLUGIN_AUTOLOAD is set); without it only this distribution's
    own plugins load. blocked: entry-point names not to load (default:
    NNSIGHT_SAE_BLOCK_PLUGINS). extra: plugin objects to register directly (tests, notebooks).
    """
    if autoload is None:
        autoload = os.environ.get("NNSIGHT_SAE_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    blocked = _env_list("NNSIGHT_SAE_BLOCK_PLUGINS") if blocked is None else list(blocked)
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist else "?"
        if not autoload and dist.replace("_", "-").lower() != DISTRIBUTION:
            continue
        try:  # one entry point at a time, so a broken one can be named
            pm.load_setuptools_entrypoints(GROUP, name=ep.name)
        except Exception as e:
            raise PluginError(f"plugin {ep.name!r} (from {dist}) failed to load: {e}") from e
    for plugin in extra:
        pm.register(plugin, name=getattr(plugin, "name", None))
    pm.check_pending()
    return pm


def collect(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook and build the registry. Each implementation is called
    on its own, so every entry records the plugin that registered it."""
    dists = {pm.get_name(plugin): dist.project_name for plugin, dist in pm.list_plugin_distinfo()}
    reg = Registry(pm=pm, plugins={name: dists.get(name, "direct") for name, p in pm.list_name_plugin() if p})
    for hook_name, (attr, what) in KINDS.items():
        table = getattr(reg, attr)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            for obj in impl.function() or []:
                name = getattr(obj, "type_name", None) or getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {impl.plugin_name!r} registered a {what} without a name: {obj!r}")
                if name in table:
                    raise PluginError(f"{what} {name!r} is registered by both plugin "
                                      f"{table[name].plugin!r} and plugin {impl.plugin_name!r}; "
                                      f"block one with NNSIGHT_SAE_BLOCK_PLUGINS")
                table[name] = Entry(name, obj, impl.plugin_name)
    return reg


_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, built on first use from the environment's settings."""
    global _registry
    if _registry is None:
        _registry = collect(build_plugin_manager())
    return _registry


def reset_registry(reg: Registry | None = None) -> None:
    """Drop the cached registry (or install ``reg``); the next call rebuilds it."""
    global _registry
    _registry = reg


def create_dictionary(type_name: str, **options):
    """A new, randomly initialised dictionary of a registered type, e.g.
    ``create_dictionary("topk", d_in=576, d_sae=4608, site="resid_post.6", k=32)``;
    bad options raise :class:`OptionError`."""
    return registry().get("dictionary_types", type_name)(options)
