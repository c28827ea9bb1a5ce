"""Transcoder (Dunefsky et al. 2024): reads an MLP's input, predicts its output."""

import torch

from nnsight_sae.dictionary import Dictionary


class Transcoder(Dictionary):
    """z = ReLU(W_enc x + b_enc); out = W_dec z + b_dec (+ W_skip x).

    ``site`` is what it reads (default ``mlp_in.L``), ``out_site`` what it
    predicts (``mlp_out.L``). ``skip=True`` adds a linear skip term. The paper's
    input bias (x - b_in) is folded into ``b_enc``, as in SAELens' layout.
    """

    type_name = "transcoder"
    defaults = {"skip": False, "l1_coefficient": 5e-4, "apply_b_dec_to_input": False}

    def __init__(self, cfg):
        if "out_site" not in cfg:
            raise ValueError("transcoder config needs 'out_site' (e.g. 'mlp_out.6')")
        super().__init__({**cfg, "apply_b_dec_to_input": False})
        if self.cfg["skip"]:
            self.W_skip = torch.nn.Parameter(torch.zeros(self.d_out, self.d_in, dtype=self.W_enc.dtype))

    @property
    def out_site(self) -> str:
        return self.cfg["out_site"]

    def encode(self, x):
        return torch.relu(self.pre_acts(x))

    def skip_term(self, x):
        """The linear skip contribution (zero without a skip)."""
        return x @ self.W_skip.T if self.cfg["skip"] else 0

    @torch.no_grad()
    def fold_input_scale(self, scale_in, scale_out):
        super().fold_input_scale(scale_in, scale_out)
        if self.cfg["skip"]:
            self.W_skip.mul_(scale_in / scale_out)

