"""De-embeddings (Dunefsky et al. 2024): the vocabulary tokens that most excite a feature
with no context, i.e. the dictionary's encoder pre-activation on each token's embedding as
its site would see it at layer 0's direct path: the embedding itself for residual-stream
sites, the embedding through the MLP's input norm for ``mlp_in`` sites (transcoders).
Attention, positional embeddings and earlier layers are left out: a reading of the
encoder, not a prediction of activations in context.

``head=(L, h)`` reads the embeddings through attention head h of layer L instead: what the
head writes into the residual stream when it attends to the token alone (its OV circuit on the
layer's normed input; the attention pattern is 1 on a one-token input, so the model computes
it for us, in every family, whatever its value and output projections look like).
"""

from __future__ import annotations

import torch

from nnsight_sae.analysis import Analysis
from nnsight_sae.models import model_id, trace_options
from nnsight_sae.options import Option, Options
from nnsight_sae.sites import architecture_of, join_path, resolve_site, site_layer, submodule, torch_module

from .common import FEATURES, FeatureError, bind, check_features, top_tokens


@torch.no_grad()
def through_head(model, x: torch.Tensor, head: tuple[int, int]) -> torch.Tensor:
    """(n, d): what head h of layer L writes when its layer's input is x (n, d) at a one-token
    position, so that it attends to x alone; earlier layers' output is replaced by x."""
    layer, h = head
    layer_input, heads = resolve_site(model, f"resid_pre.{layer}"), resolve_site(model, f"head_out.{layer}")
    if not 0 <= h < heads.n_heads:
        raise FeatureError(f"head {h} is out of range: layer {layer} has heads 0..{heads.n_heads - 1}")
    ids = torch.zeros(len(x), 1, dtype=torch.long)  # any token: the layer's input is replaced
    with model.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, **trace_options(model)) as tracer:
        before = layer_input.read()
        layer_input.write(x[:, None, :].to(before.device, before.dtype))
        out = heads.read()[:, 0, h].save()
        tracer.stop()
    return out


def _check_head(site: str, head) -> None:
    kind, layer = site.split(".")[0], site_layer(site)
    if head is not None and (head[0] > layer or (head[0] == layer and kind == "resid_pre")):
        raise FeatureError(f"head {head[0]}.{head[1]} comes after {site}: its output cannot reach the site")


@torch.no_grad()
def de_embedding(model, dictionary, features: list[int], *, head: tuple[int, int] | None = None,
                 chunk: int = 8192) -> torch.Tensor:
    """(len(features), vocab): each feature's encoder pre-activation on every token's embedding
    (through attention head ``head`` = (layer, head) when given)."""
    root = torch_module(model)
    arch = architecture_of(model)
    kind, layer = dictionary.site.split(".")[0], site_layer(dictionary.site)
    norm = None
    if kind == "mlp_in":
        if arch.mlp_norm is None:
            raise FeatureError(f"the {arch.name} map names no norm before the MLP, so {dictionary.site} has no "
                               f"de-embedding")
        norm = submodule(root, join_path(arch.layers, str(layer), arch.mlp_norm))
    elif kind not in ("resid_pre", "resid_post"):
        raise FeatureError(f"de-embeddings read the residual stream or an MLP's input; {dictionary.site} is neither")
    _check_head(dictionary.site, head)
    embed = submodule(root, arch.embed)
    weight = next(embed.parameters())
    d = dictionary.decoder_directions()  # for the dictionary's device and dtype
    index = torch.tensor(features, device=d.device)
    out = []
    for start in range(0, embed.num_embeddings, chunk):
        ids = torch.arange(start, min(start + chunk, embed.num_embeddings), device=weight.device)
        x = embed(ids)  # the module, so scaled embeddings (Gemma) come out as the model sees them
        if head is not None:
            x = through_head(model, x, head)
        if norm is not None:
            x = norm(x)
        out.append(dictionary.pre_acts(x.to(d.device, d.dtype))[:, index].float().cpu())
    return torch.cat(out).T


class DeEmbedOptions(Options):
    features = FEATURES
    top = Option(int, 20, "tokens listed per feature, each end", min=1)
    head = Option(str, None, "LAYER.HEAD: read the embeddings through this attention head's OV circuit",
                  metavar="LAYER.HEAD")

    def check(self):
        if self.head is not None:
            parse_head(self.head)


def parse_head(text: str) -> tuple[int, int]:
    """"L.H" -> (L, H)."""
    try:
        layer, head = (int(v) for v in str(text).split("."))
    except ValueError:
        raise FeatureError(f"--head takes LAYER.HEAD, e.g. 3.5; got {text!r}") from None
    return layer, head


class DeEmbed(Analysis):
    name = "de-embed"
    help = "the vocabulary tokens that most excite a feature with no context (embedding x encoder)"
    Options = DeEmbedOptions

    def run(self, *, model, dictionary, out_dir, options):
        features = check_features(dictionary, options.features)
        bind(model, dictionary)
        head = parse_head(options.head) if options.head else None
        scores = de_embedding(model, dictionary, features, head=head, chunk=1024 if head else 8192)
        k = min(options.top, scores.shape[1])
        return {"model": model_id(model), "dictionary": dictionary.type_name, "site": dictionary.site,
                "head": list(head) if head else None,
                "features": [{"feature": f, **top_tokens(model.tokenizer, row, k)} for f, row in zip(features, scores)]}
