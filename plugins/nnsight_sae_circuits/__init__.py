"""First-party circuit discovery: tasks (ioi, greater-than, docstring, file) and
per-head methods (code-overlap, mean-diff, attribution, reference)."""

import time

from nnsight_sae import Analysis, hookimpl

from . import heads, methods
from .tasks import DocstringTask, FileTask, GreaterThanTask, IOITask


class CircuitMethod(Analysis):
    """An analysis that scores every attention head for a task (``nnsight-sae circuit --method NAME``)."""

    circuit_method = True
    reduce = "mean"

    def run(self, *, model, dictionary, out_dir, options):
        raise NotImplementedError("run circuit methods with `nnsight-sae circuit --method NAME`")


def _harvest(model, prompts, reduce, seconds):
    t = time.perf_counter()
    pos = heads.head_outputs(model, prompts.positive, reduce=reduce)
    neg = heads.head_outputs(model, prompts.negative, reduce=reduce)
    seconds["harvest"] = round(time.perf_counter() - t, 2)
    return pos, neg


class CodeOverlap(CircuitMethod):
    """O'Neill & Bui's recipe as published: one discrete SAE shared by all heads, trained on the
    training prompts' head outputs; score = distinct codes seen only on positive prompts."""

    name = "code-overlap"
    help = "discrete-code circuit identification (O'Neill & Bui 2024), as published"

    def score_heads(self, model, task, prompts, train_index, seed, seconds=None):
        seconds = {} if seconds is None else seconds
        pos, neg = _harvest(model, prompts, self.reduce, seconds)
        t = time.perf_counter()
        l1 = 0.05 if task.name == "docstring" else 0.02
        scores = methods.code_overlap_scores(pos, neg, train_index, l1=l1, seed=seed)
        seconds["fit"] = round(time.perf_counter() - t, 2)
        return scores


class MeanDiff(CircuitMethod):
    """The trivial baseline: norm of (mean head output on positives - on negatives)."""

    name = "mean-diff"
    help = "trivial baseline: |mean output on positives - on negatives| per head"

    def score_heads(self, model, task, prompts, train_index, seed, seconds=None):
        seconds = {} if seconds is None else seconds
        pos, neg = _harvest(model, prompts, self.reduce, seconds)
        return methods.mean_difference_scores(pos, neg)


class Attribution(CircuitMethod):
    """Attribution patching: gradient x (negative mean - activation) per head."""

    name = "attribution"
    help = "attribution patching per head (first-order estimate of mean ablation)"

    def score_heads(self, model, task, prompts, train_index, seed, seconds=None):
        seconds = {} if seconds is None else seconds
        t = time.perf_counter()
        effects = heads.attribution_effects(model, task, prompts)
        seconds["score"] = round(time.perf_counter() - t, 2)
        return effects.abs()


class Reference(CircuitMethod):
    """Exhaustive single-head mean ablation (``nnsight-sae reference``)."""

    name = "reference"
    help = "per-head mean ablation, the reference circuit (slow: every head)"

    def score_heads(self, model, task, prompts, train_index, seed, seconds=None, progress=True):
        return heads.mean_ablation_effects(model, task, prompts, progress=progress)


@hookimpl
def nnsight_sae_tasks():
    return [IOITask(), GreaterThanTask(), DocstringTask(), FileTask()]


@hookimpl
def nnsight_sae_analyses():
    return [CodeOverlap(), MeanDiff(), Attribution(), Reference()]
