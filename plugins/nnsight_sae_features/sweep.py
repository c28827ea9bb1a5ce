"""Transcoders against SAEs on MLPs (Dunefsky et al. 2024, sparsity-fidelity): over a sweep
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
from nnsight_sae.sites import resolve_site, site_layer

from .common import CorpusOptions, FeatureError, bind

KINDS = {"transcoder": "mlp_in", "relu": "mlp_out"}  # dictionary type -> the site it reads


def sweep(model, layers: list[int], penalties: dict[str, list[float]], *, d_sae: int, data: DataSpec,
          epochs: int, out: Path, seed: int = 0) -> list[dict]:
    """At each layer, one dictionary per penalty of each type in ``penalties`` (type -> penalties),
    each saved under ``out``, all trained on one harvest of every layer's MLP input and output;
    their eval results (l0, ce_clean, ce_increase, fvu) with the layer, type and penalty."""
    every_site = sorted(f"{site}.{layer}" for layer in layers for site in KINDS.values())
    points = []
    for layer in layers:
        for type_name, site in KINDS.items():
            for penalty in penalties[type_name]:
                run = RunSpec(types=[type_name], sites=[f"{site}.{layer}"], d_sae=[d_sae],
                              hyper={"l1_coefficient": penalty}, epochs=epochs, harvest_sites=every_site)
                folder = out / f"{type_name}-{layer}-l1-{penalty:g}"
                result = train_and_evaluate(model, data, run, {"seed": seed}, folder)[0]
                points.append({"layer": layer, "type": type_name, "l1_coefficient": penalty, "folder": folder.name,
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
    """CE increase against L0, both families, one panel per layer."""
    plt = pyplot()
    layers = sorted({p["layer"] for p in points})
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        for type_name, label, marker in (("transcoder", "transcoder (MLP replaced)", "o"),
                                         ("relu", "SAE on the MLP output (reconstructed)", "s")):
            pts = sorted((p["l0"], p["ce_increase"]) for p in points if p["type"] == type_name and p["layer"] == layer)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active features per token)")
        ax.set_title(f"MLP {layer}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("CE increase over the clean model (nats)")
    axes[0][0].legend()
    fig.suptitle(title)
    save_figure(fig, path)


class SweepOptions(CorpusOptions):
    l1 = Option(float, [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3], "sparsity penalties of the transcoders (and of the SAEs "
                "unless --sae-l1 is given)", many=True, min=0.0)
    sae_l1 = Option(float, None, "sparsity penalties of the SAEs (default: --l1; SAEs need larger ones for the "
                    "same L0)", many=True, min=0.0)
    layers = Option(int, None, "MLPs to sweep, one harvest for all (default: the given dictionary's)", many=True,
                    min=0)
    d_sae = Option(int, None, "width of every dictionary (default: the given one's)", min=1)
    epochs = Option(int, 1, "passes over the training tokens", min=1)
    eval_tokens = Option(int, 8192, "held-out tokens for each CE", min=1)
    tokens = Option(int, 100_000, "corpus tokens to train on", min=1)

    def check(self):
        for flag, penalties in (("--l1", self.l1), ("--sae-l1", self.sae_l1)):
            if penalties is not None and (not penalties or 0.0 in penalties):
                raise FeatureError(f"{flag} needs positive penalties, got {penalties}")


class TranscoderVsSae(Analysis):
    name = "tc-vs-sae"
    help = ("sparsity sweep at the dictionary's layer (or --layers): transcoders (MLP replaced) vs SAEs on the MLP "
            "output, CE against L0, Pareto plot")
    Options = SweepOptions

    def run(self, *, model, dictionary, out_dir, options):
        layer = site_layer(dictionary.site)
        if layer is None or not dictionary.site.startswith(("mlp_in.", "mlp_out.")):
            raise FeatureError(f"tc-vs-sae compares dictionaries on one MLP: give a transcoder or an SAE at "
                               f"mlp_in.L / mlp_out.L, not one at {dictionary.site}")
        bind(model, dictionary)
        layers = sorted(set(options.layers or [layer]))
        for other in layers:  # every layer's MLP sites must exist before hours of training start
            for site in KINDS.values():
                resolve_site(model, f"{site}.{other}")
        data = DataSpec(corpus=options.corpus, data=options.data, tokens=options.tokens,
                        ctx_len=options.ctx_len, eval_tokens=options.eval_tokens)
        d_sae = options.d_sae or dictionary.d_sae
        penalties = {"transcoder": sorted(options.l1), "relu": sorted(options.sae_l1 or options.l1)}
        points = sweep(model, layers, penalties, d_sae=d_sae, data=data, epochs=options.epochs,
                       out=out_dir / "dictionaries")
        matched = [{"layer": layer, **m} for layer in layers
                   for m in matched_l0([p for p in points if p["layer"] == layer])]
        plot_pareto(points, out_dir / "tc-vs-sae.png", title=f"{model_id(model)}, d_sae {d_sae}")
        mean_difference = {str(layer): sum(ds) / len(ds) for layer in layers
                           if (ds := [m["difference"] for m in matched if m["layer"] == layer])}
        return {"model": model_id(model), "layers": layers, "d_sae": d_sae, "tokens": options.tokens,
                "epochs": options.epochs, "penalties": penalties, "points": points, "matched_l0": matched,
                "mean_difference_at_matched_l0": mean_difference}
