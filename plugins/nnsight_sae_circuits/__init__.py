"""First-party circuit discovery: tasks (ioi, greater-than, docstring, file) and
per-head methods (attribution, code-overlap, code-overlap-edges, mean-diff, reference)."""

import time

from nnsight_sae import Analysis, hookimpl

from . import heads, methods
from .tasks import DocstringTask, FileTask, GreaterThanTask, IOITask


class CircuitMethod(Analysis):
    """An analysis that scores every attention head for a task (``nnsight-sae circuit --method NAME``).

    ``score_heads(model, task, prompts, *, train_index, seed, reduce, seconds)`` returns an
    (n_layers, n_heads) tensor, higher = more likely in the circuit, and may record
    "harvest", "fit" and "score" times in ``seconds``. A method with ``signed = True``
    returns an estimate of each head's effect on the task metric instead; heads are
    then ranked by its absolute value."""

    circuit_method = True
    signed = False

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
    n_features = 200

    def score_heads(self, model, task, prompts, *, train_index, seed, reduce="mean", seconds=None):
        seconds = {} if seconds is None else seconds
        pos, neg = _harvest(model, prompts, reduce, seconds)
        t = time.perf_counter()
        l1 = 0.05 if task.name == "docstring" else 0.02  # the authors' settings
        pos_codes, neg_codes = methods.head_codes(pos, neg, train_index, n_features=self.n_features, l1=l1,
                                                  seed=seed)
        seconds["fit"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        scores = self.count(pos_codes, neg_codes)
        seconds["score"] = round(time.perf_counter() - t, 2)
        return scores

    def count(self, pos_codes, neg_codes):
        return methods.code_overlap_scores(pos_codes, neg_codes)


class CodeOverlapEdges(CodeOverlap):
    """The paper's edge variant: (code, code) pairs of heads in different layers seen only
    on positive prompts; a head scores the pairs it takes part in."""

    name = "code-overlap-edges"
    help = "discrete-code circuit identification, edge variant (code pairs unique to positives)"

    def count(self, pos_codes, neg_codes):
        return methods.code_edge_scores(pos_codes, neg_codes, self.n_features)


class MeanDiff(CircuitMethod):
    """The trivial baseline: norm of (mean head output on positives - on negatives)."""

    name = "mean-diff"
    help = "trivial baseline: |mean output on positives - on negatives| per head"

    def score_heads(self, model, task, prompts, *, train_index, seed, reduce="mean", seconds=None):
        seconds = {} if seconds is None else seconds
        pos, neg = _harvest(model, prompts, reduce, seconds)
        return methods.mean_difference_scores(pos, neg)


class Attribution(CircuitMethod):
    """Attribution patching: -gradient x (negative mean - activation) per head, the
    first-order estimate of each head's mean-ablation effect. The default method."""

    name = "attribution"
    help = "attribution patching per head (first-order estimate of mean ablation); the default"
    signed = True

    def score_heads(self, model, task, prompts, *, train_index, seed, reduce="mean", seconds=None):
        seconds = {} if seconds is None else seconds
        t = time.perf_counter()
        effects = heads.attribution_effects(model, task, prompts)
        seconds["score"] = round(time.perf_counter() - t, 2)
        return effects


class Reference(CircuitMethod):
    """Exhaustive single-head mean ablation (``nnsight-sae reference``); also runs a
    set of heads alone (the rest mean-ablated) for the faithfulness check."""

    name = "reference"
    help = "per-head mean ablation, the reference circuit (slow: every head)"
    signed = True
    negative_means = staticmethod(heads.negative_means)
    keep_only_metric = staticmethod(heads.keep_only_metric)

    def score_heads(self, model, task, prompts, *, train_index=None, seed=0, reduce="mean", seconds=None,
                    progress=True):
        return heads.mean_ablation_effects(model, task, prompts, progress=progress)


@hookimpl
def nnsight_sae_tasks():
    return [IOITask(), GreaterThanTask(), DocstringTask(), FileTask()]


@hookimpl
def nnsight_sae_analyses():
    return [CodeOverlap(), CodeOverlapEdges(), MeanDiff(), Attribution(), Reference()]
