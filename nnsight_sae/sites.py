"""Site names and the per-family architecture maps they resolve through.

A site string is ``KIND.LAYER`` (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_z``,
``attn_out``, ``head_out``, ``mlp_in``, ``mlp_post``, ``mlp_out``) or a raw ``module:PATH``
(the module's output) / ``module:PATH:input``, PATH as in ``named_modules()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SiteError, UnknownFamilyError
from .plugins import registry
from .traced import Site

SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_z", "attn_out", "head_out", "mlp_in", "mlp_post",
              "mlp_out")
_SITE_RE = re.compile(r"^(?P<kind>[a-z_]+)\.(?P<layer>-?\d+)$")


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the named sites live in one model family.

    Per-layer locations are ``"PATH:input"`` or ``"PATH:output"`` with PATH
    relative to the layer module (empty PATH = the layer itself). ``o_proj`` is
    the attention output projection whose input and weight give ``head_out``;
    ``mlp`` is the module a transcoder replaces (None if the family has no single
    MLP module). Model-level paths are relative to the root module. The rest is what
    weights-based analyses read: the norms before attention and the MLP, the value
    projection (None where it is fused with the query and key), the kind of norm,
    and whether the residual stream is not the plain sequential sum of pre-norm blocks
    (parallel attention and MLP, or norms after the blocks).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    resid_pre: str
    resid_post: str
    attn_out: str
    mlp_in: str
    mlp_out: str
    o_proj: str
    mlp: str | None
    embed: str
    unembed: str
    final_norm: str | None = None
    resid_mid: str | None = None  # the residual between attention and MLP (None: parallel or post-norm blocks)
    mlp_post: str | None = None  # the MLP's hidden activation, after its non-linearity
    mlp_norm: str | None = None  # the norm before the MLP, relative to the layer (None: post-norm or unknown)
    attn_norm: str | None = None  # the norm before attention, relative to the layer
    v_proj: str | None = None  # the attention's value projection, relative to the layer
    o_proj_layout: str = "linear"  # "linear" (d_out, d_in) or "conv1d" (d_in, d_out)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    parallel_residual: bool = False  # attention and MLP read the same residual (GPT-NeoX)
    post_norms: bool = False  # block outputs normed again before the residual add (Gemma 2/3, BERT)
    help: str = ""


def torch_module(model):
    """The plain torch module behind an nnsight model (or the module itself)."""
    return getattr(model, "_module", model)


def model_type(model) -> str:
    config = getattr(torch_module(model), "config", None)
    return getattr(config, "model_type", None) or type(torch_module(model)).__name__


def architecture_of(model) -> ArchitectureMap:
    """The registered architecture map covering this model's family."""
    mt = model_type(model)
    maps = [e.obj for e in registry().architectures.values()]
    for arch in maps:
        if mt in arch.model_types:
            return arch
    families = ", ".join(sorted(t for a in maps for t in a.model_types)) or "none"
    raise UnknownFamilyError(
        f"model family {mt!r} has no architecture map (families: {families}); use a raw site "
        f"'module:PATH' or 'module:PATH:input' with PATH from named_modules(), or add a family "
        f"with a plugin implementing the nnsight_sae_architectures hook")


def submodule(root, path: str):
    """The torch submodule at a dotted path (SiteError if there is none)."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError as e:
        raise SiteError(f"no module {path!r} in {type(root).__name__}") from e


def envoy_at(model, path: str):
    """The envoy of a module path. Not ``model.get``: that reads a module named
    ``output`` or ``input`` (BERT has both) as the envoy's value properties."""
    full = join_path(model.path, path)
    for name, envoy in model.modules(names=True):
        if name == full:
            return envoy
    raise SiteError(f"no module {path!r} in the model")


def join_path(*parts: str) -> str:
    """Join dotted path parts, skipping empty ones."""
    return ".".join(p for p in parts if p)


def n_layers(model) -> int:
    return len(submodule(torch_module(model), architecture_of(model).layers))


def head_dim(model) -> int:
    """The width of one attention head."""
    config = torch_module(model).config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def n_kv_heads(model) -> int:
    """Key/value heads (fewer than query heads under grouped-query attention)."""
    config = torch_module(model).config
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _width(module, io: str):
    """The activation width of a raw site where the module declares it (Linear, or GPT-2's
    Conv1D: nx in, nf out), else None."""
    return getattr(module, "in_features" if io == "input" else "out_features",
                   getattr(module, "nx" if io == "input" else "nf", None))


def resolve_site(model, site: str) -> Site:
    """Resolve a site string against an nnsight model; raises SiteError or UnknownFamilyError."""
    if not isinstance(site, str):
        raise SiteError(f"a site is a string like 'resid_post.6', not {site!r}")
    root = torch_module(model)
    if site.startswith("module:"):
        path, _, io = site[len("module:"):].partition(":")
        io = io or "output"
        if io not in ("input", "output") or not path:
            raise SiteError(f"raw site {site!r}: expected 'module:PATH' or 'module:PATH:input'")
        module = submodule(root, path)
        return Site(site, envoy_at(model, path), io, d_in=_width(module, io))

    m = _SITE_RE.match(site)
    if not m or m["kind"] not in SITE_KINDS:
        raise SiteError(f"malformed site {site!r}: expected KIND.LAYER with KIND one of "
                        f"{', '.join(SITE_KINDS)} (e.g. 'resid_post.6'), or 'module:PATH[:input]'")
    kind, layer = m["kind"], int(m["layer"])
    arch = architecture_of(model)
    count = len(submodule(root, arch.layers))
    if not 0 <= layer < count:
        raise SiteError(f"site {site!r}: layer {layer} out of range; this model has layers 0..{count - 1}")
    layer_path = join_path(arch.layers, str(layer))
    config = root.config
    d_model = config.hidden_size
    if kind == "head_out":
        path = join_path(layer_path, arch.o_proj)
        return Site(site, envoy_at(model, path), "input", layer=layer, d_in=d_model,
                    n_heads=config.num_attention_heads, weight_layout=arch.o_proj_layout)
    location = f"{arch.o_proj}:input" if kind == "attn_z" else getattr(arch, kind)
    if location is None:
        raise SiteError(f"site {site!r}: the {arch.name} family has no {kind} (see its architecture map)")
    rel_path, io = location.rsplit(":", 1)
    path = join_path(layer_path, rel_path)
    module = submodule(root, path)
    width = _width(module, io) if kind in ("attn_z", "mlp_post") else d_model
    return Site(site, envoy_at(model, path), io, layer=layer, d_in=width)


def site_layer(site: str) -> int | None:
    """The layer number of a named site, None for raw sites."""
    m = _SITE_RE.match(site)
    return int(m["layer"]) if m else None
