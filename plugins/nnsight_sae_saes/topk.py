"""TopK and BatchTopK SAEs (Gao et al. 2024; Bussmann et al. 2024)."""

import torch

from nnsight_sae.dictionary import Dictionary


def topk_relu(pre, k):
    """Keep the k largest pre-activations per row, ReLU them, zero the rest."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


class TopKSAE(Dictionary):
    """f = ReLU(TopK_k(W_enc (x - b_dec) + b_enc))."""

    type_name = "topk"
    defaults = {"k": 32}

    def encode(self, x):
        return topk_relu(self.pre_acts(x), self.cfg["k"])


class BatchTopKSAE(Dictionary):
    """Training keeps the k * batch largest activations over the whole batch;
    inference uses a threshold learned during training (one value, stored per
    feature as in a JumpReLU file), so a row's features do not depend on the
    other rows."""

    type_name = "batchtopk"
    defaults = {"k": 32}

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
        k = min(self.cfg["k"] * pre.reshape(-1, pre.shape[-1]).shape[0], flat.numel())
        values, indices = flat.topk(k)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre.shape)
