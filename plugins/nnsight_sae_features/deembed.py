"""De-embeddings (Dunefsky et al. 2024): the vocabulary tokens that most excite a feature
with no context, i.e. the dictionary's encoder pre-activation on each token's embedding as
its site would see it at layer 0's direct path: the embedding itself for residual-stream
sites, the embedding through the MLP's input norm for ``mlp_in`` sites (transcoders).
Attention, positional embeddings and earlier layers are left out: a reading of the
encoder, not a prediction of activations in context.
"""

from __future__ import annotations

import torch

from nnsight_sae.sites import architecture_of, join_path, site_layer, submodule, torch_module

from .common import FeatureError


@torch.no_grad()
def de_embedding(model, dictionary, features: list[int], *, chunk: int = 8192) -> torch.Tensor:
    """(len(features), vocab): each feature's encoder pre-activation on every token's embedding."""
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
    embed = submodule(root, arch.embed)
    weight = next(embed.parameters())
    index = torch.tensor(features)
    out = []
    for start in range(0, embed.num_embeddings, chunk):
        ids = torch.arange(start, min(start + chunk, embed.num_embeddings), device=weight.device)
        x = embed(ids)  # the module, so scaled embeddings (Gemma) come out as the model sees them
        if norm is not None:
            x = norm(x)
        d = dictionary.decoder_directions()
        out.append(dictionary.pre_acts(x.to(d.device, d.dtype))[:, index.to(d.device)].float().cpu())
    return torch.cat(out).T
