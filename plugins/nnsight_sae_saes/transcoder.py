"""Transcoder (Dunefsky et al. 2024): reads an MLP's input, predicts its output."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig
from nnsight_sae.errors import OptionError
from nnsight_sae.options import Option


class TranscoderConfig(DictionaryConfig):
    out_site = Option(str, None, "the site it predicts (default: mlp_out.L for mlp_in.L)", cli=False)
    d_out = Option(int, None, "width of what it predicts (default d_in)", min=1, cli=False)
    skip = Option(bool, False, "add a linear skip term from input to output")
    l1_coefficient = Option(float, 5e-4, "sparsity penalty (L1 of the features)", min=0.0, flags=("--l1",))
    apply_b_dec_to_input = Option(bool, False, "transcoders never subtract their output bias from the input",
                                  cli=False)

    def check(self):
        if self.apply_b_dec_to_input:
            raise OptionError("a transcoder's decoder bias is its output's; it cannot be subtracted from the input")
        if self.out_site is None:
            kind, _, layer = self.site.partition(".")
            if kind != "mlp_in":
                raise OptionError(f"a transcoder reads mlp_in.L and predicts mlp_out.L; for site {self.site!r} "
                                  f"give out_site too")
            self.out_site = f"mlp_out.{layer}"


class Transcoder(Dictionary):
    """z = ReLU(W_enc x + b_enc); out = W_dec z + b_dec (+ W_skip x).

    ``site`` is what it reads (``mlp_in.L``), ``out_site`` what it predicts
    (``mlp_out.L`` unless given). ``skip=True`` adds a linear skip term. The paper's
    input bias (x - b_in) is folded into ``b_enc``, as in SAELens' layout.
    """

    type_name = "transcoder"
    help = "transcoder (Dunefsky et al. 2024): an MLP's input in, its output out"
    config_class = TranscoderConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.cfg.skip:
            self.W_skip = torch.nn.Parameter(torch.zeros(self.d_out, self.d_in, dtype=self.W_enc.dtype))

    @property
    def d_out(self) -> int:
        return self.cfg.d_out or self.cfg.d_in

    @property
    def out_site(self) -> str:
        return self.cfg.out_site

    def encode(self, x):
        return torch.relu(self.pre_acts(x))

    def skip_term(self, x):
        """The linear skip contribution (zero without a skip)."""
        return x @ self.W_skip.T if self.cfg.skip else 0

    @torch.no_grad()
    def fold_input_scale(self, scale_in, scale_out):
        super().fold_input_scale(scale_in, scale_out)
        if self.cfg.skip:
            self.W_skip.mul_(scale_in / scale_out)

    def to_saelens(self):
        return {"architecture": "skip_transcoder" if self.cfg.skip else "transcoder", "d_out": self.d_out,
                "metadata": {"hook_name_out": self.out_site}}

    @classmethod
    def from_saelens(cls, cfg, site_of):
        arch = cfg.get("architecture")
        if arch not in ("transcoder", "skip_transcoder"):
            return None
        hook_out = (cfg.get("metadata") or {}).get("hook_name_out") or cfg.get("hook_name_out")
        return {"d_out": cfg.get("d_out", cfg.get("d_in")), "skip": arch == "skip_transcoder",
                "out_site": site_of(hook_out) if hook_out else None}
