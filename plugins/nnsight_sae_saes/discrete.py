"""Discrete-code SAE (O'Neill & Bui 2024): one integer code per input row."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig
from nnsight_sae.options import Option


class DiscreteConfig(DictionaryConfig):
    l1_coefficient = Option(float, 0.02, "sparsity penalty (L1 of the features)", min=0.0, flags=("--l1",))


class DiscreteSAE(Dictionary):
    """A small untied ReLU SAE with a shared pre-bias (``b_dec``, subtracted
    before encoding and added after decoding) and unit-norm dictionary; its
    ``code(x)`` is the index of the most active feature."""

    type_name = "discrete"
    help = "discrete-code SAE (O'Neill & Bui 2024): the argmax feature as a code"
    config_class = DiscreteConfig
    dead_features = "none"

    def encode(self, x):
        return torch.relu(self.pre_acts(x))

    def code(self, x):
        """(...,) integer codes: argmax over features."""
        return self.encode(x).argmax(dim=-1)

    def to_saelens(self):
        return {"architecture": "standard"}  # an untied ReLU SAE to SAELens
