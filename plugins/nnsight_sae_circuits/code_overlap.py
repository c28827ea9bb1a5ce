"""O'Neill & Bui's discrete-code circuit identification, as published: one discrete SAE
shared by all heads, trained on the training prompts' head outputs; a head scores the
distinct codes it shows on positive prompts and never on negative ones (or, in the edge
variant, the code pairs with heads of other layers)."""

from __future__ import annotations

import time

import torch

from nnsight_sae.circuits import CircuitMethod
from nnsight_sae.heads import head_outputs
from nnsight_sae.options import Option, Options
from nnsight_sae.plugins import create_dictionary
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


def head_codes(pos: torch.Tensor, neg: torch.Tensor, train_index, *, n_features=200, l1=0.02, epochs=500,
               seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the shared SAE on the training prompts' head outputs (positive and negative)
    and return every prompt's code per head: two (n, L, H) integer tensors.
    pos/neg: (n, L, H, d) head outputs."""
    d = pos.shape[-1]
    train_rows = torch.cat([pos[train_index], neg[train_index]]).reshape(-1, d)
    sae = train_discrete_sae(train_rows, n_features=n_features, l1=l1, epochs=epochs, seed=seed)
    with torch.no_grad():
        return sae.code(pos), sae.code(neg)


def unique_to_positive(pos_codes: torch.Tensor, neg_codes: torch.Tensor, chunk_cells: int = 1 << 25) -> torch.Tensor:
    """Per column of (n, C) integer codes: how many distinct values occur on positive
    prompts and never on negative ones."""
    n_pos, n_neg, C = len(pos_codes), len(neg_codes), pos_codes.shape[1]
    earlier = torch.ones(n_pos, n_pos, dtype=torch.bool).tril(-1)[..., None]  # row i, column j < i
    counts = torch.zeros(C, dtype=torch.long)
    step = max(1, chunk_cells // max(n_pos * max(n_pos, n_neg), 1))
    for c in range(0, C, step):
        p, q = pos_codes[:, c:c + step], neg_codes[:, c:c + step]
        seen_negative = (p[:, None] == q[None]).any(1)
        repeat = ((p[:, None] == p[None]) & earlier).any(1)  # the same value on an earlier positive
        counts[c:c + step] = (~seen_negative & ~repeat).sum(0)
    return counts


def code_overlap_scores(pos_codes: torch.Tensor, neg_codes: torch.Tensor) -> torch.Tensor:
    """(L, H) node scores: distinct codes a head shows on positive prompts and never on
    negative ones. Codes: (n, L, H)."""
    n, L, H = pos_codes.shape
    return unique_to_positive(pos_codes.reshape(n, -1), neg_codes.reshape(len(neg_codes), -1)).view(L, H).float()


def code_edge_scores(pos_codes: torch.Tensor, neg_codes: torch.Tensor, n_features: int) -> torch.Tensor:
    """(L, H) node scores from the edge variant: for every pair of heads in different
    layers, the distinct (code, code) pairs seen on positives and never on negatives;
    a head's score is the sum over the pairs it is in."""
    n, L, H = pos_codes.shape
    flat_pos, flat_neg = pos_codes.reshape(n, -1).long(), neg_codes.reshape(len(neg_codes), -1).long()
    pairs = lambda c: (c[:, :, None] * n_features + c[:, None, :]).reshape(len(c), -1)  # noqa: E731
    edges = unique_to_positive(pairs(flat_pos), pairs(flat_neg)).view(L * H, L * H).float()
    layer = torch.arange(L).repeat_interleave(H)
    edges = edges * (layer[:, None] < layer[None, :])  # upstream head -> downstream head
    return (edges.sum(0) + edges.sum(1)).view(L, H)


def harvest_heads(model, prompts, reduce: str, seconds: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs on the positive and the negative prompts, timed as "harvest"."""
    t = time.perf_counter()
    pos = head_outputs(model, prompts.positive, reduce=reduce)
    neg = head_outputs(model, prompts.negative, reduce=reduce)
    seconds["harvest"] = round(time.perf_counter() - t, 2)
    return pos, neg


REDUCE = Option(str, "mean", "head outputs averaged over positions (mean) or taken at the last one",
                choices=("mean", "last"))


class CodeOverlapOptions(Options):
    reduce = REDUCE
    l1 = Option(float, 0.02, "L1 coefficient of the shared SAE (the authors': 0.02; 0.05 on docstring)", min=0.0)
    n_features = Option(int, 200, "features of the shared SAE", min=1)


class CodeOverlap(CircuitMethod):
    """O'Neill & Bui's recipe as published: one discrete SAE shared by all heads, trained on the
    training prompts' head outputs; score = distinct codes seen only on positive prompts."""

    name = "code-overlap"
    help = "discrete-code circuit identification (O'Neill & Bui 2024), as published"
    Options = CodeOverlapOptions

    def score_heads(self, model, task, prompts, *, train_index, seed, options, seconds, ablation):
        pos, neg = harvest_heads(model, prompts, options.reduce, seconds)
        t = time.perf_counter()
        pos_codes, neg_codes = head_codes(pos, neg, train_index, n_features=options.n_features, l1=options.l1,
                                          seed=seed)
        seconds["fit"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        scores = self.count(pos_codes, neg_codes, options)
        seconds["score"] = round(time.perf_counter() - t, 2)
        return scores

    def count(self, pos_codes, neg_codes, options):
        return code_overlap_scores(pos_codes, neg_codes)


class CodeOverlapEdges(CodeOverlap):
    """The paper's edge variant: (code, code) pairs of heads in different layers seen only
    on positive prompts; a head scores the pairs it takes part in."""

    name = "code-overlap-edges"
    help = "discrete-code circuit identification, edge variant (code pairs unique to positives)"

    def count(self, pos_codes, neg_codes, options):
        return code_edge_scores(pos_codes, neg_codes, options.n_features)
