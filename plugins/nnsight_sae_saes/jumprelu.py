"""JumpReLU SAE (Rajamanoharan et al. 2024) with a straight-through estimator."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig
from nnsight_sae.options import Option


def _rectangle(x):
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); the threshold's gradient through a rectangle kernel."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_z = grad * (z > threshold).to(z.dtype)
        grad_t = -(threshold / bw) * _rectangle((z - threshold) / bw) * grad
        return grad_z, grad_t.reshape(-1, z.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(z - theta), for the L0 penalty; the threshold's gradient as above."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_t = -(1.0 / bw) * _rectangle((z - threshold) / bw) * grad
        return torch.zeros_like(z), grad_t.reshape(-1, z.shape[-1]).sum(0), None


class JumpReLUConfig(DictionaryConfig):
    l1_coefficient = Option(float, 1e-3, "sparsity penalty (an L0 through the straight-through estimator)",
                            min=0.0, flags=("--l1",))
    bandwidth = Option(float, 1e-3, "width of the rectangle kernel of the threshold's gradient", min=0.0)
    initial_threshold = Option(float, 1e-3, "every feature's threshold at the start", min=0.0)


class JumpReLUSAE(Dictionary):
    """f = ReLU(h) * (h > threshold) per feature, h = W_enc (x - b_dec) + b_enc (a transcoder,
    SAELens' jumprelu_transcoder, when it has an out_site: then h = W_enc x + b_enc).

    Trained with an L0 penalty; the threshold's gradient comes from
    straight-through estimators with a rectangle kernel of width ``bandwidth``.
    """

    type_name = "jumprelu"
    help = "JumpReLU SAE (Rajamanoharan et al. 2024): a learned threshold per feature"
    config_class = JumpReLUConfig
    feature_scaled = ("b_enc", "threshold")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = torch.nn.Parameter(
            torch.full((self.d_sae,), self.cfg.initial_threshold, dtype=self.W_enc.dtype))

    def encode(self, x):
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)

    def encode_train(self, x):
        pre = torch.relu(self.pre_acts(x))
        return _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth)

    def sparsity_penalty(self, x, f):
        """L0, differentiable in the threshold through the straight-through estimator."""
        pre = torch.relu(self.pre_acts(x))
        return _Step.apply(pre, self.threshold, self.cfg.bandwidth).sum(-1).mean()

    def to_saelens(self):
        if self.out_site is None:
            return {"architecture": "jumprelu"}
        return {"architecture": "jumprelu_skip_transcoder" if self.cfg.skip else "jumprelu_transcoder"}

    @classmethod
    def from_saelens(cls, cfg):
        arch = cfg.get("architecture")
        if arch not in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
            return None
        return {"skip": arch == "jumprelu_skip_transcoder"}
