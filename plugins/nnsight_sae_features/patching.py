"""Feature patching against PCA (Cunningham et al. 2023, section 4).

For a base prompt and its counterfactual (IOI: another indirect object), both are
read at one site and written in a basis: the dictionary's features (coefficients =
feature activations, directions = decoder rows) or the site's principal components
(coefficients = projections of the centred activation). Patching a set F of
directions sets x' = x + sum_{j in F} (c_cf_j - c_base_j) d_j at every real
position; the rest of the model runs on and we measure KL(patched || counterfactual)
on the last position's next-token distribution, averaged over the prompts.

Directions are ordered as in the paper: each candidate's KL when patched alone
(its independent effect on a flat graph), best first, averaged over the prompts;
the curve adds them in that order, one set shared by every prompt. Names and
numbers differ from prompt to prompt, so the features carrying them differ too; a
second curve ranks each prompt's own candidates on that prompt (same cost). The
candidates are the ``n_candidates`` directions whose patch moves the activation
most (|c_cf_j - c_base_j| * ||d_j|| summed over positions, and over prompts for
the shared ranking), the same count for both bases.
"""

from __future__ import annotations

import time

import torch

from nnsight_sae.analysis import Analysis
from nnsight_sae.harvest import harvest
from nnsight_sae.models import model_id, trace_options
from nnsight_sae.options import Option
from nnsight_sae.plots import pyplot, save_figure

from .common import CorpusOptions, bind, clean_prefix, corpus_of, counterfactual_prompts, run_with_additions

FRACTIONS = (0.5, 0.25, 0.1)


class Basis:
    """Coefficients of base and counterfactual activations in one set of directions."""

    def __init__(self, name: str, base: torch.Tensor, cf: torch.Tensor, directions: torch.Tensor):
        self.name = name
        self.delta = cf - base  # (n, p, K)
        self.directions = directions  # (K, d)

    def patch(self, index: torch.Tensor) -> torch.Tensor:
        """(n, p, d): the change that patching directions ``index`` (n, m) makes, prompt i
        patching directions index[i]."""
        n, p, _ = self.delta.shape
        coefficients = self.delta.gather(-1, index[:, None, :].expand(n, p, index.shape[1]))
        return torch.einsum("npm,nmd->npd", coefficients, self.directions[index])

    def sizes(self) -> torch.Tensor:
        """(n, K): how far patching each direction alone moves each prompt's activation."""
        return self.delta.abs().sum(1) * self.directions.norm(dim=-1)


