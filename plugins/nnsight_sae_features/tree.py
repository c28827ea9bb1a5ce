"""Causal trees (Cunningham et al. 2023, section 5.2).

For a target feature, sample corpus contexts where it fires at between half and
all of its maximum, ablate each feature of a dictionary at an earlier site in
turn (x -> x - c_j d_j at every position, the error term kept), and rank them by
the mean drop of the target's activation at the sampled positions. The strongest
``width`` become the next level, each explained in turn by the next dictionary
upstream, down to ``depth`` levels.

Contexts are cut to end at the sampled position and padded on the right, so
each context's positions and activations are those of the full text. Many
ablations share one forward pass, which stops at the target's site.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import torch

from nnsight_sae.analysis import Analysis
from nnsight_sae.corpus import embedded_choice
from nnsight_sae.files import load_dictionary
from nnsight_sae.harvest import forward_order
from nnsight_sae.models import cache_dir, model_id
from nnsight_sae.options import Option
from nnsight_sae.pipeline import DataSpec, RunSpec, train_and_evaluate
from nnsight_sae.sites import site_layer

from .common import (CorpusOptions, FeatureError, ablation_deltas, bind, check_features, clean_prefix, corpus_of,
                     draw_tree, feature_activations, prefix_batch, run_with_additions, site_codes)


def firing_contexts(model, attached, tokens: torch.Tensor, feature: int, *, n_contexts: int = 20,
                    seed: int = 0) -> dict:
    """Up to ``n_contexts`` (context, position) pairs where the feature fires at >= half its
    max on these tokens, as right-padded inputs ending at the position."""
    acts = feature_activations(model, attached, tokens, [feature], desc=f"feature {feature}")[..., 0]
    top = float(acts.max())
    if top <= 0:
        raise FeatureError(f"feature {feature} of the dictionary at {attached.site.name} never fires on "
                           f"{tokens.numel():,} corpus tokens; pick one that does (see feature-report) or "
                           f"read more tokens with --tokens")
    rows, cols = (acts >= top / 2).nonzero(as_tuple=True)
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n_contexts, len(rows))))
    rows, cols = rows[picked], cols[picked]
    enc = prefix_batch(tokens, rows.tolist(), cols.tolist(), model.tokenizer.pad_token_id or 0)
    return {"enc": enc, "positions": cols, "max": top, "activations": acts[rows, cols]}


@torch.no_grad()
def ablation_drops(model, target, upstream, contexts: dict, feature: int, *, candidates: int = 256,
                   batch_size: int = 512):
    """Upstream features active in the contexts (the ``candidates`` largest by summed
    activation x decoder norm; 0 = all), the target's activation in each context, its drop
    in each context when each candidate is ablated alone, and the token where each candidate
    is strongest in the contexts."""
    enc, positions = contexts["enc"], contexts["positions"]
    codes, directions = site_codes(model, upstream, enc)
    weight = codes.sum((0, 1)) * directions.norm(dim=-1)
    active = int((weight > 0).sum())
    keep = weight.topk(active if candidates <= 0 else min(candidates, active)).indices.tolist()
    make_delta, write_site = ablation_deltas(upstream, codes, directions, [None] + keep)

    def read_target(repeats):
        return target.site.read()[torch.arange(len(positions) * repeats), positions.repeat(repeats)]

    rows = run_with_additions(model, enc, write_site, make_delta, len(keep) + 1, read_target,
                              batch_size=batch_size, stop=True, skip=clean_prefix(model, write_site, enc),
                              desc=f"ablating {len(keep)} features at {upstream.site.name}")
    d = target.dictionary
    dt = d.decoder_directions()
    acts = torch.stack([d.encode(r.to(dt.device, dt.dtype))[:, feature].float().cpu() for r in rows])
    flat = codes[..., keep].flatten(0, 1).argmax(0)  # each candidate's strongest position in the contexts
    strongest = enc["input_ids"].flatten()[flat].tolist()
    # clean (contexts,), drops (candidates, contexts), token ids
    return keep, acts[0], acts[0][None] - acts[1:], strongest


def _token_text(tokenizer, ids) -> str:
    return tokenizer.decode(ids).replace("\n", "\u21b5")


def causal_tree(model, chain: list, feature: int, tokens: torch.Tensor, *, depth: int, width: int,
                n_contexts: int = 20, candidates: int = 256, ranking: int = 10, seed: int = 0) -> dict:
    """The tree under ``feature`` of ``chain[0]``; ``chain[i + 1]`` explains level i (so
    ``len(chain) == depth + 1``). Each node lists its sampled contexts, the ``ranking``
    strongest upstream features by mean drop, and its ``width`` strongest as children."""
    tok = model.tokenizer

    def node(level, feat):
        target, upstream = chain[level], chain[level + 1]
        ctx = firing_contexts(model, target, tokens, feat, n_contexts=n_contexts, seed=seed)
        keep, clean, drops, strongest = ablation_drops(model, target, upstream, ctx, feat, candidates=candidates)
        mean = drops.mean(1)
        base = float(clean.mean())
        order = mean.argsort(descending=True).tolist()
        ids, positions = ctx["enc"]["input_ids"], ctx["positions"].tolist()
        at = [ids[i, p].item() for i, p in enumerate(positions)]
        out = {
            "feature": feat, "site": target.site.name, "max_activation": round(ctx["max"], 4),
            "mean_activation": round(base, 4),
            "top_tokens": [t for t, _ in Counter(_token_text(tok, [i]) for i in at).most_common(5)],
            "contexts": [{"text": _token_text(tok, ids[i, max(0, p - 11):p + 1].tolist()),
                          "token": _token_text(tok, [at[i]]), "activation": round(float(clean[i]), 4)}
                         for i, p in enumerate(positions)],
            "upstream_site": upstream.site.name, "n_ablated": len(keep),
            "ranking": [{"feature": keep[i], "drop": round(float(mean[i]), 4),
                         "drop_fraction": round(float(mean[i]) / base, 4),
                         "strongest_on": _token_text(tok, [strongest[i]])} for i in order[:ranking]],
            "children": [],
        }
        for entry in out["ranking"][:width]:
            child = {"site": upstream.site.name, **entry}
            if level + 1 < depth:
                child.update(node(level + 1, entry["feature"]))
            out["children"].append(child)
        return out

    return node(0, feature)


def check_chain(chain: list) -> None:
    """Each dictionary must read a site the forward pass reaches before the one it explains."""
    for target, upstream in zip(chain, chain[1:]):
        a, b = upstream.site.name, target.site.name
        if a == b or forward_order([a, b])[0] != a:
            raise FeatureError(f"an upstream dictionary must read a site before its target's: {a} is not "
                               f"before {b}")


def plot_tree(tree: dict, path) -> None:
    """The tree as boxes (site, feature, its commonest firing token) joined by edges labelled
    with the drop of the parent when the child is ablated."""
    def box(n):
        token = n["top_tokens"][0] if n.get("top_tokens") else n.get("strongest_on")
        return f"{n['site']}\n#{n['feature']}" + (f"\n{token!r}" if token is not None else "")

    draw_tree(tree, path, box=box, edge=lambda n: f"-{n['drop']:.2f} ({n['drop_fraction']:.0%})",
              title=f"causal tree of {tree['site']} feature {tree['feature']} (edge: mean drop when ablated)")


def default_upstream(model, dictionary, corpus: str | None = None):
    """A dictionary of the same type, width and settings one layer before ``dictionary``'s
    site: found in the cache if made before, else trained on 100k tokens of the embedded
    ``corpus`` (a minute or two on a CPU). Returns it and a line saying which, also printed."""
    corpus = embedded_choice(corpus)
    layer = site_layer(dictionary.site)
    if layer is None or layer < 1:
        raise FeatureError(f"no layer before {dictionary.site}: pass --upstream DIR with a dictionary at an "
                           f"earlier site")
    kind = dictionary.site.split(".")[0]
    site = f"{kind}.{layer - 1}"
    hyper = dictionary.cfg.hyper_parameters()
    settings = hashlib.sha1(json.dumps(hyper, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{dictionary.type_name}-{site}-{dictionary.d_sae}-{settings}-{corpus}"
    folder = cache_dir() / "dictionaries" / model_id(model) / name
    if (folder / "sae_weights.safetensors").exists():
        how = f"upstream {site}: found {folder}"
    else:
        print(f"no dictionary given for {site}: training {name} on 100k {corpus} tokens into {folder} ...")
        train_and_evaluate(model, DataSpec(corpus=corpus, tokens=100_000, eval_tokens=2048),
                           RunSpec(types=[dictionary.type_name], sites=[site], d_sae=[dictionary.d_sae], hyper=hyper,
                                   epochs=2), {"lr": 4e-4}, folder)
        how = f"upstream {site}: trained {folder}"
    print(how)
    return load_dictionary(folder), how


class CausalTreeOptions(CorpusOptions):
    feature = Option(int, help="the target feature", min=0)
    upstream = Option(str, [], "dictionary one level up (repeat for deeper levels, nearest first); missing levels: "
                               "same type and width one layer earlier, found or trained", repeat=True, metavar="DIR")
    depth = Option(int, 1, "levels of upstream features", min=1)
    width = Option(int, 3, "children per node", min=1)
    contexts = Option(int, 20, "contexts sampled per node", min=1)
    candidates = Option(int, 256, "upstream features ablated per node (the most active; 0 = every active one)", min=0)
    seed = Option(int, 0, "context sampling seed")
    ctx_len = Option(int, 64, "tokens per corpus context", min=2)


class CausalTree(Analysis):
    name = "causal-tree"
    help = "a feature's causal tree: upstream features ranked by the drop when each is ablated"
    Options = CausalTreeOptions

    def run(self, *, model, dictionary, out_dir, options):
        feature = check_features(dictionary, [options.feature])[0]
        depth = options.depth
        chain = [bind(model, dictionary)]
        upstream = [load_dictionary(path) for path in options.upstream][:depth]
        made = []
        while len(upstream) < depth:
            d, how = default_upstream(model, upstream[-1] if upstream else dictionary, options.corpus)
            upstream.append(d)
            made.append(how)
        chain += [bind(model, d) for d in upstream]
        check_chain(chain)
        tokens = corpus_of(model, options)
        tree = causal_tree(model, chain, feature, tokens, depth=depth, width=options.width,
                           n_contexts=options.contexts, candidates=options.candidates, seed=options.seed)
        plot_tree(tree, out_dir / "causal-tree.png")
        return {"model": model_id(model), "dictionary": dictionary.type_name, "depth": depth, "width": options.width,
                "corpus_tokens": int(tokens.numel()), "upstream_made": made, "plot": "causal-tree.png",
                "tree": tree}
