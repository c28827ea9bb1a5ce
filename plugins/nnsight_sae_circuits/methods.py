"""Per-head scores for circuit discovery, and how to compare them with a reference."""

from __future__ import annotations

import torch

from nnsight_sae import create_dictionary
from nnsight_sae.train import Member, TrainConfig, Trainer


def train_discrete_sae(rows: torch.Tensor, *, n_features: int = 200, l1: float = 0.02, epochs: int = 500,
                       lr: float = 1e-3, seed: int = 0):
    """O'Neill & Bui's shared SAE: untied, shared pre-bias, unit-norm dictionary,
    MSE + lambda * L1, Adam, full-batch epochs over every (prompt, head) row."""
    sae = create_dictionary("discrete", d_in=rows.shape[-1], d_sae=n_features, site="head_out.0",
                            l1_coefficient=l1)
    sae.reset_parameters(seed=seed)
    trainer = Trainer([Member(sae)], TrainConfig(steps=epochs, lr=lr, warmup_steps=1, decay_start=1.0,
                                                 sparsity_warmup=0.0, dead_after_rows=10**12, seed=seed))
    for _ in range(epochs):
        trainer.step({"head_out.0": rows}, stats=False)
    return sae


def code_overlap_scores(pos: torch.Tensor, neg: torch.Tensor, train_index, *, n_features=200, l1=0.02,
                        epochs=500, seed=0) -> torch.Tensor:
    """(L, H) node scores: how many distinct codes a head shows on positive prompts
    and never on negative ones. pos/neg: (n, L, H, d) head outputs."""
    n, L, H, d = pos.shape
    train_rows = torch.cat([pos[train_index], neg[train_index]]).reshape(-1, d)
    sae = train_discrete_sae(train_rows, n_features=n_features, l1=l1, epochs=epochs, seed=seed)
    with torch.no_grad():
        pos_codes, neg_codes = sae.code(pos), sae.code(neg)  # (n, L, H)
    scores = torch.zeros(L, H)
    for layer in range(L):
        for h in range(H):
            scores[layer, h] = len(set(pos_codes[:, layer, h].tolist()) - set(neg_codes[:, layer, h].tolist()))
    return scores


def mean_difference_scores(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(L, H): the norm of the difference between a head's mean output on positive and negative prompts."""
    return (pos.mean(0) - neg.mean(0)).norm(dim=-1)
