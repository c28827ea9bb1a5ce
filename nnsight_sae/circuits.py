"""Circuit discovery runs: score every attention head for a task with a circuit method,
compare with the patching reference, check faithfulness, write circuit.json /
reference.json and the plots.

Methods and tasks come from plugins (``nnsight_sae_circuit_methods``,
``nnsight_sae_tasks``); the reference and the faithfulness check are the head-ablation
machinery of ``nnsight_sae.heads``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .atomic import write_json
from .errors import NnsightSaeError, OptionError
from .heads import ablation_effects, check_ablation, keep_only_metric, replacements
from .models import model_id
from .options import NoOptions
from .plots import pyplot, save_figure
from .plugins import registry
from .tasks import get_task


class CircuitMethod:
    """A way to score every attention head for a task (``nnsight-sae circuit --method NAME``).

    Subclasses set ``name`` and ``help``, declare their settings in ``Options`` and
    implement ``score_heads(model, task, prompts, *, train_index, seed, options, seconds, ablation)``:
    an (n_layers, n_heads) tensor, higher = more likely in the circuit; the method may fit
    on the prompts in ``train_index`` and record "harvest", "fit" and "score" times in
    ``seconds``. ``ablation`` (one of ``heads.ABLATIONS``) is how the run's reference and
    faithfulness check ablate a head; a method that estimates ablation effects estimates that
    one. ``signed = True``: the scores are estimates of each head's effect on the
    task metric (heads then rank by their absolute value). ``default = True`` makes it the
    method ``circuit`` runs when none is named. ``options_for(options, ablation)`` fills in
    settings whose default depends on the ablation (``run_circuit`` calls it before
    ``score_heads`` and records what it returns)."""

    name = ""
    help = ""
    signed = False
    default = False
    Options = NoOptions

    def score_heads(self, model, task, prompts, *, train_index, seed, options, seconds, ablation) -> torch.Tensor:
        raise NotImplementedError

    def options_for(self, options, ablation: str):
        return options


def circuit_method(name: str | None = None) -> CircuitMethod:
    """The registered method ``name``, or the default one."""
    reg = registry()
    if name is not None:
        return reg.get("circuit_methods", name)
    defaults = [e.obj for e in reg.circuit_methods.values() if e.obj.default]
    if len(defaults) != 1:
        raise NnsightSaeError(f"{len(defaults)} circuit methods say they are the default; name one with --method "
                              f"({', '.join(sorted(reg.circuit_methods)) or 'none registered'})")
    return defaults[0]


def method_options(method: CircuitMethod, task, options: dict | None = None):
    """The method's options: its defaults, then what the task recommends for it, then ``options``."""
    try:
        return method.Options(**{**task.method_defaults.get(method.name, {}), **(options or {})})
    except OptionError as e:
        raise OptionError(f"circuit method {method.name!r}: {e}") from None


def _task_prompts(model, task_name: str, n_prompts: int, seed: int, split: str):
    task = get_task(task_name)
    return task, task.prompts(model.tokenizer, n_prompts, seed=seed, split=split)


def _ranked(scores: torch.Tensor, key: str, order) -> list[dict]:
    L, H = scores.shape
    return sorted(({"layer": l, "head": h, key: float(scores[l, h])} for l in range(L) for h in range(H)),
                  key=lambda e: order(e[key]))


def run_reference(model, task_name: str, out: str | Path, *, n_prompts: int = 40, top: int = 20, seed: int = 0,
                  split: str = "train", ablation: str = "mean", progress: bool = True) -> dict:
    """Exhaustive single-head ablation (``ablation``: one of ``heads.ABLATIONS``); writes
    reference.json. The circuit is the ``top`` heads by |effect|."""
    check_ablation(ablation)
    task, prompts = _task_prompts(model, task_name, n_prompts, seed, split)
    t = time.perf_counter()
    effects = ablation_effects(model, task, prompts, ablation=ablation, progress=progress)
    seconds = time.perf_counter() - t
    return write_reference(out, task=task_name, model=model_id(model), method=f"{ablation}-ablation",
                           seconds=seconds, n_prompts=len(prompts), split=split, seed=seed, effects=effects, top=top,
                           ablation=ablation)


