"""Discrete-code SAE (O'Neill & Bui 2024): one integer code per input row."""

import torch

from nnsight_sae.dictionary import Dictionary


class DiscreteSAE(Dictionary):
    """A small untied ReLU SAE with a shared pre-bias (``b_dec``, subtracted
    before encoding and added after decoding) and unit-norm dictionary; its
    ``code(x)`` is the index of the most active feature."""

    type_name = "discrete"
    defaults = {"l1_coefficient": 0.02}
    dead_features = "none"

    def encode(self, x):
        return torch.relu(self.pre_acts(x))

    def code(self, x):
        """(...,) integer codes: argmax over features."""
        return self.encode(x).argmax(dim=-1)
