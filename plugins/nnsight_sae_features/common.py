"""What the feature analyses share: checks on their input, corpus contexts and
feature activations read through a dictionary's site."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from nnsight_sae.attach import attach
from nnsight_sae.corpus import DEFAULT_CORPUS, EMBEDDED, contexts, load_corpus
from nnsight_sae.errors import NnsightSaeError
from nnsight_sae.models import model_id, trace_options
from nnsight_sae.options import Option, Options
from nnsight_sae.plots import pyplot, save_figure
from nnsight_sae.sites import architecture_of, resolve_site, site_layer
from nnsight_sae.tasks import get_task


class FeatureError(NnsightSaeError, ValueError):
    """Bad input to a feature analysis: a feature out of range, a dictionary made
    for another model, a feature that never fires, a zero depth or width."""


def bind(model, dictionary):
    """``attach`` after checking the dictionary was trained on this model, by the last part of
    its name (so "gpt2" matches "openai-community/gpt2", and a local folder its name);
    dictionaries that name no model pass."""
    trained_on = dictionary.cfg.model
    if trained_on and Path(str(trained_on)).name != Path(model_id(model)).name:
        raise FeatureError(f"the dictionary was trained on {trained_on!r}, not on {model_id(model)!r}; "
                           f"pass the model it was made for with --model")
    return attach(model, dictionary)


def check_features(dictionary, features) -> list[int]:
    """The feature indices as ints, each checked against the dictionary's width."""
    if not features or any(f is None for f in features):
        raise FeatureError("no feature given (--feature N, or --features A,B for a report)")
    features = [int(f) for f in features]
    for f in features:
        if not 0 <= f < dictionary.d_sae:
            raise FeatureError(f"feature {f} is out of range: this dictionary has features 0..{dictionary.d_sae - 1}")
    return features


class CorpusOptions(Options):
    """The corpus an analysis reads (subclasses set their own default sizes)."""

    tokens = Option(int, 32_768, "corpus tokens to read", min=1)
    ctx_len = Option(int, 128, "tokens per corpus context", min=2)
    corpus = Option(str, None, f"embedded corpus (default when no --data: {DEFAULT_CORPUS})", choices=EMBEDDED)
    data = Option(str, None, "local .txt/.jsonl/.parquet corpus instead of an embedded one")


FEATURES = Option(int, help="comma-separated feature indices", many=True, min=0)


def counterfactual_prompts(model, options):
    """The task ``options.task`` and its prompt pairs (``n_prompts``, ``seed``, ``prompts`` split)
    that have a counterfactual of the prompt's token length; FeatureError if none has."""
    task = get_task(options.task)
    prompts = task.prompts(model.tokenizer, options.n_prompts, seed=options.seed, split=options.prompts)
    usable = [i for i, cf in enumerate(prompts.counterfactual) if cf is not None]
    if not usable:
        raise FeatureError(f"task {options.task!r} has no counterfactual prompts; use ioi or greater-than, or "
                           f"a task file with a \"counterfactual\" on every line")
    return task, prompts.subset(usable)


def text_of(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def top_tokens(tokenizer, values: torch.Tensor, k: int) -> dict:
    """The k tokens with the largest values (raised) and the k with the smallest (lowered)."""
    up, down = values.topk(k), (-values).topk(k)
    return {"raised": [{"token": text_of(tokenizer, i), "value": round(float(v), 4)}
                       for v, i in zip(up.values, up.indices.tolist())],
            "lowered": [{"token": text_of(tokenizer, i), "value": round(-float(v), 4)}
                        for v, i in zip(down.values, down.indices.tolist())]}



def corpus_tokens(model, *, n_tokens: int, ctx_len: int, corpus: str | None = None,
                  data: str | None = None) -> torch.Tensor:
    """(n, ctx_len) contexts from an embedded corpus or, if ``data`` names one, a local file."""
    return contexts(load_corpus(corpus=corpus, data=data), model.tokenizer, ctx_len, n_tokens)


def corpus_of(model, options: CorpusOptions) -> torch.Tensor:
    """The corpus contexts a ``CorpusOptions`` asks for."""
    return corpus_tokens(model, n_tokens=options.tokens, ctx_len=options.ctx_len, corpus=options.corpus,
                         data=options.data)


@torch.no_grad()
def feature_activations(model, attached, tokens: torch.Tensor, features: list[int], *, batch_size: int = 16,
                        desc: str = "features") -> torch.Tensor:
    """(n, ctx_len, len(features)) activations of the given features on each token; the
    forward stops at the dictionary's site. The first position (BOS / attention sink) is 0."""
    index = torch.tensor(features)
    out = []
    for start in tqdm(range(0, len(tokens), batch_size), desc=desc, leave=False):
        ids = tokens[start:start + batch_size]
        with model.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, **trace_options(model)) as tracer:
            x = attached.site.read().save()
            tracer.stop()
        acts = attached.dictionary.encode(x)[..., index.to(x.device)].float().cpu()
        acts[:, 0] = 0
        out.append(acts)
    return torch.cat(out)


