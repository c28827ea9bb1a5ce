"""TopK and BatchTopK SAEs (Gao et al. 2024; Bussmann et al. 2024)."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig
from nnsight_sae.errors import OptionError
from nnsight_sae.options import Option


def topk_relu(pre, k):
    """Keep the k largest pre-activations per row, ReLU them, zero the rest."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def sparse_decode(values, indices, W_dec, b_dec):
    """sum_j values[..., j] * W_dec[indices[..., j]] + b_dec: the decode of k active
    features without the dense (rows, d_sae) @ (d_sae, d) product, forward and backward."""
    flat_i, flat_v = indices.reshape(-1, indices.shape[-1]), values.reshape(-1, values.shape[-1])
    out = torch.nn.functional.embedding_bag(flat_i, W_dec, per_sample_weights=flat_v, mode="sum")
    return out.reshape(*values.shape[:-1], W_dec.shape[1]) + b_dec


def auxk_loss(d, x, target, recon, dead):
    """Gao et al.'s auxiliary loss: the dead features' top-k_aux pre-activations
    reconstruct the residual error, normalised by the error's variance."""
    if dead is None or not dead.any():
        return recon.new_zeros(())
    k_aux = min(d.cfg.k_aux or d.d_in // 2, int(dead.sum()))
    pre = d.pre_acts(x).masked_fill(~dead, float("-inf"))
    error = (target - recon).detach()
    error_hat = topk_relu(pre, k_aux) @ d.W_dec
    scale = (error - error.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return (error_hat - error).pow(2).sum(-1).mean() / scale


class _TopKOptions(DictionaryConfig):
    k = Option(int, 32, "active features per row", min=1)
    auxk_coefficient = Option(float, 1 / 32, "weight of the auxiliary-k loss that revives dead features", min=0.0)
    k_aux = Option(int, None, "dead features the auxiliary loss uses (default d_in / 2)", min=1)

    def check(self):
        if self.k > self.d_sae:
            raise OptionError(f"k={self.k} is more than the dictionary's {self.d_sae} features")


class TopKConfig(_TopKOptions):
    k_warmup = Option(bool, False, "start at 4k active features and anneal to k over the sparsity warm-up")


class TopKSAE(Dictionary):
    """f = ReLU(TopK_k(W_enc (x - b_dec) + b_enc)). Dead features are revived by
    the auxiliary-k loss; with ``k_warmup`` true, training starts at 4k active
    features and anneals to k over the trainer's sparsity warm-up."""

    type_name = "topk"
    help = "TopK SAE (Gao et al. 2024): the k largest pre-activations per row"
    config_class = TopKConfig
    dead_features = "auxk"

    def encode(self, x):
        return topk_relu(self.pre_acts(x), self.cfg.k)

    def training_loss(self, x, target, *, sparsity_scale=1.0, dead=None):
        # sparsity_scale runs 0 -> 1 over the warm-up: k runs 4k -> k
        k = self.cfg.k
        k_now = round(k * (4 - 3 * sparsity_scale)) if self.cfg.k_warmup else k
        values, indices = self.pre_acts(x).topk(min(k_now, self.d_sae), dim=-1)
        values = torch.relu(values)
        recon = sparse_decode(values, indices, self.W_dec, self.b_dec)
        f = torch.zeros(*values.shape[:-1], self.d_sae, dtype=values.dtype, device=values.device)
        f = f.scatter(-1, indices, values.detach())  # for the trainer's statistics
        mse = (recon - target).pow(2).mean()
        aux = auxk_loss(self, x, target, recon, dead)
        return {"loss": mse + self.cfg.auxk_coefficient * aux, "features": f, "recon": recon, "mse": mse}

    def to_saelens(self):
        return {"architecture": "topk", "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(cls, cfg, site_of):
        if cfg.get("architecture") != "topk":
            return None
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise OptionError("rescale_acts_by_decoder_norm=true is not supported")
        return {"k": cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k", 100))}


class BatchTopKConfig(_TopKOptions):
    threshold_momentum = Option(float, 0.99, "momentum of the inference threshold's running mean", min=0.0)


class BatchTopKSAE(Dictionary):
    """Training keeps the k * batch largest activations over the whole batch;
    inference uses a threshold learned during training (one value, stored per
    feature as in a JumpReLU file), so a row's features do not depend on the
    other rows."""

    type_name = "batchtopk"
    help = "BatchTopK SAE (Bussmann et al. 2024): k x batch activations per batch; a threshold at inference"
    config_class = BatchTopKConfig
    dead_features = "auxk"
    feature_scaled = ("b_enc", "threshold")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = torch.nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype),
                                            requires_grad=False)

    def encode(self, x):
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)

    def encode_train(self, x):
        pre = torch.relu(self.pre_acts(x))
        flat = pre.reshape(-1)
        k = min(self.cfg.k * pre.reshape(-1, pre.shape[-1]).shape[0], flat.numel())
        values, indices = flat.topk(k)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre.shape)

    def training_loss(self, x, target, *, sparsity_scale=1.0, dead=None):
        f = self.encode_train(x)
        recon = self.decode(f)
        mse = (recon - target).pow(2).mean()
        with torch.no_grad():  # inference threshold: running mean of the smallest kept activation
            kept = f[f > 0]
            if kept.numel():
                m = self.cfg.threshold_momentum
                current = self.threshold[0]
                new = kept.min() if current == 0 else m * current + (1 - m) * kept.min()
                self.threshold.fill_(float(new))
        aux = auxk_loss(self, x, target, recon, dead)
        return {"loss": mse + self.cfg.auxk_coefficient * aux, "features": f, "recon": recon, "mse": mse}

    def to_saelens(self):
        return {"architecture": "jumprelu"}  # as SAELens saves its BatchTopK for inference
