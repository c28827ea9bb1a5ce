"""Circuit discovery runs: score every attention head for a task, compare with a
patching reference, write circuit.json / reference.json and the plots.

Methods and tasks come from plugins. A circuit method is an Analysis with
``circuit_method = True`` and ``score_heads(model, task, prompts, train_index, seed) -> (L, H)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .analysis import write_json
from .errors import NnsightSaeError
from .plugins import registry


def get_task(name: str):
    """A registered task by name, or a JSONL task file by path."""
    if name.endswith(".jsonl"):
        if not Path(name).is_file():
            raise NnsightSaeError(f"no such task file: {name}")
        return type(registry().get("tasks", "file"))(name)
    return registry().get("tasks", name)


def circuit_methods() -> dict:
    return {n: e.obj for n, e in registry().analyses.items() if getattr(e.obj, "circuit_method", False)}


def _model_id(model) -> str:
    return str(getattr(model._module.config, "name_or_path", "") or type(model._module).__name__)


def run_reference(model, task_name: str, out: str | Path, *, n_prompts: int = 40, top: int = 20, seed: int = 0,
                  progress: bool = True) -> dict:
    """Exhaustive single-head mean ablation; writes reference.json."""
    method = registry().get("analyses", "reference")
    task = get_task(task_name)
    prompts = task.prompts(model.tokenizer, n_prompts, seed=seed)
    t = time.perf_counter()
    effects = method.score_heads(model, task, prompts, None, seed, progress=progress)
    seconds = time.perf_counter() - t
    L, H = effects.shape
    heads = sorted(({"layer": l, "head": h, "effect": float(effects[l, h])} for l in range(L) for h in range(H)),
                   key=lambda e: -abs(e["effect"]))
    circuit = heads[:top]
    result = {"task": task_name, "model": _model_id(model), "method": "mean-ablation", "seconds": round(seconds, 2),
              "n_prompts": len(prompts), "heads": heads, "circuit": [[c["layer"], c["head"]] for c in circuit],
              "threshold": abs(circuit[-1]["effect"])}
    write_json(Path(out) / "reference.json", result)
    return result


def run_circuit(model, task_name: str, out: str | Path, *, method: str = "code-overlap", n_prompts: int = 40,
                n_train: int = 10, seed: int = 0, reference: str | Path | None = None, progress: bool = True) -> dict:
    """Score every head with a circuit method; writes circuit.json and a heat map
    (and a ROC curve when a reference folder is given)."""
    import json

    methods = circuit_methods()
    if method not in methods:
        raise NnsightSaeError(f"unknown circuit method {method!r}; methods: {', '.join(sorted(methods))}")
    task = get_task(task_name)
    t0 = time.perf_counter()
    prompts = task.prompts(model.tokenizer, n_prompts, seed=seed)
    if len(prompts) < n_train:
        raise NnsightSaeError(f"only {len(prompts)} usable prompts ({prompts.skipped} skipped); need {n_train}")
    train_index = list(range(n_train))
    seconds = {}
    scores = methods[method].score_heads(model, task, prompts, train_index, seed, seconds=seconds)
    seconds["total"] = round(time.perf_counter() - t0, 2)
    for key in ("harvest", "fit", "score"):
        seconds.setdefault(key, 0.0)
    L, H = scores.shape
    heads = sorted(({"layer": l, "head": h, "score": float(scores[l, h])} for l in range(L) for h in range(H)),
                   key=lambda e: -e["score"])
    result = {"task": task_name, "model": _model_id(model), "method": method, "n_train_prompts": n_train,
              "seconds": seconds, "heads": heads, "reference": str(reference) if reference else None}
    if reference:
        try:
            ref = json.loads((Path(reference) / "reference.json").read_text())
        except (OSError, ValueError) as e:
            raise NnsightSaeError(f"cannot read {reference}/reference.json: {e}") from None
        truth = torch.zeros(L, H, dtype=torch.bool)
        for layer, head in ref["circuit"]:
            truth[layer, head] = True
        k = int(truth.sum())
        precision, recall = precision_recall_at_k(scores, truth, k)
        result["metrics"] = {"roc_auc": roc_auc(scores, truth), "precision_at_k": precision,
                             "recall_at_k": recall, "k": k}
        plot_roc(scores, truth, Path(out) / "roc.png", title=f"{task_name}: {method}")
    plot_heatmap(scores, Path(out) / "heads.png", truth=truth if reference else None,
                 title=f"{task_name}: {method} scores (reference heads outlined)" if reference
                 else f"{task_name}: {method} scores")
    write_json(Path(out) / "circuit.json", result)
    return result


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


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(scores: torch.Tensor, path: Path, *, truth=None, title=""):
    """Layer x head heat map; reference heads outlined."""
    plt = _figure()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_roc(scores: torch.Tensor, truth: torch.Tensor, path: Path, *, title=""):
    plt = _figure()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
