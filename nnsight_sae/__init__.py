"""nnsight-sae: sparse dictionaries as first-class nnsight interventions."""

__version__ = "0.1.0"

from .errors import (DictionaryError, ModelLoadError, NnsightSaeError, OptionError, PluginError, RemoteError,
                     SiteError, UnknownFamilyError, UnknownNameError)
from .analysis import Analysis, run_analysis
from .attach import attach
from .circuits import CircuitMethod
from .dictionary import Dictionary, DictionaryConfig
from .files import load_dictionary, save_dictionary
from .hookspecs import hookimpl
from .models import load_model
from .options import Option, Options
from .plugins import create_dictionary, registry
from .sites import ArchitectureMap, architecture_of, n_layers, resolve_site
from .tasks import Task, TaskPrompts
from .traced import Attached, Site

__all__ = [
    "Analysis", "ArchitectureMap", "Attached", "CircuitMethod", "Dictionary", "DictionaryConfig", "DictionaryError",
    "ModelLoadError", "NnsightSaeError", "Option", "OptionError", "Options", "PluginError", "RemoteError", "Site",
    "SiteError", "Task", "TaskPrompts", "UnknownFamilyError", "UnknownNameError", "architecture_of", "attach",
    "create_dictionary", "hookimpl", "load_dictionary", "load_model", "n_layers", "registry", "resolve_site",
    "run_analysis", "save_dictionary",
]
