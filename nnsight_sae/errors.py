"""Typed exceptions. The CLI turns any of these into one line on stderr and exit code 2."""


class NnsightSaeError(Exception):
    """Base class for every error caused by bad input to nnsight-sae."""


class PluginError(NnsightSaeError):
    """A plugin is misbehaving: two plugins claim one name, or a hook returned junk."""


class UnknownNameError(NnsightSaeError, KeyError):
    """A dictionary type, analysis, task or plugin name that nothing registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class UnknownFamilyError(NnsightSaeError):
    """A model whose architecture no registered architecture map covers."""


class SiteError(NnsightSaeError, ValueError):
    """A malformed site string, a layer out of range, or a site the family lacks."""


class ModelLoadError(NnsightSaeError):
    """A model that cannot be loaded: missing file, corrupt GGUF, bad path."""


class DictionaryError(NnsightSaeError, ValueError):
    """A dictionary folder or config that is missing, truncated or inconsistent."""


class RemoteError(NnsightSaeError):
    """A trace NDIF would refuse: a request over its size limit, or in-trace code that
    imports a module outside its allow-list."""


class OptionError(NnsightSaeError, ValueError):
    """An option (a dictionary's hyper-parameter, an analysis' or circuit method's setting)
    that is unknown, missing, of the wrong type or out of range."""
