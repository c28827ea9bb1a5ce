"""Transcoders against SAEs on one MLP (Dunefsky et al. 2024, sparsity-fidelity): over a sweep
of sparsity penalties, a transcoder (MLP input -> MLP output, the MLP replaced) and an SAE on
the MLP's output (the output reconstructed), trained on the same tokens, scored by next-token
CE against L0."""

from __future__ import annotations

import math
from pathlib import Path

from nnsight_sae.analysis import Analysis
from nnsight_sae.models import model_id
from nnsight_sae.options import Option
from nnsight_sae.pipeline import DataSpec, RunSpec, train_and_evaluate
from nnsight_sae.plots import pyplot, save_figure
from nnsight_sae.sites import site_layer

from .common import CorpusOptions, FeatureError, bind

KINDS = {"transcoder": "mlp_in", "relu": "mlp_out"}  # dictionary type -> the site it reads


def sweep(model, layer: int, penalties: list[float], *, d_sae: int, data: DataSpec, epochs: int, out: Path,
          seed: int = 0) -> list[dict]:
    """One transcoder and one ReLU SAE per penalty, each saved under ``out``; their eval
    results (l0, ce_clean, ce_spliced, fvu, ...) with the penalty and type."""
    points = []
    for penalty in penalties:
        for type_name, site in KINDS.items():
            run = RunSpec(types=[type_name], sites=[f"{site}.{layer}"], d_sae=[d_sae],
                          hyper={"l1_coefficient": penalty}, epochs=epochs)
            folder = out / f"{type_name}-l1-{penalty:g}"
            result = train_and_evaluate(model, data, run, {"seed": seed}, folder)[0]
            points.append({"type": type_name, "l1_coefficient": penalty, "folder": folder.name,
                           "l0": result["l0"], "ce_clean": result["ce_clean"],
                           "ce_increase": result["ce_spliced"] - result["ce_clean"], "fvu": result["fvu"]})
    return points


def matched_l0(points: list[dict]) -> list[dict]:
    """For each transcoder point inside the SAEs' L0 range, the SAEs' CE increase at the same L0
    (linear in log L0 between the two nearest SAE points) and the difference (negative: the
    transcoder does better)."""
    saes = sorted((p["l0"], p["ce_increase"]) for p in points if p["type"] == "relu" and p["l0"] > 0)
    out = []
    for p in points:
        if p["type"] != "transcoder" or not saes or not saes[0][0] <= p["l0"] <= saes[-1][0]:
            continue
        for (l0_a, ce_a), (l0_b, ce_b) in zip(saes, saes[1:] or saes):
            if l0_a <= p["l0"] <= l0_b:
                t = 0.0 if l0_b == l0_a else (math.log(p["l0"]) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
                sae_ce = ce_a + t * (ce_b - ce_a)
                out.append({"l0": p["l0"], "transcoder_ce_increase": p["ce_increase"],
                            "sae_ce_increase": sae_ce, "difference": p["ce_increase"] - sae_ce})
                break
    return out


def plot_pareto(points: list[dict], path: Path, *, title: str = "") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for type_name, label, marker in (("transcoder", "transcoder (MLP replaced)", "o"),
                                     ("relu", "SAE on the MLP output (reconstructed)", "s")):
        pts = sorted((p["l0"], p["ce_increase"]) for p in points if p["type"] == type_name)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("CE increase over the clean model (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


class SweepOptions(CorpusOptions):
    l1 = Option(float, [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3], "sparsity penalties, one transcoder and one SAE each",
                many=True, min=0.0)
    d_sae = Option(int, None, "width of every dictionary (default: the given one's)", min=1)
    epochs = Option(int, 1, "passes over the training tokens", min=1)
    eval_tokens = Option(int, 8192, "held-out tokens for each CE", min=1)
    tokens = Option(int, 100_000, "corpus tokens to train on", min=1)

    def check(self):
        if not self.l1 or 0.0 in self.l1:
            raise FeatureError(f"--l1 needs positive penalties, got {self.l1}")


class TranscoderVsSae(Analysis):
    name = "tc-vs-sae"
    help = ("sparsity sweep at the dictionary's layer: transcoders (MLP replaced) vs SAEs on the MLP output, "
            "CE against L0, Pareto plot")
    Options = SweepOptions

    def run(self, *, model, dictionary, out_dir, options):
        layer = site_layer(dictionary.site)
        if layer is None or not dictionary.site.startswith(("mlp_in.", "mlp_out.")):
            raise FeatureError(f"tc-vs-sae compares dictionaries on one MLP: give a transcoder or an SAE at "
                               f"mlp_in.L / mlp_out.L, not one at {dictionary.site}")
        bind(model, dictionary)
        data = DataSpec(corpus=options.corpus, data=options.data, tokens=options.tokens,
                        ctx_len=options.ctx_len, eval_tokens=options.eval_tokens)
        d_sae = options.d_sae or dictionary.d_sae
        points = sweep(model, layer, sorted(options.l1), d_sae=d_sae, data=data, epochs=options.epochs,
                       out=out_dir / "dictionaries")
        matched = matched_l0(points)
        plot_pareto(points, out_dir / "tc-vs-sae.png", title=f"{model_id(model)}, MLP {layer}, d_sae {d_sae}")
        return {"model": model_id(model), "layer": layer, "d_sae": d_sae, "tokens": options.tokens,
                "epochs": options.epochs, "points": points, "matched_l0": matched,
                "mean_difference_at_matched_l0": (sum(m["difference"] for m in matched) / len(matched)
                                                  if matched else None)}
