"""First-party feature analyses (Cunningham et al. 2023): feature patching against PCA,
causal trees, feature reports; de-embeddings and the transcoder-vs-SAE sparsity sweep
(Dunefsky et al. 2024). Each works with any dictionary on any supported model."""

from __future__ import annotations

import hashlib
import json

import torch

from nnsight_sae import Analysis, hookimpl
from nnsight_sae.models import model_id

from .common import FeatureError, bind, check_features, check_positive, corpus_tokens


def _add_corpus(parser, tokens: int, ctx_len: int) -> None:
    parser.add_argument("--tokens", type=int, default=tokens, help="corpus tokens to read")
    parser.add_argument("--ctx-len", type=int, default=ctx_len, help="tokens per corpus context")
    parser.add_argument("--data", help="local .txt/.jsonl/.parquet corpus (default: the embedded stdlib corpus)")


def _add_features(parser) -> None:
    from nnsight_sae.cli import _csv

    parser.add_argument("--features", type=_csv(int), required=True, help="comma-separated feature indices")


def _corpus(model, options):
    """The corpus contexts the options from ``_add_corpus`` ask for."""
    return corpus_tokens(model, n_tokens=options["tokens"], ctx_len=options["ctx_len"], data=options["data"])


class FeaturePatching(Analysis):
    name = "feature-patching"
    help = "patch features from counterfactual prompts: KL curve of dictionary features vs PCA directions"

    def add_arguments(self, parser):
        parser.add_argument("--task", default="ioi", help="a task with counterfactual prompts, or a JSONL file")
        parser.add_argument("--n-prompts", type=int, default=40,
                            help="prompt pairs made; those whose counterfactual has another token length are left out")
        parser.add_argument("--prompts", default="train", choices=["train", "heldout"], help="prompt set")
        parser.add_argument("--candidates", type=int, default=48,
                            help="directions of each basis ranked and added (those moving the activation most)")
        parser.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
        _add_corpus(parser, 20_000, 128)

    def run(self, *, model, dictionary, out_dir, options):
        from nnsight_sae.circuits import get_task

        from .patching import feature_patching, plot_curves

        attached = bind(model, dictionary)
        n_candidates = check_positive("--candidates", options["candidates"])
        task_name = options["task"]
        task = get_task(task_name)
        prompts = task.prompts(model.tokenizer, check_positive("--n-prompts", options["n_prompts"]),
                               seed=options["seed"], split=options["prompts"])
        usable = [i for i, cf in enumerate(prompts.counterfactual) if cf is not None]
        if not usable:
            raise FeatureError(f"task {task_name!r} has no counterfactual prompts; use ioi or greater-than, or "
                               f"a task file with a \"counterfactual\" on every line")
        prompts = prompts.subset(usable)  # pairs whose counterfactual has the prompt's token length
        pca_tokens = _corpus(model, options)
        result = {"task": task_name, "model": model_id(model), "dictionary": dictionary.type_name,
                  **feature_patching(model, attached, task, prompts, pca_tokens=pca_tokens,
                                     n_candidates=n_candidates)}
        plot_curves(result, out_dir / "feature-patching.png")
        result["plot"] = "feature-patching.png"
        return result


class CausalTree(Analysis):
    name = "causal-tree"
    help = "a feature's causal tree: upstream features ranked by the drop when each is ablated"

    def add_arguments(self, parser):
        parser.add_argument("--feature", type=int, required=True, help="the target feature")
        parser.add_argument("--upstream", action="append", default=[], metavar="DIR",
                            help="dictionary one level up (repeat for deeper levels, nearest first); "
                                 "missing levels: same type and width one layer earlier, found or trained")
        parser.add_argument("--depth", type=int, default=1, help="levels of upstream features")
        parser.add_argument("--width", type=int, default=3, help="children per node")
        parser.add_argument("--contexts", type=int, default=20, help="contexts sampled per node")
        parser.add_argument("--candidates", type=int, default=256,
                            help="upstream features ablated per node (the most active; 0 = every active one)")
        parser.add_argument("--seed", type=int, default=0, help="context sampling seed")
        _add_corpus(parser, 32_768, 64)

    def run(self, *, model, dictionary, out_dir, options):
        from nnsight_sae.files import load_dictionary

        from .tree import causal_tree, check_chain, plot_tree

        feature = check_features(dictionary, [options["feature"]])[0]
        depth = check_positive("--depth", options["depth"])
        width = check_positive("--width", options["width"])
        n_contexts = check_positive("--contexts", options["contexts"])
        chain = [bind(model, dictionary)]
        upstream = [load_dictionary(path) for path in options["upstream"]][:depth]
        made = []
        while len(upstream) < depth:
            d, how = default_upstream(model, upstream[-1] if upstream else dictionary)
            upstream.append(d)
            made.append(how)
        chain += [bind(model, d) for d in upstream]
        check_chain(chain)
        tokens = _corpus(model, options)
        tree = causal_tree(model, chain, feature, tokens, depth=depth, width=width, n_contexts=n_contexts,
                           candidates=options["candidates"], seed=options["seed"])
        plot_tree(tree, out_dir / "causal-tree.png")
        return {"model": model_id(model), "dictionary": dictionary.type_name, "depth": depth, "width": width,
                "corpus_tokens": int(tokens.numel()), "upstream_made": made, "plot": "causal-tree.png",
                "tree": tree}


