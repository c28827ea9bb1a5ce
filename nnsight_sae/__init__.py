"""nnsight-sae: sparse dictionaries as first-class nnsight interventions."""

__version__ = "0.1.0"

from .errors import (DictionaryError, ModelLoadError, NnsightSaeError, PluginError, RemoteError, SiteError,
                     UnknownFamilyError, UnknownNameError)
from .analysis import Analysis, Task, run_analysis
from .attach import attach
from .dictionary import Dictionary
from .files import load_dictionary, save_dictionary
from .hookspecs import hookimpl
from .models import load_model
from .plugins import create_dictionary, registry
from .sites import ArchitectureMap, architecture_of, n_layers, resolve_site
from .traced import Attached, Site

__all__ = [
    "Analysis", "Task", "run_analysis", "ArchitectureMap", "Attached", "Dictionary", "DictionaryError", "attach", "create_dictionary", "load_dictionary", "save_dictionary", "ModelLoadError", "NnsightSaeError", "PluginError", "RemoteError", "Site",
    "SiteError", "UnknownFamilyError", "UnknownNameError", "architecture_of", "hookimpl", "load_model",
    "n_layers", "registry", "resolve_site",
]
