"""Gated SAE (Rajamanoharan et al. 2024)."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig, activity
from nnsight_sae.options import Option


class GatedConfig(DictionaryConfig):
    l1_coefficient = Option(float, 1e-3, "sparsity penalty (L1 of the gate's ReLU)", min=0.0, flags=("--l1",))


class GatedSAE(Dictionary):
    """Gate: pi_gate = W_enc (x - b_dec) + b_gate decides which features fire;
    magnitude: pi_mag = (W_enc * exp(r_mag)) (x - b_dec) + b_mag sets how much (b_dec is
    subtracted only with ``apply_b_dec_to_input``, as in SAELens).
    f = 1[pi_gate > 0] * ReLU(pi_mag). There is no ``b_enc``: ``b_gate`` and
    ``b_mag`` take its place, as in SAELens' layout."""

    type_name = "gated"
    help = "Gated SAE (Rajamanoharan et al. 2024): a gate decides, a magnitude path sizes"
    config_class = GatedConfig
    feature_scaled = ("b_gate", "b_mag")

    def __init__(self, cfg):
        super().__init__(cfg)
        del self.b_enc
        self.b_enc = None
        self.b_gate = torch.nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype))
        self.b_mag = torch.nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype))
        self.r_mag = torch.nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype))

    def gate_and_magnitude(self, x):
        centred = (x - self.b_dec if self.cfg.apply_b_dec_to_input else x) @ self.W_enc
        return centred + self.b_gate, centred * torch.exp(self.r_mag) + self.b_mag

    def encode(self, x):
        gate, mag = self.gate_and_magnitude(x)
        return (gate > 0).to(mag.dtype) * torch.relu(mag)

    def training_loss(self, x, target, *, sparsity_scale=1.0, dead=None, sparse=True):
        gate, mag = self.gate_and_magnitude(x)
        f = (gate > 0).to(mag.dtype) * torch.relu(mag)
        recon = self.decode(f) + self.skip_term(x)
        mse = (recon - target).pow(2).mean()
        # the gate path is trained by an L1 on ReLU(gate) and by reconstructing
        # through a frozen decoder
        gate_act = torch.relu(gate)
        aux = (gate_act @ self.W_dec.detach() + self.b_dec.detach() - target).pow(2).mean()
        l1 = gate_act.sum(-1).mean()
        loss = mse + self.cfg.l1_coefficient * sparsity_scale * l1 + aux
        return {"loss": loss, "recon": recon, "mse": mse, **activity(f)}

    def to_saelens(self):
        return {"architecture": "gated"}

    @classmethod
    def from_saelens(cls, cfg):
        return {} if cfg.get("architecture") == "gated" else None