def default_upstream(model, dictionary):
    """A dictionary of the same type, width and settings one layer before ``dictionary``'s
    site: found in the cache if made before, else trained on 100k corpus tokens (a minute or
    two on a CPU). Returns it and a line saying which, also printed."""
    from nnsight_sae.files import load_dictionary
    from nnsight_sae.models import cache_dir
    from nnsight_sae.pipeline import DataSpec, RunSpec, train_and_evaluate
    from nnsight_sae.plugins import registry
    from nnsight_sae.sites import site_layer

    layer = site_layer(dictionary.site)
    if layer is None or layer < 1:
        raise FeatureError(f"no layer before {dictionary.site}: pass --upstream DIR with a dictionary at an "
                           f"earlier site")
    kind = dictionary.site.split(".")[0]
    site = f"{kind}.{layer - 1}"
    cls = registry().get("dictionary_types", dictionary.type_name)
    hyper = {k: dictionary.cfg[k] for k in cls.defaults if k in dictionary.cfg}
    settings = hashlib.sha1(json.dumps(hyper, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{dictionary.type_name}-{site}-{dictionary.d_sae}-{settings}"
    folder = cache_dir() / "dictionaries" / model_id(model) / name
    if (folder / "sae_weights.safetensors").exists():
        how = f"upstream {site}: found {folder}"
    else:
        print(f"no dictionary given for {site}: training {name} on 100k corpus tokens into {folder} ...")
        train_and_evaluate(model, DataSpec(tokens=100_000, eval_tokens=4096),
                           RunSpec(types=[dictionary.type_name], sites=[site], d_sae=[dictionary.d_sae], hyper=hyper,
                                   epochs=2), {"lr": 4e-4}, folder)
        how = f"upstream {site}: trained {folder}"
    print(how)
    return load_dictionary(folder), how


class FeatureReport(Analysis):
    name = "feature-report"
    help = "case studies: top contexts, activation histogram, logits moved; an HTML page and JSON"

    def add_arguments(self, parser):
        _add_features(parser)
        parser.add_argument("--contexts", type=int, default=10, help="top contexts shown per feature")
        _add_corpus(parser, 65_536, 128)

    def run(self, *, model, dictionary, out_dir, options):
        from nnsight_sae.analysis import write_text

        from .report import feature_report, render_html

        features = check_features(dictionary, options["features"])
        attached = bind(model, dictionary)
        tokens = _corpus(model, options)
        report = {"model": model_id(model), "dictionary": dictionary.type_name, "site": dictionary.site,
                  "corpus_tokens": int(tokens.numel()),
                  **feature_report(model, attached, tokens, features,
                                   n_contexts=check_positive("--contexts", options["contexts"]))}
        write_text(out_dir / "feature-report.html", render_html(report))
        report["page"] = "feature-report.html"
        return report


class DeEmbed(Analysis):
    name = "de-embed"
    help = "the vocabulary tokens that most excite a feature with no context (embedding x encoder)"

    def add_arguments(self, parser):
        _add_features(parser)
        parser.add_argument("--top", type=int, default=20, help="tokens listed per feature, each end")
        parser.add_argument("--head", help="LAYER.HEAD: read the embeddings through this attention head's OV circuit")

    def run(self, *, model, dictionary, out_dir, options):
        from .deembed import de_embedding
        from .report import top_tokens

        features = check_features(dictionary, options["features"])
        bind(model, dictionary)
        head = _parse_head(options.get("head"))
        scores = de_embedding(model, dictionary, features, head=head, chunk=1024 if head else 8192)
        k = min(check_positive("--top", options["top"]), scores.shape[1])
        return {"model": model_id(model), "dictionary": dictionary.type_name, "site": dictionary.site,
                "head": list(head) if head else None,
                "features": [{"feature": f, **top_tokens(model.tokenizer, row, k)} for f, row in zip(features, scores)]}


def _parse_head(text):
    if text is None or isinstance(text, (tuple, list)):
        return tuple(text) if text else None
    try:
        layer, head = (int(v) for v in str(text).split("."))
    except ValueError:
        raise FeatureError(f"--head takes LAYER.HEAD, e.g. 3.5; got {text!r}") from None
    return layer, head


class TranscoderVsSae(Analysis):
    name = "tc-vs-sae"
    help = ("sparsity sweep at the dictionary's layer: transcoders (MLP replaced) vs SAEs on the MLP output, "
            "CE against L0, Pareto plot")

    def add_arguments(self, parser):
        from nnsight_sae.cli import _csv

        parser.add_argument("--l1", type=_csv(float), default=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
                            help="sparsity penalties, one transcoder and one SAE each")
        parser.add_argument("--d-sae", type=int, help="width of every dictionary (default: the given one's)")
        parser.add_argument("--epochs", type=int, default=1, help="passes over the training tokens")
        parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for each CE")
        _add_corpus(parser, 100_000, 128)

    def run(self, *, model, dictionary, out_dir, options):
        from nnsight_sae.pipeline import DataSpec
        from nnsight_sae.sites import site_layer

        from .sweep import matched_l0, plot_pareto, sweep

        layer = site_layer(dictionary.site)
        if layer is None or not dictionary.site.startswith(("mlp_in.", "mlp_out.")):
            raise FeatureError(f"tc-vs-sae compares dictionaries on one MLP: give a transcoder or an SAE at "
                               f"mlp_in.L / mlp_out.L, not one at {dictionary.site}")
        bind(model, dictionary)
        penalties = options["l1"]
        if not penalties or any(p <= 0 for p in penalties):
            raise FeatureError(f"--l1 needs positive penalties, got {penalties}")
        for name in ("tokens", "epochs", "eval_tokens"):
            check_positive(f"--{name.replace('_', '-')}", options[name])
        data = DataSpec(data=options["data"], tokens=options["tokens"], ctx_len=options["ctx_len"],
                        eval_tokens=options["eval_tokens"])
        d_sae = check_positive("--d-sae", options["d_sae"] or dictionary.d_sae)
        points = sweep(model, layer, sorted(penalties), d_sae=d_sae, data=data, epochs=options["epochs"],
                       out=out_dir / "dictionaries")
        matched = matched_l0(points)
        plot_pareto(points, out_dir / "tc-vs-sae.png", title=f"{model_id(model)}, MLP {layer}, d_sae {d_sae}")
        return {"model": model_id(model), "layer": layer, "d_sae": d_sae, "tokens": options["tokens"],
                "epochs": options["epochs"], "points": points, "matched_l0": matched,
                "mean_difference_at_matched_l0": (sum(m["difference"] for m in matched) / len(matched)
                                                  if matched else None)}


class TranscoderAttribution(Analysis):
    name = "tc-attribution"
    help = ("weights-based attribution through transcoders: what feeds a transcoder feature or a token's logit "
            "on a prompt, through the residual stream and heads' OV circuits; path search, graph")

    def add_arguments(self, parser):
        parser.add_argument("--prompt", required=True, help="the prompt; the target is at its last token")
        parser.add_argument("--feature", type=int, help="target: this feature of --dict (a transcoder)")
        parser.add_argument("--target-token", help="target: this token's logit (one token of text)")
        parser.add_argument("--upstream", action="append", default=[], metavar="DIR",
                            help="a transcoder at another layer, whose MLP is split into its features (repeat)")
        parser.add_argument("--depth", type=int, default=3, help="steps of the path search (a head is a step)")
        parser.add_argument("--width", type=int, default=4, help="parts kept per node, by |contribution|")

    def run(self, *, model, dictionary, out_dir, options):
        from nnsight_sae.files import load_dictionary
        from nnsight_sae.sites import site_layer

        from .tcattr import (attribute, capture, check_active, check_transcoders, one_token, plot_attribution,
                             target_node, tree_json, unembedding)

        feature, text = options["feature"], options["target_token"]
        if (feature is None) == (text is None):
            raise FeatureError("give one target: --feature N (a feature of --dict) or --target-token TEXT")
        if feature is not None:
            feature = check_features(dictionary, [feature])[0]
        depth = check_positive("--depth", options["depth"])
        width = check_positive("--width", options["width"])
        if not options["prompt"]:
            raise FeatureError("--prompt is empty")
        chain = check_transcoders(model, dictionary, [load_dictionary(p) for p in options["upstream"]],
                                  feature_target=feature is not None)
        tokenizer = model.tokenizer
        token = None if text is None else one_token(tokenizer, text)
        ids = tokenizer(options["prompt"])["input_ids"]
        cap = capture(model, ids, chain)
        layer = site_layer(dictionary.site)
        if feature is not None:
            check_active(cap, layer, feature, tokenizer)
            root = target_node(cap, layer=layer, feature=feature)
            target = {"feature": feature, "site": dictionary.site}
        else:
            unembed = unembedding(model)
            weights = torch.zeros(len(unembed))
            weights[token] = 1.0
            root = target_node(cap, logit_weights=weights, unembed=unembed, text=text)
            target = {"token": text, "token_id": token}
        checks = attribute(cap, root, depth=depth, width=width)
        tokens = [tokenizer.decode([i]) for i in ids]
        tree = tree_json(root, tokens)
        plot_attribution(tree, out_dir / "tc-attribution.png",
                         title=f"{tree['label']}: {root.value:.3g} (edge: contribution to it)")
        return {"model": model_id(model), "prompt": options["prompt"], "tokens": tokens, "target": target,
                "value": root.value, "transcoders": [d.site for d in chain], "depth": depth, "width": width,
                **checks, "plot": "tc-attribution.png", "tree": tree}


@hookimpl
def nnsight_sae_analyses():
    return [FeaturePatching(), CausalTree(), FeatureReport(), DeEmbed(), TranscoderVsSae(), TranscoderAttribution()]
