"""ReLU + L1 SAE (Cunningham et al. 2023), tied or untied."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig
from nnsight_sae.options import Option


class ReluConfig(DictionaryConfig):
    # The default suits our loss, a per-element MSE on activations scaled to mean norm
    # sqrt(d_in); the paper's 8.6e-4 was for its own.
    l1_coefficient = Option(float, 2e-3, "sparsity penalty (L1 of the features)", min=0.0, flags=("--l1",))
    tied = Option(bool, False, "tied encoder/decoder (the paper's residual-stream form)")


class ReluSAE(Dictionary):
    """f = ReLU(W_enc (x - b_dec) + b_enc); x_hat = W_dec f + b_dec.

    ``tied=True`` is the paper's residual-stream form: the decoder is the
    encoder's transpose (one matrix M with unit-norm rows), with no decoder bias.
    """

    type_name = "relu"
    help = "ReLU + L1 SAE (Cunningham et al. 2023), tied or untied"
    config_class = ReluConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.cfg.tied:
            # One free matrix: W_dec. W_enc and b_dec stay as (frozen) copies so the
            # file layout matches untied SAEs; `normalize_decoder` refreshes them.
            self.W_enc.requires_grad_(False)
            self.b_dec.requires_grad_(False)

    def pre_acts(self, x):
        if self.cfg.tied:
            return x @ self.W_dec.T + self.b_enc
        return super().pre_acts(x)

    def encode(self, x):
        return torch.relu(self.pre_acts(x))

    def decode(self, f):
        if self.cfg.tied:
            return f @ self.W_dec
        return super().decode(f)

    @torch.no_grad()
    def normalize_decoder(self):
        super().normalize_decoder()
        if self.cfg.tied:
            self.W_enc.copy_(self.W_dec.T)
            self.b_dec.zero_()

    def file_state(self):
        state = self.state_dict()
        if self.cfg.tied:  # the copies as the decoder now is, even if it was edited without normalize_decoder
            state = {**state, "W_enc": self.W_dec.detach().T, "b_dec": torch.zeros_like(self.b_dec)}
        return state

    @torch.no_grad()
    def fold_input_scale(self, scale_in, scale_out):
        if not self.cfg.tied:
            return super().fold_input_scale(scale_in, scale_out)
        # the encoder is the decoder's transpose and stays so; only the bias scales
        self.b_enc.div_(scale_out)

    def to_saelens(self):
        if self.out_site is None:
            return {"architecture": "standard"}
        return {"architecture": "skip_transcoder" if self.cfg.skip else "transcoder"}  # the same math

    @classmethod
    def from_saelens(cls, cfg):
        # a pre-6 flat config says "standard" for every activation: only ReLU's is ours
        activation = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
        return {} if cfg.get("architecture", "standard") == "standard" and activation == "relu" else None
