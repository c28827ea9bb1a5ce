"""Weights-based circuit attribution through transcoders (Dunefsky et al. 2024).

Hold every norm's scale at its value on the prompt (a constant, as the paper does) and every
attention pattern as the model computed it. Then the pre-activation of a transcoder feature
(or a token's logit) is exactly a sum of dot products ``u . c``: a read vector u (norm scale x
norm gain x the feature's encoder row, or the token's unembedding row) with each component c of
the residual stream at its position: the embedding, every earlier MLP's output (split by its
transcoder into features ``z_i d_i``, the decoder bias and the error term; an MLP with no
transcoder stays whole) and every earlier attention head's output. A head's output is in turn a
sum over the positions q it attends to of ``A[p, q] W_O W_V (scale x gain x components at q)``,
and a feature's pre-activation is a read of the residual stream before its MLP, so the
decomposition recurses, and at every step the parts add up (to float precision) to what they
decompose. Feature i's contribution to feature j through the residual stream is
``z_i (d_i . u_j)``: its activation times an input-invariant dot product; through a head it is
also weighted by the head's attention from j's position to i's.

``attribute`` runs a greedy path search from the target: each node is split into its parts,
the ``width`` largest by |contribution to the target| are kept, and features and heads among
them are split again, to ``depth`` steps (a head is a step). Every value in the graph is a
contribution to the target along its path.

Models whose architecture map says pre-norm RMSNorm, a sequential residual stream and a separate
value projection (the Llama family); others raise a clear error.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import nnsight
import torch

from nnsight_sae.analysis import Analysis
from nnsight_sae.files import load_dictionary
from nnsight_sae.models import model_id, trace_options
from nnsight_sae.options import Option, Options
from nnsight_sae.sites import (architecture_of, head_dim, join_path, n_kv_heads, n_layers, resolve_site, site_layer,
                               submodule, torch_module)

from .common import FeatureError, bind, check_features, draw_tree

EXPANDABLE = ("feature", "head")


@dataclass
class Node:
    """One part of the decomposition. ``value`` is its contribution to the target along the
    path from the root; ``kind`` is target, logit, feature, head, embedding, mlp (an MLP with no
    transcoder), error (a transcoder's), bias (``which`` says whose) or skip."""

    kind: str
    pos: int
    value: float
    layer: int | None = None
    index: int | None = None  # feature or head
    which: str | None = None
    read: torch.Tensor | None = None  # heads: the read vector applied to their output
    scale: float = 1.0  # features: d(target) / d(pre-activation) along the path
    children: list = field(default_factory=list)
    rest: float = 0.0  # the parts left out of children, summed


@dataclass
class _Layer:
    resid: torch.Tensor  # (n, d) the layer's input
    heads: torch.Tensor  # (n, H, d) each head's output
    attn_rest: torch.Tensor  # (n, d) attention output minus its heads (output bias)
    pattern: torch.Tensor  # (H, n, n)
    attn_scale: torch.Tensor  # (n,) the input norm's 1/rms
    attn_gain: torch.Tensor  # (d,)
    W_V: torch.Tensor  # (H, hd, d), each head's (shared) value rows
    W_O: torch.Tensor  # (H, d, hd)
    b_V: torch.Tensor | None  # (H, hd)
    mlp_in: torch.Tensor  # (n, d)
    mlp_out: torch.Tensor  # (n, d)
    mlp_scale: torch.Tensor  # (n,)
    mlp_gain: torch.Tensor  # (d,)


@dataclass
class _Transcoder:
    dictionary: object
    acts: torch.Tensor  # (n, d_sae)
    error: torch.Tensor  # (n, d): MLP output - prediction
    skip: torch.Tensor | None  # (n, d)


@dataclass
class Capture:
    """Everything the decomposition reads from one forward pass over the prompt, in float64."""

    ids: list[int]
    layers: list[_Layer]
    transcoders: dict[int, _Transcoder]
    final: torch.Tensor  # (n, d) the last layer's output
    final_scale: torch.Tensor
    final_gain: torch.Tensor
    logits: torch.Tensor  # (n, vocab)


def _check_family(model):
    arch = architecture_of(model)
    if (arch.norm != "rmsnorm" or arch.parallel_residual or arch.post_norms or None in (arch.attn_norm, arch.mlp_norm,
                                                                                        arch.v_proj, arch.final_norm)):
        raise FeatureError(f"tc-attribution decomposes pre-norm RMSNorm models with a sequential residual stream and "
                           f"separate value projections (the Llama family); {arch.name} is not one")
    if any(p.device.type == "meta" for p in torch_module(model).parameters()):
        raise FeatureError("tc-attribution reads the model's weights: load it with its weights in memory (not "
                           "remote, not offloaded)")
    return arch


@contextmanager
def _eager_attention(model):
    """Eager attention, whose modules return their attention pattern, for the block's length."""
    root = torch_module(model)
    before = root.config._attn_implementation
    root.set_attn_implementation("eager")
    try:
        yield
    finally:
        root.set_attn_implementation(before)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().cpu()


def _rms_scale(norm, x):
    return torch.rsqrt(x.pow(2).mean(-1) + norm.variance_epsilon)


@torch.no_grad()
def capture(model, ids: list[int], transcoders: list) -> Capture:
    """Run the prompt once and keep what the decomposition reads (``transcoders``: dictionaries
    with an ``out_site``, each replacing the MLP of its layer in the decomposition)."""
    arch = _check_family(model)
    root = torch_module(model)
    count = n_layers(model)
    sites = [[resolve_site(model, f"{kind}.{layer}") for kind in ("resid_pre", "head_out", "attn_out", "mlp_in",
                                                                   "mlp_out")] for layer in range(count)]
    last = resolve_site(model, f"resid_post.{count - 1}")
    batch = torch.tensor([ids])
    with _eager_attention(model):
        with model.trace({"input_ids": batch, "attention_mask": torch.ones_like(batch)}, **trace_options(model)):
            saved = nnsight.save([])
            for resid_pre, head_out, attn_out, mlp_in, mlp_out in sites:
                saved.append([resid_pre.read()[0], head_out.read()[0], attn_out.read()[0],
                              attn_out.envoy.output[1][0], mlp_in.read()[0], mlp_out.read()[0]])
            final = last.read()[0].save()
            logits = model.output.logits[0].save()
    f64 = [[_f64(t) for t in row] for row in saved]
    hd, kv_heads = head_dim(model), n_kv_heads(model)
    layers = []
    for layer, (resid, heads, attn, pattern, mlp_in, mlp_out) in enumerate(f64):
        block = submodule(root, join_path(arch.layers, str(layer)))
        v_proj, o_proj = submodule(block, arch.v_proj), submodule(block, arch.o_proj)
        attn_norm, mlp_norm = submodule(block, arch.attn_norm), submodule(block, arch.mlp_norm)
        n_heads = heads.shape[1]
        group = torch.arange(n_heads) // (n_heads // kv_heads)
        W_V = _f64(v_proj.weight).view(-1, hd, resid.shape[-1])[group]
        W_O = _f64(o_proj.weight).view(resid.shape[-1], n_heads, hd).permute(1, 0, 2)
        b_V = None if v_proj.bias is None else _f64(v_proj.bias).view(-1, hd)[group]
        resid_mid = resid + attn
        layers.append(_Layer(
            resid=resid, heads=heads, attn_rest=attn - heads.sum(1), pattern=pattern,
            attn_scale=_rms_scale(attn_norm, resid), attn_gain=_f64(attn_norm.weight), W_V=W_V, W_O=W_O, b_V=b_V,
            mlp_in=mlp_in, mlp_out=mlp_out, mlp_scale=_rms_scale(mlp_norm, resid_mid),
            mlp_gain=_f64(mlp_norm.weight)))
    final_norm = submodule(root, arch.final_norm)
    final = _f64(final)
    cap = Capture(ids=list(ids), layers=layers, transcoders={}, final=final,
                  final_scale=_rms_scale(final_norm, final),
                  final_gain=_f64(final_norm.weight), logits=_f64(logits))
    for d in transcoders:
        layer = int(d.site.split(".")[1])
        x = layers[layer].mlp_in.to(d.W_enc.device, d.W_enc.dtype)
        acts = d.encode(x)
        skip = d.skip_term(x)
        prediction = d.decode(acts) + skip
        cap.transcoders[layer] = _Transcoder(
            d, _f64(acts), layers[layer].mlp_out - _f64(prediction), None if isinstance(skip, int) else _f64(skip))
    _check_capture(cap)
    return cap


def _check_capture(cap: Capture) -> None:
    """The assumptions the decomposition rests on, checked on this prompt: the residual stream
    is the sum of its parts, and the heads' outputs are their patterns times W_O W_V of the
    normed input."""
    for layer, (this, after) in enumerate(zip(cap.layers, cap.layers[1:] + [None])):
        nxt = cap.final if after is None else after.resid
        _close(this.resid + this.heads.sum(1) + this.attn_rest + this.mlp_out, nxt,
               f"layer {layer}'s output is not its input plus its attention and MLP outputs")
        values = torch.einsum("hkd,nd->hnk", this.W_V, this.attn_scale[:, None] * this.attn_gain * this.resid)
        if this.b_V is not None:
            values = values + this.b_V[:, None, :]
        heads = torch.einsum("hdk,hpk->phd", this.W_O, this.pattern @ values)
        _close(heads, this.heads, f"layer {layer}'s heads are not their attention pattern times W_O W_V")


def _close(a, b, what):
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    if err > 1e-3:
        raise FeatureError(f"tc-attribution cannot decompose this model: {what} (relative error {err:.1e})")


def residual_parts(cap: Capture, u: torch.Tensor, pos: int, *, attn_upto: int, mlp_upto: int,
                   scale: float) -> list[Node]:
    """u . c for every component c of the residual stream at ``pos`` that attention layers
    before ``attn_upto`` and MLPs before ``mlp_upto`` wrote, each times ``scale``."""
    parts = [Node("embedding", pos, scale * float(u @ cap.layers[0].resid[pos]))]
    for layer in range(mlp_upto):
        L, tc = cap.layers[layer], cap.transcoders.get(layer)
        if tc is None:
            parts.append(Node("mlp", pos, scale * float(u @ L.mlp_out[pos]), layer=layer))
            continue
        z = tc.acts[pos]
        active = z.nonzero().flatten()
        through = _f64(tc.dictionary.W_dec[active]) @ u  # d_i . u
        parts += [Node("feature", pos, scale * zi * wi, layer=layer, index=i, scale=scale * wi)
                  for i, zi, wi in zip(active.tolist(), z[active].tolist(), through.tolist())]
        parts.append(Node("bias", pos, scale * float(u @ _f64(tc.dictionary.b_dec)), layer=layer,
                          which="transcoder decoder"))
        parts.append(Node("error", pos, scale * float(u @ tc.error[pos]), layer=layer))
        if tc.skip is not None:
            parts.append(Node("skip", pos, scale * float(u @ tc.skip[pos]), layer=layer))
    for layer in range(attn_upto):
        L = cap.layers[layer]
        parts += [Node("head", pos, scale * v, layer=layer, index=h, read=u, scale=scale)
                  for h, v in enumerate((L.heads[pos] @ u).tolist())]
        parts.append(Node("bias", pos, scale * float(u @ L.attn_rest[pos]), layer=layer, which="attention output"))
    return parts


def split(cap: Capture, node: Node) -> list[Node]:
    """The parts of a target, feature or head node; their values add up to the node's."""
    if node.kind in ("target", "feature"):
        d = cap.transcoders[node.layer].dictionary
        L = cap.layers[node.layer]
        u = L.mlp_scale[node.pos] * L.mlp_gain * _f64(d.W_enc[:, node.index])
        parts = residual_parts(cap, u, node.pos, attn_upto=node.layer + 1, mlp_upto=node.layer, scale=node.scale)
        return parts + [Node("bias", node.pos, node.scale * float(_f64(d.b_enc[node.index])), layer=node.layer,
                             which="encoder")]
    if node.kind == "logit":
        u = cap.final_scale[node.pos] * cap.final_gain * node.read
        count = len(cap.layers)
        return residual_parts(cap, u, node.pos, attn_upto=count, mlp_upto=count, scale=1.0)
    if node.kind == "head":
        L, h, p = cap.layers[node.layer], node.index, node.pos
        back = L.W_V[h].T @ (L.W_O[h].T @ node.read)  # the read vector before the head's OV
        parts = []
        for q in range(p + 1):
            a = float(L.pattern[h, p, q])
            if a:
                u = a * L.attn_scale[q] * L.attn_gain * back
                parts += residual_parts(cap, u, q, attn_upto=node.layer, mlp_upto=node.layer, scale=node.scale)
        if L.b_V is not None:
            parts.append(Node("bias", p, node.scale * float(node.read @ (L.W_O[h] @ L.b_V[h])), layer=node.layer,
                              which=f"head {h} value"))
        return parts
    raise ValueError(f"{node.kind} nodes have no parts")


def target_node(cap: Capture, *, layer: int | None = None, feature: int | None = None,
                logit_weights: torch.Tensor | None = None, unembed: torch.Tensor | None = None,
                text: str | None = None) -> Node:
    """The root at the prompt's last position: feature ``feature`` of the transcoder at
    ``layer``, or a weighted sum of logits (``logit_weights`` (vocab,), e.g. one-hot for one
    token or +1/n, -1/m for a logit difference; ``unembed`` the (vocab, d) unembedding; ``text``
    names it)."""
    pos = len(cap.ids) - 1
    if logit_weights is not None:
        w = _f64(logit_weights)
        return Node("logit", pos, float(cap.logits[pos] @ w), which=text,
                    read=w @ _f64(unembed))
    d = cap.transcoders[layer].dictionary
    x = cap.layers[layer].mlp_in[pos]
    pre = float(x @ _f64(d.W_enc[:, feature]) + _f64(d.b_enc[feature]))
    return Node("target", pos, pre, layer=layer, index=feature)


def attribute(cap: Capture, root: Node, *, depth: int, width: int) -> dict:
    """Greedy path search from ``root`` (its tree is left in the nodes' ``children``); returns
    how exactly the parts added up: at the root, and the worst split, each relative to the
    target's value, and the root's parts summed by kind."""
    frontier, worst, checks = [root], 0.0, {}
    for _ in range(depth):
        grown = []
        for node in frontier:
            parts = split(cap, node)
            total = math.fsum(p.value for p in parts)
            worst = max(worst, abs(total - node.value) / max(abs(root.value), 1e-12))
            if node is root:
                by_kind = {}
                for p in parts:
                    by_kind[p.kind] = by_kind.get(p.kind, 0.0) + p.value
                checks = {"sum_of_parts": total, "relative_error": abs(total - root.value) / max(abs(root.value), 1e-12),
                          "by_kind": by_kind}
            ranked = sorted(parts, key=lambda p: -abs(p.value))
            node.children = ranked[:width]
            node.rest = math.fsum(p.value for p in ranked[width:])
            grown += [c for c in node.children if c.kind in EXPANDABLE]
        frontier = grown
    if checks["relative_error"] > 1e-4:
        raise FeatureError(f"the attribution does not add up to the target ({checks['relative_error']:.1e} relative): "
                           f"this model's norms or attention differ from what tc-attribution assumes")
    return {**checks, "max_relative_error": worst}


def check_transcoders(model, target, upstream: list, *, feature_target: bool) -> list:
    """The transcoders of one decomposition, target first: each a transcoder from its layer's
    MLP input to that MLP's output, at most one per layer, the upstream ones before a target
    feature's layer."""
    chain = [target] + list(upstream)
    layers = []
    for d in chain:
        out_site = getattr(d, "out_site", None)
        kind, _, layer = d.site.partition(".")
        if out_site is None or kind != "mlp_in" or out_site != f"mlp_out.{layer}":
            raise FeatureError(f"tc-attribution needs transcoders from mlp_in.L to mlp_out.L; got a {d.type_name} "
                               f"reading {d.site}" + (f" and writing {out_site}" if out_site else ""))
        bind(model, d)
        layers.append(int(layer))
    if len(set(layers)) != len(layers):
        raise FeatureError(f"two transcoders for the same layer: layers {sorted(layers)}")
    if feature_target and any(layer >= layers[0] for layer in layers[1:]):
        raise FeatureError(f"an upstream transcoder must come before the target's layer {layers[0]}; got layers "
                           f"{layers[1:]}")
    return chain


def one_token(tokenizer, text: str) -> int:
    """The id of ``text``, which must be one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise FeatureError(f"--target-token must be one token; {text!r} is {len(ids)}: {ids}")
    return ids[0]


def unembedding(model) -> torch.Tensor:
    """The (vocab, d) unembedding matrix."""
    return submodule(torch_module(model), architecture_of(model).unembed).weight


def check_active(cap: Capture, layer: int, feature: int, tokenizer, top: int = 8) -> None:
    """A target feature must fire at the prompt's last token; if not, say which features do."""
    z = cap.transcoders[layer].acts[-1]
    if z[feature] > 0:
        return
    values, indices = z.topk(min(top, len(z)))
    active = ", ".join(f"#{i} ({v:.3g})" for v, i in zip(values.tolist(), indices.tolist()) if v > 0) or "none"
    token = tokenizer.decode([cap.ids[-1]])
    raise FeatureError(f"feature {feature} of the transcoder at mlp_in.{layer} is zero at the prompt's last token "
                       f"({token!r}); the most active there: {active}")


def label(node: Node, tokens: list[str]) -> str:
    """A short name: what the node is and at which token."""
    at = f"@{tokens[node.pos]!r}"
    if node.kind in ("target", "feature"):
        return f"tc{node.layer} #{node.index} {at}"
    if node.kind == "logit":
        return f"logit {node.which!r} {at}"
    if node.kind == "head":
        return f"head {node.layer}.{node.index} {at}"
    if node.kind == "embedding":
        return f"embedding {at}"
    if node.kind == "bias":
        return f"{node.which} bias" + (f" {node.layer}" if node.layer is not None else "")
    return f"{node.kind} {node.layer} {at}"


def tree_json(node: Node, tokens: list[str]) -> dict:
    """The tree under ``node`` as plain data (values rounded to 6 significant digits)."""
    out = {"kind": node.kind, "label": label(node, tokens), "layer": node.layer, "index": node.index,
           "position": node.pos, "token": tokens[node.pos], "value": float(f"{node.value:.6g}")}
    if node.which is not None:
        out["which"] = node.which
    if node.children:
        out["children"] = [tree_json(c, tokens) for c in node.children]
        out["rest"] = float(f"{node.rest:.6g}")
    return out


def plot_attribution(tree: dict, path, title: str) -> None:
    """The path-search tree, target on top; each edge is the child's contribution to the target."""
    draw_tree(tree, path, box=lambda n: n["label"].replace(" @", "\n@"), edge=lambda n: f"{n['value']:+.3g}",
              title=title)


class TcAttributionOptions(Options):
    prompt = Option(str, help="the prompt; the target is at its last token")
    feature = Option(int, None, "target: this feature of --dict (a transcoder)", min=0)
    target_token = Option(str, None, "target: this token's logit (one token of text)")
    upstream = Option(str, [], "a transcoder at another layer, whose MLP is split into its features (repeat)",
                      repeat=True, metavar="DIR")
    depth = Option(int, 3, "steps of the path search (a head is a step)", min=1)
    width = Option(int, 4, "parts kept per node, by |contribution|", min=1)

    def check(self):
        if (self.feature is None) == (self.target_token is None):
            raise FeatureError("give one target: --feature N (a feature of --dict) or --target-token TEXT")
        if not self.prompt:
            raise FeatureError("--prompt is empty")


class TranscoderAttribution(Analysis):
    name = "tc-attribution"
    help = ("weights-based attribution through transcoders: what feeds a transcoder feature or a token's logit "
            "on a prompt, through the residual stream and heads' OV circuits; path search, graph")
    Options = TcAttributionOptions

    def run(self, *, model, dictionary, out_dir, options):
        feature, text = options.feature, options.target_token
        if feature is not None:
            feature = check_features(dictionary, [feature])[0]
        chain = check_transcoders(model, dictionary, [load_dictionary(p) for p in options.upstream],
                                  feature_target=feature is not None)
        tokenizer = model.tokenizer
        token = None if text is None else one_token(tokenizer, text)
        ids = tokenizer(options.prompt)["input_ids"]
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
        checks = attribute(cap, root, depth=options.depth, width=options.width)
        tokens = [tokenizer.decode([i]) for i in ids]
        tree = tree_json(root, tokens)
        plot_attribution(tree, out_dir / "tc-attribution.png",
                         title=f"{tree['label']}: {root.value:.3g} (edge: contribution to it)")
        return {"model": model_id(model), "prompt": options.prompt, "tokens": tokens, "target": target,
                "value": root.value, "transcoders": [d.site for d in chain], "depth": options.depth,
                "width": options.width, **checks, "plot": "tc-attribution.png", "tree": tree}
