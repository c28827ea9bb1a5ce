"""First-party readers (and writers) of the field's published dictionary layouts: EleutherAI
sparsify, Gemma Scope, dictionary_learning and circuit-tracer. Our own layout (SAELens') is
the core's (``nnsight_sae.files``)."""

from nnsight_sae import hookimpl

from .circuit_tracer import CircuitTracerFormat
from .dictionary_learning import DictionaryLearningFormat
from .gemma_scope import GemmaScopeFormat
from .sparsify import SparsifyFormat


@hookimpl
def nnsight_sae_formats():
    return [SparsifyFormat(), GemmaScopeFormat(), DictionaryLearningFormat(), CircuitTracerFormat()]
