"""The trivial baseline: how far apart a head's mean outputs on positive and negative prompts are."""

from __future__ import annotations

import torch

from nnsight_sae.circuits import CircuitMethod
from nnsight_sae.options import Options

from .code_overlap import REDUCE, harvest_heads


def mean_difference_scores(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(L, H): the norm of the difference between a head's mean output on positive and negative prompts."""
    return (pos.mean(0) - neg.mean(0)).norm(dim=-1)


class MeanDiffOptions(Options):
    reduce = REDUCE


class MeanDiff(CircuitMethod):
    """The trivial baseline: norm of (mean head output on positives - on negatives)."""

    name = "mean-diff"
    help = "trivial baseline: |mean output on positives - on negatives| per head"
    Options = MeanDiffOptions

    def score_heads(self, model, task, prompts, *, train_index, seed, options, seconds, ablation):
        pos, neg = harvest_heads(model, prompts, options.reduce, seconds)
        return mean_difference_scores(pos, neg)