def write_reference(out, *, task, model, method, seconds, n_prompts, split, seed, effects, top, ablation) -> dict:
    """reference.json: every head's signed effect sorted by |effect|, and the top ``top`` as the circuit."""
    heads = _ranked(effects, "effect", lambda e: -abs(e))
    circuit = heads[:top]
    result = {"task": task, "model": model, "method": method, "ablation": ablation, "seconds": round(seconds, 2),
              "n_prompts": n_prompts, "split": split, "seed": seed, "heads": heads,
              "circuit": [[c["layer"], c["head"]] for c in circuit], "threshold": abs(circuit[-1]["effect"])}
    write_json(Path(out) / "reference.json", result)
    return result


def read_reference(folder: str | Path) -> dict:
    """reference.json from a folder, or a typed error saying what is wrong."""
    try:
        ref = json.loads((Path(folder) / "reference.json").read_text())
        ref["circuit"], ref["heads"]  # noqa: B018 - the fields every comparison needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NnsightSaeError(f"cannot read {folder}/reference.json: {e}") from None
    return ref


def reference_effects(ref: dict, shape) -> torch.Tensor:
    """The reference's signed effect of every head, as an (n_layers, n_heads) tensor."""
    effects = torch.zeros(shape)
    for h in ref["heads"]:
        effects[h["layer"], h["head"]] = h["effect"]
    return effects


def reference_sets(ref: dict, shape, sizes=(10, 30)) -> dict[int, torch.Tensor]:
    """Boolean (L, H) masks: the reference circuit, and the top N heads by |effect| for each N in sizes."""
    def mask(pairs):
        m = torch.zeros(shape, dtype=torch.bool)
        for layer, head in pairs:
            m[layer, head] = True
        return m

    sets = {len(ref["circuit"]): mask(ref["circuit"])}
    for n in sizes:
        sets.setdefault(n, mask([(h["layer"], h["head"]) for h in ref["heads"][:n]]))
    return sets


