"""TopK and BatchTopK SAEs (Gao et al. 2024; Bussmann et al. 2024)."""

import torch

from nnsight_sae.dictionary import Dictionary, DictionaryConfig
from nnsight_sae.errors import OptionError
from nnsight_sae.options import Option


def saelens_activation(cfg: dict):
    """The activation a SAELens pre-6 flat config names (activation_fn_str, or activation_fn)."""
    return cfg.get("activation_fn_str") or cfg.get("activation_fn")


def topk_relu(pre, k):
    """Keep the k largest pre-activations per row, ReLU them, zero the rest."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


class _PickedPreActs(torch.autograd.Function):
    """The encoder's pre-activations ``(x - b_dec) @ W_enc + b_enc``, computed with one dense
    product but returned, and differentiated, only where they are used: at the entries
    ``choose(pre)`` picks (each row's top k, or the batch's), and in the dead features'
    columns (for the auxiliary loss). The backward never forms the dense (rows, d_sae)
    gradient or its two dense products: W_enc's gradient is a sparse product over the
    picked entries plus a product the size of the dead columns; b_dec's (through
    ``x - b_dec``) is ``-W_enc @ grad(b_enc)``."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, choose, dead):
        centred = x if b_dec is None else x - b_dec
        pre = torch.addmm(b_enc, centred, W_enc)
        rows, cols = choose(pre)
        dead_pre = pre.index_select(1, dead)
        ctx.save_for_backward(centred, W_enc, rows, cols, dead)
        ctx.subtracts_b_dec = b_dec is not None
        ctx.mark_non_differentiable(rows, cols)
        return pre[rows, cols], rows, cols, dead_pre

    @staticmethod
    def backward(ctx, grad_picked, _rows, _cols, grad_dead):
        centred, W_enc, rows, cols, dead = ctx.saved_tensors
        d_in, d_sae = W_enc.shape
        picks = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad_picked, (d_sae, len(centred)),
                                        check_invariants=False)
        grad_W = torch.sparse.mm(picks, centred)  # (d_sae, d_in), W_enc's gradient transposed
        grad_b = centred.new_zeros(d_sae).index_add_(0, cols, grad_picked)
        if len(dead):
            grad_W.index_add_(0, dead, grad_dead.T @ centred)
            grad_b.index_add_(0, dead, grad_dead.sum(0))
        grad_b_dec = -(W_enc @ grad_b) if ctx.subtracts_b_dec else None
        return None, grad_W.T, grad_b, grad_b_dec, None, None


def picked_pre_acts(d, x, choose, dead, *, sparse: bool):
    """(values at the entries ``choose(pre)`` picks, their rows, their columns, the columns
    ``dead`` (indices) of pre) for 2-D x. ``sparse``: by ``_PickedPreActs``; otherwise by
    autograd through the dense pre-activations (same values and gradients: the dense path,
    for devices where dense products are faster)."""
    if sparse:
        b_dec = d.b_dec if d.cfg.apply_b_dec_to_input else None
        return _PickedPreActs.apply(x, d.W_enc, d.b_enc, b_dec, choose, dead)
    pre = d.pre_acts(x)
    with torch.no_grad():
        rows, cols = choose(pre)
    return pre[rows, cols], rows, cols, pre.index_select(1, dead)


def row_topk(k):
    """choose for ``picked_pre_acts``: the k largest pre-activations of each row, row by row."""
    def choose(pre):
        cols = pre.topk(k, dim=-1, sorted=False).indices
        return torch.arange(len(pre), device=pre.device).repeat_interleave(cols.shape[1]), cols.reshape(-1)
    return choose


def batch_topk(k):
    """choose for ``picked_pre_acts``: the k x rows largest pre-activations of the whole batch, row by row."""
    def choose(pre):
        flat = pre.reshape(-1).topk(min(k * len(pre), pre.numel()), sorted=False).indices.sort().values
        return torch.div(flat, pre.shape[1], rounding_mode="floor"), flat % pre.shape[1]
    return choose


