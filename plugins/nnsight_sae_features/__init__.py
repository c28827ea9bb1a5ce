"""First-party feature analyses (Cunningham et al. 2023): feature patching against PCA,
causal trees, feature reports; de-embeddings, the transcoder-vs-SAE sparsity sweep and
weights-based attribution through transcoders (Dunefsky et al. 2024); sparse feature circuits
through several dictionaries (Marks et al. 2024). Each works with any
dictionary on any supported model; each lives beside its math."""

from nnsight_sae import hookimpl

from .circuit import FeatureCircuit
from .deembed import DeEmbed
from .patching import FeaturePatching
from .report import FeatureReport
from .sweep import TranscoderVsSae
from .tcattr import TranscoderAttribution
from .tree import CausalTree


@hookimpl
def nnsight_sae_analyses():
    return [FeaturePatching(), CausalTree(), FeatureReport(), DeEmbed(), TranscoderVsSae(), TranscoderAttribution(),
            FeatureCircuit()]