def run_circuit(model, task_name: str, out: str | Path, *, method: str | None = None, options: dict | None = None,
                n_prompts: int = 40, n_train: int = 10, seed: int = 0, split: str = "train",
                reference: str | Path | None = None, ablation: str | None = None, faithfulness_k: int | None = None,
                n_random: int = 5, curve: list[int] | None = None, progress: bool = True) -> dict:
    """Score every head with a circuit method (the default one unless ``method`` names
    another; ``options`` its settings); writes circuit.json and a heat map
    (and a ROC curve when a reference folder is given); a signed method (attribution)
    also writes its estimates as reference.json, so other methods can be scored against it.

    The method sees ``n_prompts`` prompts of ``split`` (and may fit on the first
    ``n_train``). ``ablation`` (default: the reference's, else "mean") is how heads are
    ablated in the faithfulness check and what an estimating method estimates. Metrics
    compare its scores with the reference's circuit (ROC AUC, precision and recall at
    k = its size; AUC against its top 10 and top 30 too). Faithfulness: the task metric
    with only the top k heads left (every other head ablated), as a fraction of clean
    minus all-ablated, against random k-head sets; with ``curve`` (a list of k), also at
    each of those k, plotted in faithfulness.png."""
    scorer = circuit_method(method)
    task = get_task(task_name)
    settings = method_options(scorer, task, options)
    if faithfulness_k is not None and faithfulness_k <= 0:
        raise NnsightSaeError(f"--k must be positive, not {faithfulness_k}")
    if curve and min(curve) <= 0:
        raise NnsightSaeError(f"--curve takes positive head counts, not {min(curve)}")
    ref = read_reference(reference) if reference else None
    ablation = check_ablation(ablation or (ref or {}).get("ablation", "mean"))
    settings = scorer.options_for(settings, ablation)
    # model ids compare by folder name: references written before ids dropped the folder's path still match
    if ref is not None and (Path(str(ref.get("model"))).name, ref.get("task")) != (model_id(model), task_name):
        raise NnsightSaeError(f"{reference}/reference.json is for task {ref.get('task')!r} on {ref.get('model')!r}, "
                              f"not {task_name!r} on {model_id(model)!r}; make one with "
                              f"`nnsight-sae reference --task {task_name} --out DIR`")
    t0 = time.perf_counter()
    prompts = task.prompts(model.tokenizer, n_prompts, seed=seed, split=split)
    if len(prompts) < n_train:
        raise NnsightSaeError(f"only {len(prompts)} usable prompts ({prompts.skipped} skipped); need {n_train}")
    seconds = {}
    scores = scorer.score_heads(model, task, prompts, train_index=list(range(n_train)), seed=seed,
                                options=settings, seconds=seconds, ablation=ablation)
    seconds["total"] = round(time.perf_counter() - t0, 2)
    for key in ("harvest", "fit", "score"):
        seconds.setdefault(key, 0.0)
    effects = scores if scorer.signed else None
    scores = scores.abs() if effects is not None else scores
    heads = _ranked(scores, "score", lambda v: -v)
    if effects is not None:
        for h in heads:
            h["effect"] = float(effects[h["layer"], h["head"]])
    result = {"task": task_name, "model": model_id(model), "method": scorer.name, "options": settings.as_dict(),
              "ablation": ablation, "n_train_prompts": n_train, "n_prompts": len(prompts), "split": split,
              "seed": seed, "seconds": seconds, "heads": heads, "reference": str(reference) if reference else None}
    truth = None
    if ref is not None:
        sets = reference_sets(ref, scores.shape)
        truth = sets[len(ref["circuit"])]
        k = int(truth.sum())
        precision, recall = precision_recall_at_k(scores, truth, k)
        result["metrics"] = {"roc_auc": roc_auc(scores, truth), "precision_at_k": precision,
                             "recall_at_k": recall, "k": k,
                             "roc_auc_top": {str(n): roc_auc(scores, m) for n, m in sorted(sets.items())}}
        plot_roc(scores, truth, Path(out) / "roc.png", title=f"{task_name}: {scorer.name}")
    k = faithfulness_k or (int(truth.sum()) if truth is not None else 20)
    if effects is not None:  # a signed method's estimates can serve as a reference for other methods
        write_reference(out, task=task_name, model=result["model"], method=scorer.name, seconds=seconds["total"],
                        n_prompts=len(prompts), split=split, seed=seed, effects=effects, top=k, ablation=ablation)
    result["faithfulness"] = faithfulness(model, task, prompts, scores, k, effects=effects, n_random=n_random,
                                          seed=seed, curve=curve, ablation=ablation,
                                          reference=reference_effects(ref, scores.shape) if ref else None)
    if curve:
        plot_faithfulness(result["faithfulness"]["curve"], Path(out) / "faithfulness.png",
                          title=f"{task_name}: {scorer.name}, heads kept alone")
    plot_heatmap(scores, Path(out) / "heads.png", truth=truth,
                 title=f"{task_name}: {scorer.name} scores (reference heads outlined)" if ref
                 else f"{task_name}: {scorer.name} scores")
    write_json(Path(out) / "circuit.json", result)
    return result


class CircuitRuns:
    """The task metric (mean over the positive prompts) with only the heads of a bool (L, H) mask
    left, every other head replaced by ``replaced`` (``replacements``): ``runs(keep)``. Each
    distinct mask runs once; ``fraction(m)`` is m as a share of clean minus all-ablated."""

    def __init__(self, model, task, prompts, replaced, shape):
        self.model, self.task, self.prompts, self.replaced = model, task, prompts, replaced
        self._memo = {}
        self.clean = self(torch.ones(shape, dtype=torch.bool))
        self.ablated = self(torch.zeros(shape, dtype=torch.bool))

    def __call__(self, keep: torch.Tensor) -> float:
        key = tuple(keep.flatten().tolist())
        if key not in self._memo:
            self._memo[key] = float(keep_only_metric(self.model, self.task, self.prompts, keep, self.replaced).mean())
        return self._memo[key]

    def fraction(self, metric: float) -> float:
        return (metric - self.ablated) / (self.clean - self.ablated) if self.clean != self.ablated else float("nan")