@torch.no_grad()
def run_with_additions(model, enc: dict, site, make_delta, n_sets: int, read, *, batch_size: int = 256,
                       stop: bool = False, skip=None, desc: str = "", last_position: bool = False
                       ) -> list[torch.Tensor]:
    """For k in range(n_sets): run the prompts with ``make_delta(k)`` (n, p, d) added to the
    site's activation and return ``read(repeats)`` (called inside the trace, after the write,
    with the batch holding the prompts ``repeats`` times) on CPU, split per set.
    Several sets share one forward pass (the prompts repeated once per set); stop=True ends
    the forward pass after the read; skip from ``clean_prefix`` starts it at the site's layer;
    last_position=True computes logits at the last position only."""
    n = len(enc["input_ids"])
    per_pass = max(1, batch_size // n)
    out = []
    for start in tqdm(range(0, n_sets, per_pass), desc=desc, leave=False, disable=not desc):
        ks = range(start, min(n_sets, start + per_pass))
        batch = {key: value.repeat(len(ks), 1) for key, value in enc.items()}
        delta = torch.cat([make_delta(k) for k in ks])
        with model.trace(batch, **trace_options(model, last_position=last_position)) as tracer:
            if skip is not None:
                layers, before = skip
                for layer in layers:  # only the last one's output is read downstream
                    layer.envoy.skip(before.repeat(len(ks), 1, 1))
            x = site.read()
            site.write(x + delta.to(x.device, x.dtype))
            value = read(len(ks)).save()
            if stop:
                tracer.stop()
        out.extend(value.float().cpu().reshape(len(ks), n, *value.shape[1:]).unbind(0))
    return out


def prefix_batch(tokens: torch.Tensor, rows: list[int], positions: list[int], pad_id: int) -> dict:
    """Contexts ``tokens[r, :p + 1]`` padded on the right into one batch: each keeps the
    positions (and so the activations) it has in the full context."""
    ids = torch.full((len(rows), max(positions) + 1), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (r, p) in enumerate(zip(rows, positions)):
        ids[i, :p + 1] = tokens[r, :p + 1]
        mask[i, :p + 1] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def site_codes(model, attached, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature activations (n, p, d_sae) on real positions (0 on padding) and decoder
    directions (d_sae, d_out), both on CPU in float32; the forward stops at the site."""
    with model.trace(enc, **trace_options(model)) as tracer:
        x = attached.site.read().save()
        tracer.stop()
    directions = attached.dictionary.decoder_directions().detach()
    codes = attached.dictionary.encode(x.to(directions.device, directions.dtype)).float().cpu()
    return codes * enc["attention_mask"][..., None], directions.float().cpu()


def ablation_deltas(attached, codes: torch.Tensor, directions: torch.Tensor, features: list[int | None]):
    """make_delta for ``run_with_additions`` and the site to add it at: set k removes
    feature ``features[k]``'s decoder contribution everywhere (None: the clean run).
    A transcoder's features are removed where its output goes."""
    def make_delta(k):
        j = features[k]
        if j is None:
            return torch.zeros(*codes.shape[:2], directions.shape[1])
        return -codes[..., j, None] * directions[j]

    return make_delta, attached.out_site or attached.site


@torch.no_grad()
def clean_prefix(model, site, enc: dict):
    """``skip`` for ``run_with_additions``: the layers before the site's layer and their clean
    output on these prompts, so patched passes replay it instead of recomputing it (changes at
    the site cannot reach earlier layers). None where that cannot be done (a raw site, layer 0,
    or a family whose ``resid_post`` is not a layer's output)."""
    layer = site_layer(site.name)
    if not layer or architecture_of(model).resid_post != ":output":
        return None
    layers = [resolve_site(model, f"resid_post.{i}") for i in range(layer)]
    with model.trace(enc, **trace_options(model)) as tracer:
        before = layers[-1].read().save()
        tracer.stop()
    return layers, before


def draw_tree(tree: dict, path, *, box, edge, title: str) -> None:
    """A tree of dicts (each with optional "children") as boxes joined by edges, root on top;
    box(node) and edge(child) give the texts."""
    placed, edges, depth = [], [], [0]

    def place(n, level, next_x):
        depth[0] = max(depth[0], level)
        if n.get("children"):
            xs = []
            for child in n["children"]:
                next_x, x = place(child, level + 1, next_x)
                xs.append(x)
                edges.append((n, child))
            x = sum(xs) / len(xs)
        else:
            x, next_x = next_x, next_x + 1
        n["_xy"] = (x, -level)
        placed.append(n)
        return next_x, x

    n_leaves, _ = place(tree, 0, 0)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * n_leaves), 2.2 * (depth[0] + 1)))
    for parent, child in edges:
        (x0, y0), (x1, y1) = parent["_xy"], child["_xy"]
        ax.plot([x0, x1], [y0, y1], color="grey", zorder=1)
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, edge(child), fontsize=8, ha="center",
                bbox={"facecolor": "white", "edgecolor": "none"})
    for n in placed:
        x, y = n.pop("_xy")
        ax.text(x, y, box(n), ha="center", va="center", fontsize=8, zorder=2,
                bbox={"boxstyle": "round", "facecolor": "#fde9c8" if y == 0 else "#dceefb"})
    ax.set_xlim(-0.8, n_leaves - 0.2)
    ax.set_ylim(-depth[0] - 0.5, 0.5)
    ax.axis("off")
    ax.set_title(title)
    save_figure(fig, path)