def pca_directions(model, site: str, tokens: torch.Tensor, *, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and principal directions (d, d), rows by decreasing variance, of the site's
    activations on corpus tokens (each context's first position left out, as in training)."""
    rows = torch.cat([r[site] for r in harvest(model, [site], tokens, batch_size=batch_size, drop_bos=True,
                                               progress=False)]).double()
    mean = rows.mean(0)
    variance, vectors = torch.linalg.eigh(torch.cov((rows - mean).T))
    order = variance.argsort(descending=True)
    return mean.float(), vectors[:, order].T.float().contiguous()


@torch.no_grad()
def read_site(model, site, enc: dict, *, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's activation (n, p, d) and the last position's logits (n, vocab)."""
    xs, logits = [], []
    for start in range(0, len(enc["input_ids"]), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in enc.items()}
        with model.trace(batch, **trace_options(model, last_position=True)):
            x = site.read().save()
            out = model.output.logits[:, -1].save()
        xs.append(x.float().cpu())
        logits.append(out.float().cpu())
    return torch.cat(xs), torch.cat(logits)


def kl_to(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(target)) per row, over the last dim."""
    return torch.nn.functional.kl_div(target_logits.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)


def patching_curve(model, site, enc, basis: Basis, cf_logits, metric, *, n_candidates: int, per_prompt: bool,
                   skip=None, batch_size: int = 256) -> dict:
    """Rank candidate directions by their KL patched alone, then the KL (and task metric) with
    the first 1..n of them patched. per_prompt=False is the paper's flat graph: one ranking
    shared by every prompt (effects averaged over prompts); per_prompt=True ranks each
    prompt's own candidates on that prompt."""
    n = len(cf_logits)

    def run(sets, desc):
        logits = run_with_additions(model, enc, site, lambda k: basis.patch(sets[k]), len(sets),
                                    lambda repeats: model.output.logits[:, -1], batch_size=batch_size,
                                    skip=skip, desc=desc, last_position=True)
        return torch.stack(logits)

    sizes = basis.sizes()
    if per_prompt:
        candidates = sizes.topk(n_candidates, dim=-1).indices  # (n, M)
    else:
        candidates = sizes.sum(0).topk(n_candidates).indices.expand(n, -1)
    m = candidates.shape[1]
    mode = "per prompt" if per_prompt else "shared"
    alone = kl_to(run([candidates[:, k:k + 1] for k in range(m)], f"{basis.name} {mode}: each alone"),
                  cf_logits)  # (M, n)
    if per_prompt:
        order = candidates.gather(1, alone.argsort(0).T)
    else:
        order = candidates[:, alone.mean(1).argsort()]
    logits = run([order[:, :k] for k in range(1, m + 1)], f"{basis.name} {mode}: curve")
    curve = {"n": list(range(1, m + 1)),
             "kl": [round(v, 6) for v in kl_to(logits, cf_logits).mean(-1).tolist()],
             "metric": [round(float(metric(lg).mean()), 6) for lg in logits]}
    if not per_prompt:
        curve["order"] = order[0].tolist()
        curve["kl_alone"] = [round(v, 6) for v in alone.mean(1).sort().values.tolist()]
    return curve


def all_directions(model, site, enc, basis: Basis, cf_logits, shift: torch.Tensor, skip=None) -> dict:
    """Every direction of the basis patched (PCA: the counterfactual activation itself): the KL,
    and the share of the activation's shift x_cf - x_base the patch reproduces,
    1 - |shift - patch|^2 / |shift|^2 (below 1 where a dictionary's error terms differ)."""
    every = torch.arange(basis.delta.shape[-1]).expand(len(cf_logits), -1)
    patch = basis.patch(every)
    logits = run_with_additions(model, enc, site, lambda k: patch, 1,
                                lambda repeats: model.output.logits[:, -1], skip=skip,
                                last_position=True)[0]
    captured = 1 - float((shift - patch).pow(2).sum() / shift.pow(2).sum())
    return {"kl_all_directions": round(float(kl_to(logits, cf_logits).mean()), 6),
            "shift_captured": round(captured, 6)}


def directions_needed(curve: dict, kl_unpatched: float) -> dict:
    """For each fraction f, the fewest patched directions that bring KL to f * unpatched (None if never)."""
    out = {}
    for f in FRACTIONS:
        hits = [n for n, kl in zip(curve["n"], curve["kl"]) if kl <= f * kl_unpatched]
        out[str(f)] = hits[0] if hits else None
    return out


def feature_patching(model, attached, task, prompts, *, pca_tokens: torch.Tensor, n_candidates: int = 48,
                     batch_size: int = 256) -> dict:
    """The SAE and PCA curves on one task's prompts, with the figures the JSON reports."""
    t0 = time.perf_counter()
    site, dictionary = attached.site, attached.dictionary
    enc_base, enc_cf = (dict(model.tokenizer(texts, return_tensors="pt", padding=True))
                        for texts in (prompts.positive, prompts.counterfactual))
    x_base, base_logits = read_site(model, site, enc_base)
    x_cf, cf_logits = read_site(model, site, enc_cf)
    m = enc_base["attention_mask"].float()[..., None]

    def metric(logits):
        return task.metric(logits, prompts)

    directions = dictionary.decoder_directions().detach()

    @torch.no_grad()
    def codes(x):
        return dictionary.encode(x.to(directions.device, directions.dtype)).float().cpu() * m

    sae = Basis("sae", codes(x_base), codes(x_cf), directions.float().cpu())
    t_pca = time.perf_counter()
    mean, components = pca_directions(model, site.name, pca_tokens)
    t_pca = time.perf_counter() - t_pca
    # PCA direction indices are variance ranks
    pca = Basis("pca", (x_base - mean) @ components.T * m, (x_cf - mean) @ components.T * m, components)

    kl_unpatched = float(kl_to(base_logits, cf_logits).mean())
    result = {"n_prompts": len(prompts), "site": site.name, "kl_unpatched": round(kl_unpatched, 6),
              "metric_base": round(float(metric(base_logits).mean()), 6),
              "metric_counterfactual": round(float(metric(cf_logits).mean()), 6),
              "n_candidates": n_candidates, "fractions": list(FRACTIONS), "pca_fit_tokens": int(pca_tokens.numel())}
    skip = clean_prefix(model, site, enc_base)
    for basis in (sae, pca):
        result[basis.name] = all_directions(model, site, enc_base, basis, cf_logits, (x_cf - x_base) * m, skip)
        for key, per_prompt in (("shared", False), ("per_prompt", True)):
            curve = patching_curve(model, site, enc_base, basis, cf_logits, metric, n_candidates=n_candidates,
                                   per_prompt=per_prompt, skip=skip, batch_size=batch_size)
            curve["directions_needed"] = directions_needed(curve, kl_unpatched)
            result[basis.name][key] = curve
    result["seconds"] = {"total": round(time.perf_counter() - t0, 2), "pca_fit": round(t_pca, 2)}
    return result


def plot_curves(result: dict, path) -> None:
    """KL against the number of patched directions, SAE features and PCA directions."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label, color in (("sae", "dictionary features", "C0"), ("pca", "PCA directions", "C1")):
        for key, style in (("shared", "-"), ("per_prompt", "--")):
            curve = result[name][key]
            ax.plot(curve["n"], curve["kl"], style, color=color, marker="." if key == "shared" else None,
                    label=f"{label}, {'one ranking' if key == 'shared' else 'ranked per prompt'}")
    ax.axhline(result["kl_unpatched"], color="grey", linestyle=":", label="unpatched")
    ax.axhline(0.5 * result["kl_unpatched"], color="grey", linestyle="--", linewidth=0.8, label="half of unpatched")
    ax.set_xlabel("patched directions (greedy order)")
    ax.set_ylabel("KL(patched || counterfactual), last position")
    ax.set_title(f"feature patching at {result['site']} ({result['task']}, {result['n_prompts']} prompts)")
    ax.set_ylim(bottom=0)
    ax.legend()
    save_figure(fig, path)


class FeaturePatchingOptions(CorpusOptions):
    task = Option(str, "ioi", "a task with counterfactual prompts, or a JSONL file")
    n_prompts = Option(int, 40, "prompt pairs made; those whose counterfactual has another token length are left "
                                "out", min=1)
    prompts = Option(str, "train", "prompt set", choices=("train", "heldout"))
    candidates = Option(int, 48, "directions of each basis ranked and added (those moving the activation most)",
                        min=1)
    seed = Option(int, 0, "prompt sampling seed")
    tokens = Option(int, 20_000, "corpus tokens the PCA is fitted on", min=1)


class FeaturePatching(Analysis):
    name = "feature-patching"
    help = "patch features from counterfactual prompts: KL curve of dictionary features vs PCA directions"
    Options = FeaturePatchingOptions

    def run(self, *, model, dictionary, out_dir, options):
        attached = bind(model, dictionary)
        task, prompts = counterfactual_prompts(model, options)
        result = {"task": options.task, "model": model_id(model), "dictionary": dictionary.type_name,
                  **feature_patching(model, attached, task, prompts, pca_tokens=corpus_of(model, options),
                                     n_candidates=options.candidates)}
        plot_curves(result, out_dir / "feature-patching.png")
        result["plot"] = "feature-patching.png"
        return result
