"""Transcoder (Dunefsky et al. 2024): reads an MLP's input, predicts its output."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig
from nnsight_sae.errors import OptionError
from nnsight_sae.options import Option


def default_out_site(cfg) -> None:
    """A transcoder reading mlp_in.L predicts mlp_out.L unless told otherwise."""
    if cfg.out_site is None:
        kind, _, layer = cfg.site.partition(".")
        if kind != "mlp_in":
            raise OptionError(f"a transcoder reads mlp_in.L and predicts mlp_out.L; for site {cfg.site!r} give "
                              f"out_site too")
        cfg.out_site = f"mlp_out.{layer}"


class TranscoderConfig(DictionaryConfig):
    skip = Option(bool, False, "add a linear skip term from input to output")
    l1_coefficient = Option(float, 5e-4, "sparsity penalty (L1 of the features)", min=0.0, flags=("--l1",))
    apply_b_dec_to_input = Option(bool, False, "transcoders never subtract their output bias from the input",
                                  cli=False)

    def check(self):
        default_out_site(self)
        super().check()


class Transcoder(Dictionary):
    """z = ReLU(W_enc x + b_enc); out = W_dec z + b_dec (+ W_skip x).

    ``site`` is what it reads (``mlp_in.L``), ``out_site`` what it predicts
    (``mlp_out.L`` unless given). ``skip=True`` adds a linear skip term. The paper's
    input bias (x - b_in) is folded into ``b_enc``, as in SAELens' layout.
    """

    type_name = "transcoder"
    help = "transcoder (Dunefsky et al. 2024): an MLP's input in, its output out"
    config_class = TranscoderConfig

    def encode(self, x):
        return torch.relu(self.pre_acts(x))

    def to_saelens(self):
        return {"architecture": "skip_transcoder" if self.cfg.skip else "transcoder"}

    @classmethod
    def from_saelens(cls, cfg):
        arch = cfg.get("architecture")
        return {"skip": arch == "skip_transcoder"} if arch in ("transcoder", "skip_transcoder") else None
