"""First-party dictionary types: relu, topk, batchtopk, jumprelu, gated, transcoder, discrete."""

from nnsight_sae import hookimpl

from .discrete import DiscreteSAE
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .relu import ReluSAE
from .topk import BatchTopKSAE, TopKSAE
from .transcoder import Transcoder

TYPES = [ReluSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE, Transcoder, DiscreteSAE]


@hookimpl
def nnsight_sae_dictionary_types():
    return TYPES