def sparse_decode(values, rows, cols, W_dec, b_dec, n_rows: int):
    """sum over each row's picks of value * W_dec[col], + b_dec: the decode of a few active
    features per row (rows sorted) without the dense (rows, d_sae) @ (d_sae, d) product,
    forward and backward."""
    offsets = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))
    return torch.nn.functional.embedding_bag(cols, W_dec, offsets, per_sample_weights=values, mode="sum") + b_dec


def auxk_loss(d, dead_pre, dead, target, recon):
    """Gao et al.'s auxiliary loss: the dead features' (``dead``: indices) top-k_aux
    pre-activations (``dead_pre``: their columns) reconstruct the residual error, normalised by the error's
    variance. Its cost grows with the number of dead features, not with d_sae."""
    n_dead = dead_pre.shape[1]
    if n_dead == 0:
        return recon.new_zeros(())
    k_aux = min(d.cfg.k_aux or d.d_in // 2, n_dead)
    acts = torch.relu(dead_pre) if k_aux == n_dead else topk_relu(dead_pre, k_aux)
    error = (target - recon).detach()
    error_hat = acts @ d.W_dec[dead]
    scale = (error - error.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return (error_hat - error).pow(2).sum(-1).mean() / scale


# The encoder starts at half the decoder's transpose. Measured on SmolLM2's resid_post.6 (TopK 4608, k 32,
# 2000 steps of 256, `nnsight-sae bench train`'s data): held-out FVU 0.0845 (3 seeds: 0.5 and 0.3 alike)
# against 0.0886 with the full transpose; sparsify 1.3.3 reaches 0.0855 from its own smaller init.
ENCODER_INIT = 0.5


class _TopKInit(Dictionary):
    """The top-k types' start: the encoder at ENCODER_INIT times the base's."""

    @torch.no_grad()
    def reset_parameters(self, seed=None):
        super().reset_parameters(seed)
        self.W_enc.mul_(ENCODER_INIT)


def _topk_loss(d, x, target, choose, dead, sparse):
    """The training loss of the top-k types: MSE of the sparse decode plus the auxiliary loss."""
    dead = torch.nonzero(dead).flatten() if dead is not None else torch.zeros(0, dtype=torch.long, device=x.device)
    picked, rows, cols, dead_pre = picked_pre_acts(d, x, choose, dead, sparse=sparse)
    values = torch.relu(picked)
    if sparse:
        recon = sparse_decode(values, rows, cols, d.W_dec, d.b_dec, len(x))
    else:  # the dense product (faster than embedding_bag on a GPU's tensor cores)
        recon = d.decode(torch.zeros(len(x), d.d_sae, dtype=values.dtype, device=x.device).index_put((rows, cols), values))
    recon = recon + d.skip_term(x)
    mse = (recon - target).pow(2).mean()
    aux = auxk_loss(d, dead_pre, dead, target, recon)
    active = values > 0
    fired = torch.zeros(d.d_sae, dtype=torch.bool, device=x.device)
    fired[cols[active]] = True
    return {"loss": mse + d.cfg.auxk_coefficient * aux, "recon": recon, "mse": mse, "fired": fired,
            "l0": active.sum() / len(x), "values": values.detach()}


class _TopKOptions(DictionaryConfig):
    k = Option(int, 32, "active features per row", min=1)
    auxk_coefficient = Option(float, 1 / 32, "weight of the auxiliary-k loss that revives dead features", min=0.0)
    k_aux = Option(int, None, "dead features the auxiliary loss uses (default d_in / 2)", min=1)

    def check(self):
        if self.k > self.d_sae:
            raise OptionError(f"k={self.k} is more than the dictionary's {self.d_sae} features")


class TopKConfig(_TopKOptions):
    k_warmup = Option(bool, False, "start at 4k active features and anneal to k over the sparsity warm-up")


class TopKSAE(_TopKInit):
    """f = ReLU(TopK_k(W_enc (x - b_dec) + b_enc)). Dead features are revived by
    the auxiliary-k loss; with ``k_warmup`` true, training starts at 4k active
    features and anneals to k over the trainer's sparsity warm-up."""

    type_name = "topk"
    help = "TopK SAE (Gao et al. 2024): the k largest pre-activations per row"
    config_class = TopKConfig
    dead_features = "auxk"
    # as sparsify 1.3.3's Trainer.fit does (Gao et al. start it at the geometric median): the residual
    # stream's large mean would take a bias learning at lr 4e-4 a step thousands of steps to reach
    b_dec_from_mean = True

    def encode(self, x):
        return topk_relu(self.pre_acts(x), self.cfg.k)

    def training_loss(self, x, target, *, sparsity_scale=1.0, dead=None, sparse=True):
        # sparsity_scale runs 0 -> 1 over the warm-up: k runs 4k -> k
        k = self.cfg.k
        k_now = round(k * (4 - 3 * sparsity_scale)) if self.cfg.k_warmup else k
        return _topk_loss(self, x, target, row_topk(min(k_now, self.d_sae)), dead, sparse)

    def to_saelens(self):
        # SAELens has no top-k transcoder: such a file keeps a name only this library reads
        return {"architecture": "topk" if self.out_site is None else "topk_transcoder", "k": self.cfg.k,
                "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(cls, cfg):
        # SAELens 6 names the architecture; its pre-6 flat configs say "standard" with a top-k activation
        pre6 = cfg.get("architecture", "standard") == "standard" and saelens_activation(cfg) == "topk"
        if cfg.get("architecture") not in ("topk", "topk_transcoder") and not pre6:
            return None
        # SAELens' TopKSAEConfig defaults k to 100
        return {"k": cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k", 100))}

    @classmethod
    def saelens_weights(cls, cfg, weights):
        """SAELens' rescale_acts_by_decoder_norm, folded into the weights as SAELens folds it when it
        saves for inference (TopKTrainingSAE._fold_norm_topk): the same features and outputs."""
        if not cfg.get("rescale_acts_by_decoder_norm"):
            return weights
        norm = weights["W_dec"].norm(dim=-1)
        return {**weights, "b_enc": weights["b_enc"] * norm, "W_dec": weights["W_dec"] / norm[:, None],
                "W_enc": weights["W_enc"] * norm[None, :]}


class BatchTopKConfig(_TopKOptions):
    threshold_momentum = Option(float, 0.99, "momentum of the inference threshold's running mean", min=0.0)


class BatchTopKSAE(_TopKInit):
    """Training keeps the k * batch largest activations over the whole batch;
    inference uses a threshold learned during training (one value, stored per
    feature as in a JumpReLU file), so a row's features do not depend on the
    other rows."""

    type_name = "batchtopk"
    help = "BatchTopK SAE (Bussmann et al. 2024): k x batch activations per batch; a threshold at inference"
    config_class = BatchTopKConfig
    dead_features = "auxk"
    b_dec_from_mean = True
    feature_scaled = ("b_enc", "threshold")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = torch.nn.Parameter(torch.zeros(self.d_sae, dtype=self.W_enc.dtype),
                                            requires_grad=False)

    def encode(self, x):
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)

    def training_loss(self, x, target, *, sparsity_scale=1.0, dead=None, sparse=True):
        out = _topk_loss(self, x, target, batch_topk(self.cfg.k), dead, sparse)
        with torch.no_grad():  # inference threshold: running mean of the smallest kept activation
            kept = out["values"][out["values"] > 0]
            if kept.numel():
                m = self.cfg.threshold_momentum
                current = self.threshold[0]
                new = kept.min() if current == 0 else m * current + (1 - m) * kept.min()
                self.threshold.fill_(float(new))
        return out

    def to_saelens(self):
        return {"architecture": "jumprelu"}  # as SAELens saves its BatchTopK for inference