def faithfulness(model, task, prompts, scores: torch.Tensor, k: int, *, effects: torch.Tensor | None = None,
                 n_random: int = 5, seed: int = 0, curve: list[int] | None = None, ablation: str = "mean",
                 reference: torch.Tensor | None = None) -> dict:
    """The task metric on the positive prompts with only the k top-scoring heads left
    (all others ablated, by default replaced by their negative means), and with random k-head sets;
    each also as the fraction (m - m_ablated) / (m_clean - m_ablated). With signed
    effect estimates, also the k heads of largest positive effect ("top_k_positive"):
    the heads that do the task, without those that work against it. ``curve``: the
    same fractions at each of these k (two random sets each), under "curve"; with the
    reference's effects (``reference``), each curve row also has the reference's own top k
    and top k positive kept alone ("reference_top_k", "reference_top_k_positive")."""
    t = time.perf_counter()
    L, H = scores.shape
    run = CircuitRuns(model, task, prompts, replacements(model, prompts, ablation), (L, H))
    fraction = run.fraction
    generator = torch.Generator().manual_seed(seed)

    def keep(index):
        mask = torch.zeros(L * H, dtype=torch.bool)
        mask[index] = True
        return mask.view(L, H)

    def at(k: int, n_random: int) -> dict:
        k = min(k, L * H)
        row = {"k": k, "metric_top_k": run(keep(scores.flatten().topk(k).indices)),
               "metric_random_k": [run(keep(torch.randperm(L * H, generator=generator)[:k])) for _ in range(n_random)]}
        row["top_k"] = fraction(row["metric_top_k"])
        row["random_k"] = [fraction(m) for m in row["metric_random_k"]]
        row["random_k_mean"] = sum(row["random_k"]) / max(1, n_random)
        if effects is not None:
            row["metric_top_k_positive"] = run(keep(effects.flatten().topk(k).indices))
            row["top_k_positive"] = fraction(row["metric_top_k_positive"])
        return row

    def with_reference(row: dict) -> dict:
        if reference is not None:
            row["reference_top_k"] = fraction(run(keep(reference.abs().flatten().topk(row["k"]).indices)))
            row["reference_top_k_positive"] = fraction(run(keep(reference.flatten().topk(row["k"]).indices)))
        return row

    result = {"metric_clean": run.clean, "metric_all_ablated": run.ablated, **at(k, n_random)}
    if curve:
        result["curve"] = [with_reference(at(c, 2)) for c in sorted({min(c, L * H) for c in curve})]
    result["seconds"] = round(time.perf_counter() - t, 2)
    return result


def plot_faithfulness(curve: list[dict], path: Path, *, title=""):
    """Fraction of the task kept vs heads kept: top by score, top by positive effect, random."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [row["k"] for row in curve]
    ax.plot(ks, [row["top_k"] for row in curve], "o-", label="top k by score")
    if "top_k_positive" in curve[0]:
        ax.plot(ks, [row["top_k_positive"] for row in curve], "s-", label="top k by positive effect")
    if "reference_top_k_positive" in curve[0]:
        ax.plot(ks, [row["reference_top_k_positive"] for row in curve], "s--", color="black",
                label="reference's own top k by positive effect")
    ax.plot(ks, [row["random_k_mean"] for row in curve], "x:", color="grey", label="random k (mean of 2)")
    ax.axhline(1.0, color="k", linewidth=0.6)
    ax.axhline(0.0, color="k", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("heads kept (the rest ablated)")
    ax.set_ylabel("fraction of the task metric kept")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def roc_auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of scores (flattened) against a boolean set (ties count half)."""
    s, y = scores.flatten().double(), positives.flatten().bool()
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def precision_recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> tuple[float, float]:
    """Precision and recall of the k highest-scoring heads against a boolean set."""
    top = scores.flatten().topk(k).indices
    hits = positives.flatten().bool()[top].sum().item()
    return hits / k, hits / max(1, int(positives.sum()))


def plot_heatmap(scores: torch.Tensor, path: Path, *, truth=None, title=""):
    """Layer x head heat map; reference heads outlined."""
    plt = pyplot()
    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(4, H * 0.5 + 2), max(4, L * 0.25 + 1)))
    im = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis")
    if truth is not None:
        for layer, head in truth.nonzero().tolist():
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def plot_roc(scores: torch.Tensor, truth: torch.Tensor, path: Path, *, title=""):
    plt = pyplot()
    order = scores.flatten().argsort(descending=True)
    y = truth.flatten()[order].double()
    tpr = torch.cat([torch.zeros(1), y.cumsum(0) / y.sum()])
    fpr = torch.cat([torch.zeros(1), (1 - y).cumsum(0) / (1 - y).sum()])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr.numpy(), tpr.numpy(), label=f"AUC {roc_auc(scores, truth):.3f}")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    save_figure(fig, path)
