"""Sparse feature circuits (Marks et al. 2024, "Sparse Feature Circuits", arXiv:2403.19647).

Dictionaries at several sites are spliced into the model together, each with its error
term (the site's activation minus the reconstruction; for a transcoder its skip path too),
so the model computes what it computed before, to float tolerance. Every feature and every
error term is then a node. For a positive prompt and its counterfactual (same token length),
a node's effect on the task's metric is estimated as

    effect(a) = grad_a(metric) . (a_counterfactual - a_positive)

with the gradient taken on the positive prompt (attribution patching, ``steps=0``) or averaged
along the straight line from the positive to the counterfactual activation of the node's site
(integrated gradients with ``steps`` points, midpoint rule; the paper's choice). A feature's
gradient is the site's gradient through its decoder direction, so no pass needs the spliced
model: the spliced and the clean model are the same function.

Edges join nodes of consecutive sites: the effect of upstream node u on the metric through
downstream node d, grad_d(metric) . (d d / d u) . delta u, from one vector-Jacobian product per
downstream node (batched: each copy of the prompts carries one node's vector) through the
layers in between. Nodes are (site, feature) with effects summed over positions and averaged
over prompts (the paper's "summed" mode), or (site, feature, position counted from the end),
averaged over prompts ("by token").

Checks, as the paper makes them: faithfulness, the metric with only a node set kept and every
other node mean-ablated (its mean over the positive prompts at the same position counted from
the end; or, ``ablation="counterfactual"``, its value on the prompt's own counterfactual; each
prompt's first token, the attention sink, is never ablated), as a fraction of clean minus
all-ablated; completeness, the same with the set ablated instead; both against the number of
nodes kept (top nodes by |effect| averaged over the prompts, one set for all as in the paper, or
each prompt's own), for the feature circuit, for the same search over the sites' neurons (the
activation's coordinates, no dictionary) and for random node sets. And a sample of nodes
patched one at a time to their counterfactual value, against their estimates.
"""

from __future__ import annotations

import math
import time

import nnsight
import torch
from tqdm.auto import tqdm

from nnsight_sae.analysis import Analysis
from nnsight_sae.heads import encode_pair
from nnsight_sae.models import model_id, trace_options
from nnsight_sae.options import Option
from nnsight_sae.sites import site_layer
from nnsight_sae.traced import at_positions

from .circuit_graph import plot_curves, plot_graph, render_page
from .common import CorpusOptions, FeatureError, bind, corpus_of, counterfactual_prompts, run_with_additions, top_tokens
from .deembed import de_embedding
from .report import top_contexts

# where in a layer each kind of site sits, for ordering dictionaries along the forward pass
KIND_ORDER = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_post", "mlp_out", "resid_post")
REACH = 0.6  # the faithfulness the node counts are reported for


class SiteNodes:
    """One dictionary's nodes: its features and its error term, at the site it writes."""

    def __init__(self, attached):
        self.attached = attached
        self.reads = attached.site
        self.writes = attached.out_site or attached.site
        self.name = self.writes.name
        self.d_sae = attached.dictionary.d_sae
        self.directions = attached.dictionary.decoder_directions().detach().float().cpu()  # (d_sae, d_out)

    def __repr__(self):
        return f"SiteNodes({self.attached.dictionary.type_name!r} writing {self.name!r})"

    def read(self):
        """(input, activation written) inside a trace: the same tensor but for transcoders."""
        x = self.reads.read()
        return x, (self.writes.read() if self.writes is not self.reads else x)

    def decompose(self, x, target):
        """Features and error term of one activation (plain torch, runs inside traces)."""
        d = self.attached._on(x)
        f = d.encode(x)
        return f, target - d.decode(f)

    def compose(self, f, error):
        return self.attached.dictionary.decode(f) + error


def site_nodes(model, dictionaries) -> list[SiteNodes]:
    """Each dictionary bound to the model and ordered along the forward pass; two writing one
    site, raw or per-head sites are refused (FeatureError)."""
    if not dictionaries:
        raise FeatureError("no dictionaries given (--dicts A,B,...)")
    groups = [SiteNodes(bind(model, d)) for d in dictionaries]
    seen = {}
    for g in groups:
        kind = g.name.split(".")[0]
        if site_layer(g.name) is None or kind not in KIND_ORDER:
            raise FeatureError(f"feature circuits need dictionaries on named sites ({', '.join(KIND_ORDER)}); "
                               f"{g.name!r} is not one")
        if g.name in seen:
            raise FeatureError(f"two dictionaries write {g.name!r} ({seen[g.name]} and "
                               f"{g.attached.dictionary.type_name}); give one per site")
        seen[g.name] = g.attached.dictionary.type_name
    return sorted(groups, key=lambda g: (site_layer(g.name), KIND_ORDER.index(g.name.split(".")[0])))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


def _rows(enc: dict, idx: list[int], copies: int = 1) -> dict:
    return {k: v[idx].repeat(copies, 1) for k, v in enc.items()}


@torch.no_grad()
def read_nodes(model, groups: list[SiteNodes], enc: dict, *, batch_size: int = 16):
    """Per group (features (n, p, d_sae), error (n, p, d_out), activation (n, p, d_out)) and the
    last position's logits (n, vocab), all on CPU in float32."""
    parts, logits = [], []
    for idx in _chunks(len(enc["input_ids"]), batch_size):
        with model.trace(_rows(enc, idx), **trace_options(model, last_position=True)):
            saved = nnsight.save([])
            for g in groups:
                x, target = g.read()
                f, error = g.decompose(x, target)
                saved.append((f, error, target))
            out = model.output.logits[:, -1].save()
        parts.append([tuple(t.float().cpu() for t in triple) for triple in saved])
        logits.append(out.float().cpu())
    per_group = [tuple(torch.cat([p[i][j] for p in parts]) for j in range(3)) for i in range(len(groups))]
    return per_group, torch.cat(logits)


def site_gradients(model, groups: list[SiteNodes], enc: dict, logit_grad: torch.Tensor, *,
                   replace: tuple[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Gradients of (last logits . logit_grad) with respect to each group's written activation
    (CPU float32), or, with ``replace=(i, value)``, with respect to ``value`` written at group
    i's site instead of its activation (the other groups are not read)."""
    chosen = [replace[0]] if replace is not None else range(len(groups))
    with model.trace(enc, **trace_options(model, last_position=True)):
        ts, grads = nnsight.save([]), nnsight.save([])
        for i in chosen:
            t = groups[i].writes.read()
            if replace is not None:
                t = replace[1].to(t.device, t.dtype).requires_grad_()
                groups[i].writes.write(t)
            else:
                t.requires_grad_()
            ts.append(t)
        metric = (model.output.logits[:, -1].float() * logit_grad.to(model.output.logits.device)).sum()
        with metric.backward():
            for t in reversed(ts):
                grads.append(t.grad)
    return [g.float().cpu() for g in reversed(grads)]


class Measured:
    """Node values on the positive prompts and their counterfactuals, and the gradients
    the node effects use (per group, CPU float32)."""

    def __init__(self, groups, enc, clean, cf, grads, logits, cf_logits):
        self.groups = groups
        self.enc = enc  # the positive prompts, left-padded to the counterfactuals' width
        self.f = [c[0] for c in clean]
        self.error = [c[1] for c in clean]
        self.x = [c[2] for c in clean]
        self.df = [b[0] - a[0] for a, b in zip(clean, cf)]
        self.derror = [b[1] - a[1] for a, b in zip(clean, cf)]
        self.dx = [b[2] - a[2] for a, b in zip(clean, cf)]
        self.grads = grads  # (n, p, d_out): the site's gradient (mean along the path for IG)
        self.logits, self.cf_logits = logits, cf_logits
        self.mask = enc["attention_mask"].float()  # (n, p) real tokens

    def feature_grads(self, i: int) -> torch.Tensor:
        """(n, p, d_sae): the metric's gradient with respect to group i's features."""
        return self.grads[i] @ self.groups[i].directions.T

    def effects(self, i: int) -> torch.Tensor:
        """(n, p, d_sae + 1): each feature's effect and, last, the error term's, per prompt and position."""
        feature = self.feature_grads(i) * self.df[i]
        error = (self.grads[i] * self.derror[i]).sum(-1, keepdim=True)
        return torch.cat([feature, error], -1) * self.mask[..., None]

    def neuron_effects(self, i: int) -> torch.Tensor:
        """(n, p, d_out): each coordinate of the site's activation as a node (no dictionary)."""
        return self.grads[i] * self.dx[i] * self.mask[..., None]


def measure(model, task, prompts, groups: list[SiteNodes], *, steps: int = 10, batch_size: int = 16) -> Measured:
    """Node values on both prompt sets and the gradients for the effects (attribution patching
    with steps=0, else integrated gradients with ``steps`` points per site)."""
    enc, enc_cf = encode_pair(model, prompts, prompts.counterfactual)
    enc, enc_cf = dict(enc), dict(enc_cf)
    clean, logits = read_nodes(model, groups, enc, batch_size=batch_size)
    cf, cf_logits = read_nodes(model, groups, enc_cf, batch_size=batch_size)
    n = len(prompts)
    grads = [torch.zeros_like(c[2]) for c in clean]
    if steps == 0:
        for idx in _chunks(n, batch_size):
            logit_grad = task.metric_gradient(logits[idx], prompts.subset(idx))
            for i, g in enumerate(site_gradients(model, groups, _rows(enc, idx), logit_grad)):
                grads[i][idx] = g
    else:
        alphas = (torch.arange(steps) + 0.5) / steps
        per_pass = max(1, 4 * batch_size // steps)  # prompts per pass, each repeated once per point
        for i in tqdm(range(len(groups)), desc="integrated gradients", leave=False):
            for idx in _chunks(n, per_pass):
                x0, dx = clean[i][2][idx], cf[i][2][idx] - clean[i][2][idx]
                path = (x0[None] + alphas[:, None, None, None] * dx[None]).flatten(0, 1)  # (steps * b, p, d)
                batch, rep = _rows(enc, idx, steps), prompts.subset(idx * steps)
                path_logits = last_logits_replaced(model, groups[i], batch, path)
                logit_grad = task.metric_gradient(path_logits, rep)
                g = site_gradients(model, groups, batch, logit_grad, replace=(i, path))[0]
                grads[i][idx] = g.view(steps, len(idx), *g.shape[1:]).mean(0)
    return Measured(groups, enc, clean, cf, grads, logits, cf_logits)


@torch.no_grad()
def last_logits_replaced(model, group: SiteNodes, enc: dict, value: torch.Tensor) -> torch.Tensor:
    """The last position's logits with ``value`` written at the group's site."""
    with model.trace(enc, **trace_options(model, last_position=True)):
        t = group.writes.read()
        group.writes.write(value.to(t.device, t.dtype))
        out = model.output.logits[:, -1].save()
    return out.float().cpu()


# -- nodes ---------------------------------------------------------------------------------

class NodeTable:
    """Every node of the circuit search as one flat index: per group, (d_sae + 1) slots (the
    error last; neurons: d_out) summed over positions, or per position ("by token").
    ``effects`` are averaged over the prompts; ``prompt_effects`` (n, nodes) are each prompt's."""

    def __init__(self, per_group: list[torch.Tensor], by_token: bool):
        # per_group: (n, p, K) per-prompt effects
        self.by_token = by_token
        self.shapes = [e.shape[1:] for e in per_group]
        self.prompt_effects = torch.cat([(e if by_token else e.sum(1)).flatten(1) for e in per_group], 1)
        self.effects = self.prompt_effects.mean(0)
        sizes = [e[0].numel() if by_token else e.shape[2] for e in per_group]
        self.offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()

    def locate(self, index: int) -> tuple[int, int, int | None]:
        """(group, slot, position or None) of a flat index."""
        g = next(i for i in range(len(self.shapes)) if index < self.offsets[i + 1])
        local = index - self.offsets[g]
        if self.by_token:
            p, k = divmod(local, self.shapes[g][1])
            return g, k, p
        return g, local, None

    @property
    def n_active(self) -> int:
        return int((self.effects != 0).sum())

    @property
    def n_nodes(self) -> int:
        return len(self.effects)

    def counts(self) -> list[int]:
        """Node counts for a curve: about 1.5x apart up to every node with an effect, then all."""
        counts, n = [], 1
        while n < self.n_active:
            counts.append(n)
            n = max(n + 1, round(n * 1.5))
        return counts + [self.n_active] * (self.n_active > 0) + [self.n_nodes] * (self.n_nodes > self.n_active)

    def top(self, n: int, *, per_prompt: bool = False) -> torch.Tensor:
        """Flat indices of the n nodes of largest |effect|; with per_prompt, (n_prompts, n): each
        prompt's own."""
        if per_prompt:
            return self.prompt_effects.abs().topk(min(n, self.n_nodes), dim=1).indices
        return self.effects.abs().topk(min(n, self.n_nodes)).indices

    def keep_masks(self, sets: list[torch.Tensor], *, invert: bool = False) -> list[torch.Tensor]:
        """Per group, (len(sets), R, p, K) bool: the nodes each set keeps (or, inverted, all
        others); sets of flat indices (N,) are shared by the prompts (R = 1), sets (n_prompts, N)
        are each prompt's (R = n_prompts)."""
        rows = sets[0].shape[0] if sets[0].dim() == 2 else 1
        masks = [torch.zeros(len(sets), rows, *shape, dtype=torch.bool) for shape in self.shapes]
        bounds = torch.tensor(self.offsets[1:])
        for s, index in enumerate(sets):
            index = index.reshape(rows, -1).contiguous()
            prompt = torch.arange(rows)[:, None].expand_as(index)
            group = torch.searchsorted(bounds, index, right=True)
            for g, mask in enumerate(masks):
                chosen = group == g
                local, r = index[chosen] - self.offsets[g], prompt[chosen]
                if self.by_token:
                    mask[s, r, local // self.shapes[g][1], local % self.shapes[g][1]] = True
                else:
                    mask[s, r, :, local] = True
        return [~m for m in masks] if invert else masks


def ablation_means(values: list[torch.Tensor], ablatable: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's (n, p, ...) mean over the prompts at each position counted from the end
    (left padding aligns them), over the positions that may be ablated."""
    w = ablatable.float()
    count = w.sum(0).clamp_min(1)
    return [torch.einsum("np,np...->p...", w, v) / count.view(-1, *[1] * (v.dim() - 2)) for v in values]


def ablatable_positions(mask: torch.Tensor) -> torch.Tensor:
    """(n, p) real positions but each prompt's first (left padding: the first real one)."""
    first = mask.cumsum(1) == 1
    return mask.bool() & ~first


@torch.no_grad()
def spliced_logits(model, enc: dict, groups: list[SiteNodes], keep: list[torch.Tensor], replacements: list[tuple],
                   ablatable: torch.Tensor, *, neurons: bool = False) -> torch.Tensor:
    """The last position's logits (CPU float32) with every group's dictionary spliced in, error
    term included, in one pass, each group reading what the ones before it wrote: at each site
    the nodes ``keep[g]`` (rows, p, K) marks are kept and every other node is set to its value in
    ``replacements[g]`` (features and error term, or with ``neurons=True`` the activation: each
    broadcast against (rows, p, width)) at the ``ablatable`` (rows, p) positions."""
    with model.trace(enc, **trace_options(model, last_position=True)):
        for g, kept, replacement in zip(groups, keep, replacements):
            x, target = g.read()
            kept = kept.to(target.device)
            if neurons:
                new = torch.where(kept, target, replacement[0].to(target.device, target.dtype))
            else:
                f, error = g.decompose(x, target)
                f = torch.where(kept[..., :-1], f, replacement[0].to(f.device, f.dtype))
                error = torch.where(kept[..., -1:], error, replacement[1].to(error.device, error.dtype))
                new = g.compose(f, error)
            g.writes.write(at_positions(ablatable, new, target))
        logits = model.output.logits[:, -1].save()
    return logits.float().cpu()


def kept_metric(model, task, prompts, enc: dict, groups: list[SiteNodes], keeps: list[torch.Tensor],
                replacements: list[tuple], ablatable: torch.Tensor, *, neurons: bool = False,
                batch_size: int = 256) -> torch.Tensor:
    """(n_sets,) the mean metric of ``spliced_logits`` with, for set s, ``keeps[g][s]`` (R, p, K)
    kept at every group (R = 1: the same nodes for every prompt; R = n: each prompt's), the rest
    replaced by ``replacements[g]`` ((R, p, width) each, likewise); several sets share a pass (the
    prompts repeated once per set)."""
    n, n_sets = len(prompts), len(keeps[0])
    out = []
    for sets in _chunks(n_sets, max(1, batch_size // n)):
        copies = len(sets)
        rows = [tuple(t.expand(n, *t.shape[1:]).repeat(copies, 1, 1) for t in r) for r in replacements]
        logits = spliced_logits(model, _rows(enc, list(range(n)), copies), groups,
                                [k[sets].expand(-1, n, -1, -1).flatten(0, 1) for k in keeps], rows,
                                ablatable.repeat(copies, 1), neurons=neurons)
        values = task.metric(logits, prompts.subset(list(range(n)) * copies))
        out.extend(values.view(copies, n).mean(1).tolist())
    return torch.tensor(out)


ABLATIONS = {
    "mean": "its mean over the positive prompts at the same position counted from the end (the paper's)",
    "counterfactual": "its value on the prompt's own counterfactual",
}
"""What a node outside the circuit is set to in the faithfulness checks (``--ablation``)."""


def curves(model, task, prompts, measured: Measured, table: NodeTable, neuron_table: NodeTable, *,
           per_prompt: bool = False, ablation: str = "mean", n_random: int = 2, seed: int = 0,
           batch_size: int = 256) -> dict:
    """Faithfulness (and completeness for the features) against the number of nodes kept, for
    the feature circuit, the neuron circuit and random feature-node sets; the top nodes by
    |effect| averaged over the prompts (one node set for all), or with ``per_prompt`` by each
    prompt's own effects (as many nodes for each prompt); the rest set as ``ablation`` says."""
    groups, enc = measured.groups, measured.enc
    ablatable = ablatable_positions(measured.mask)
    if ablation == "mean":
        features = [tuple(m[None] for m in ablation_means([measured.f[i], measured.error[i]], ablatable))
                    for i in range(len(groups))]
        neuron_values = [tuple(m[None] for m in ablation_means([measured.x[i]], ablatable)) for i in range(len(groups))]
    else:
        features = [(f + df, e + de) for f, df, e, de in zip(measured.f, measured.df, measured.error, measured.derror)]
        neuron_values = [(x + dx,) for x, dx in zip(measured.x, measured.dx)]
    everything = [torch.ones(1, 1, *s, dtype=torch.bool) for s in table.shapes]

    def run(masks, values, neurons):
        return kept_metric(model, task, prompts, enc, groups, masks, values, ablatable, neurons=neurons,
                           batch_size=batch_size)

    ends = run([torch.cat([e, ~e]) for e in everything], features, False)
    clean, empty = float(ends[0]), float(ends[1])

    def normalise(values):
        return [round((float(v) - empty) / (clean - empty), 4) for v in values]

    counts = table.counts()
    top_sets = [table.top(k, per_prompt=per_prompt) for k in counts]
    result = {"n": counts, "ranking": "per prompt" if per_prompt else "shared", "ablation": ablation,
              "metric_clean": round(clean, 6), "metric_all_ablated": round(empty, 6)}
    result["features"] = {
        "faithfulness": normalise(run(table.keep_masks(top_sets), features, False)),
        "completeness": normalise(run(table.keep_masks(top_sets, invert=True), features, False))}
    neuron_counts = neuron_table.counts()
    neuron_sets = [neuron_table.top(k, per_prompt=per_prompt) for k in neuron_counts]
    result["neurons"] = {"n": neuron_counts, "faithfulness": normalise(
        run(neuron_table.keep_masks(neuron_sets), neuron_values, True))}
    g = torch.Generator().manual_seed(seed)
    pool = (table.effects != 0).nonzero().squeeze(1)

    def draw(k):
        if k >= table.n_nodes:
            return torch.arange(k).expand(len(prompts), -1) if per_prompt else torch.arange(k)
        if per_prompt:
            return torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(len(prompts))])
        return pool[torch.randperm(len(pool), generator=g)[:k]]

    random = torch.stack([run(table.keep_masks([draw(k) for k in counts]), features, False)
                          for _ in range(n_random)]).mean(0)
    result["random"] = {"faithfulness": normalise(random), "sets": n_random}
    return result


def nodes_to_reach(n: list[int], faithfulness: list[float], level: float = REACH) -> int | None:
    """The fewest nodes on a curve whose faithfulness is at least ``level`` (None if never)."""
    return next((k for k, f in zip(n, faithfulness) if f >= level), None)


# -- exact check ------------------------------------------------------------------------------

def check_estimates(model, task, prompts, measured: Measured, table: NodeTable, *, n_nodes: int, seed: int = 0,
                    batch_size: int = 256) -> dict:
    """Patch ``n_nodes`` nodes one at a time to their counterfactual value (half the largest
    estimates, half drawn at random from the rest with an effect) and compare with the estimates."""
    pool = (table.effects != 0).nonzero().squeeze(1)
    top = table.top(min(max(1, n_nodes // 2), table.n_active))
    rest = pool[~torch.isin(pool, top)]
    g = torch.Generator().manual_seed(seed)
    sample = torch.cat([top, rest[torch.randperm(len(rest), generator=g)[:n_nodes - len(top)]]])
    groups, enc = measured.groups, measured.enc
    located = [table.locate(int(flat)) for flat in sample]  # (group, slot, position) of each
    by_group = {}
    for j, node in enumerate(located):
        by_group.setdefault(node[0], []).append(j)
    exact = torch.zeros(len(sample))
    clean = float(task.metric(measured.logits, prompts).mean())
    for gi, items in by_group.items():
        changes = [node_change(measured, *located[j]) for j in items]
        logits = run_with_additions(model, enc, groups[gi].writes, lambda k: changes[k], len(items),
                                    lambda repeats: model.output.logits[:, -1], batch_size=batch_size,
                                    last_position=True)
        for j, lg in zip(items, logits):
            exact[j] = float(task.metric(lg, prompts).mean()) - clean
    estimate = table.effects[sample]
    is_feature = torch.tensor([slot != groups[g].d_sae for g, slot, _ in located])
    rows = [{"node": node_id(measured.groups, table, int(flat)), "estimate": round(float(e), 5),
             "exact": round(float(x), 5)} for flat, e, x in zip(sample, estimate, exact)]
    worst = sorted(rows, key=lambda r: -abs(r["estimate"] - r["exact"]))[:5]
    return {"n_nodes": len(rows), "correlation": _correlation(estimate, exact),
            "correlation_features": _correlation(estimate[is_feature], exact[is_feature]), "nodes": rows,
            "worst": worst}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson's r, None where it is undefined (fewer than two values, or one set constant)."""
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(a) > 1 else math.nan
    return None if math.isnan(r) else round(r, 4)


def node_id(groups, table: NodeTable, flat: int) -> str:
    g, slot, p = table.locate(flat)
    name = "error" if slot == groups[g].d_sae else str(slot)
    return f"{groups[g].name}/{name}" + ("" if p is None else f"@{p - table.shapes[g][0]}")


# -- the graph ------------------------------------------------------------------------------

def graph_nodes(measured: Measured, table: NodeTable, *, threshold: float, per_site: int) -> list[dict]:
    """Per site, the nodes with |effect| >= threshold, at most ``per_site`` of them by |effect|."""
    out = []
    for g, group in enumerate(measured.groups):
        lo, hi = table.offsets[g], table.offsets[g + 1]
        local = table.effects[lo:hi]
        order = local.abs().argsort(descending=True)[:per_site]
        for k in order.tolist():
            if abs(float(local[k])) < threshold or local[k] == 0:
                break
            _, slot, p = table.locate(lo + k)
            out.append({"id": node_id(measured.groups, table, lo + k), "site": group.name, "site_index": g,
                        "feature": "error" if slot == group.d_sae else slot,
                        "position": None if p is None else p - table.shapes[g][0],
                        "effect": round(float(local[k]), 5), "_slot": slot, "_p": p})
    return out


def downstream_vectors(measured: Measured, gi: int, nodes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each downstream node at group gi: coefficients (m, n, p, d_sae) on the features and
    (m, n, p, d_out) on the error whose dot product with the node values is the node times its
    metric gradient (a by-token node at its position only)."""
    fg = measured.feature_grads(gi)
    n, p, d_sae = fg.shape
    cf = torch.zeros(len(nodes), n, p, d_sae)
    ce = torch.zeros(len(nodes), n, p, measured.grads[gi].shape[-1])
    for j, node in enumerate(nodes):
        positions = slice(None) if node["_p"] is None else slice(node["_p"], node["_p"] + 1)
        if node["_slot"] == measured.groups[gi].d_sae:
            ce[j, :, positions] = measured.grads[gi][:, positions]
        else:
            cf[j, :, positions, node["_slot"]] = fg[:, positions, node["_slot"]]
    mask = measured.mask[None, ..., None]
    return cf * mask, ce * mask


def node_change(measured: Measured, gi: int, slot: int, p: int | None) -> torch.Tensor:
    """(n, p, d_out): what node ``slot`` of group gi (at position p, or all) adds to its site when it
    moves from its positive to its counterfactual value."""
    if slot == measured.groups[gi].d_sae:
        change = measured.derror[gi]
    else:
        change = measured.df[gi][..., slot, None] * measured.groups[gi].directions[slot]
    if p is not None:
        only = torch.zeros(change.shape[1])
        only[p] = 1
        change = change * only[:, None]
    return change * measured.mask[..., None]


def edge_weights(model, measured: Measured, gi: int, up: list[dict], down: list[dict], *,
                 batch_size: int = 128) -> torch.Tensor:
    """(len(up), len(down)): upstream node u's effect on the metric through downstream node d,
    grad_d . (d d / d x_up) . (u's change), averaged over prompts, by the chain rule through the
    layers between the two sites: one vector-Jacobian product per downstream node, each on its
    own copy of the prompts."""
    lower, upper = measured.groups[gi], measured.groups[gi + 1]
    coef_f, coef_e = downstream_vectors(measured, gi + 1, down)
    changes = torch.stack([node_change(measured, gi, u["_slot"], u["_p"]) for u in up])  # (U, n, p, d)
    n = len(measured.mask)
    weights = torch.zeros(len(up), len(down))
    for ds in _chunks(len(down), max(1, batch_size // n)):
        batch = _rows(measured.enc, list(range(n)), len(ds))
        cf, ce = coef_f[ds].flatten(0, 1), coef_e[ds].flatten(0, 1)
        with model.trace(batch, **trace_options(model)) as tracer:
            t = lower.writes.read()
            t.requires_grad_()
            x, target = upper.read()
            f, error = upper.decompose(x, target)
            value = (f * cf.to(f.device, f.dtype)).sum() + (error * ce.to(error.device, error.dtype)).sum()
            with value.backward():
                w = t.grad.save()
            tracer.stop()
        w = w.float().cpu().view(len(ds), *changes.shape[1:])
        weights[:, ds] = torch.einsum("dnpe,unpe->ud", w, changes) / n
    return weights


def circuit_edges(model, measured: Measured, nodes: list[dict], *, threshold: float) -> list[dict]:
    """Edges between the graph's nodes at consecutive sites, and from the last site's nodes to the
    metric (their effects), those with |weight| >= threshold."""
    by_group = [[n for n in nodes if n["site_index"] == g] for g in range(len(measured.groups))]
    edges = []
    for g in range(len(by_group) - 1):
        up, down = by_group[g], by_group[g + 1]
        if not up or not down:
            continue
        weights = edge_weights(model, measured, g, up, down)
        edges += [{"from": u["id"], "to": d["id"], "weight": round(float(weights[i, j]), 5)}
                  for i, u in enumerate(up) for j, d in enumerate(down)]
    for g in reversed(range(len(by_group))):  # the last site with nodes feeds the metric
        if by_group[g]:
            edges += [{"from": d["id"], "to": "metric", "weight": d["effect"]} for d in by_group[g]]
            break
    return [e for e in edges if abs(e["weight"]) >= threshold]


# -- corpus contexts for the page ---------------------------------------------------------------

@torch.no_grad()
def node_contexts(model, groups: list[SiteNodes], nodes: list[dict], tokens: torch.Tensor, *,
                  n_contexts: int = 5, batch_size: int = 16) -> dict:
    """node id -> its top corpus contexts and de-embedding, for the graph's feature nodes (one
    pass over the corpus reads every site)."""
    wanted = [[n for n in nodes if n["site_index"] == g and n["feature"] != "error"] for g in range(len(groups))]
    index = [torch.tensor([n["feature"] for n in w], dtype=torch.long) for w in wanted]
    last = max((g for g in range(len(groups)) if wanted[g]), default=None)
    if last is None:
        return {}
    acts = [[] for _ in groups]
    for start in tqdm(range(0, len(tokens), batch_size), desc="node contexts", leave=False):
        ids = tokens[start:start + batch_size]
        with model.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, **trace_options(model)) as tracer:
            saved = nnsight.save([])
            for g in range(last + 1):
                x = groups[g].reads.read()
                saved.append(groups[g].attached._on(x).encode(x)[..., index[g].to(x.device)])
            tracer.stop()
        for g, a in enumerate(saved):
            acts[g].append(a.float().cpu())
    out = {}
    for g in range(last + 1):
        if not wanted[g]:
            continue
        a = torch.cat(acts[g])
        a[:, 0] = 0  # the first position (attention sink) is left out, as in training
        try:
            embedding = de_embedding(model, groups[g].attached.dictionary, index[g].tolist())
        except FeatureError:
            embedding = None
        for j, node in enumerate(wanted[g]):
            contexts = top_contexts(model.tokenizer, tokens, a[..., j], n_contexts, before=12, after=3)[0]
            entry = {"contexts": contexts}
            if embedding is not None:
                entry["de_embedding"] = top_tokens(model.tokenizer, embedding[j], 8)["raised"]
            out[node["id"]] = entry
    return out


# -- the analysis ---------------------------------------------------------------------------

def feature_circuit(model, task, prompts, dictionaries, *, steps: int = 10, by_token: bool = False,
                    per_prompt: bool = False, ablation: str = "mean", node_threshold: float = 0.05,
                    edge_threshold: float = 0.01, nodes_per_site: int = 12, check: int = 16, random_sets: int = 2,
                    seed: int = 0, corpus: torch.Tensor | None = None, batch_size: int = 16) -> dict:
    """The feature circuit of a task's prompts (with counterfactuals) through ``dictionaries``:
    node effects, graph nodes and edges, the faithfulness curves and the exact check (see the
    module docstring). ``corpus`` (n, ctx_len) tokens, if given, add each graph feature's
    top contexts."""
    seconds = {}
    t0 = t = time.perf_counter()
    groups = site_nodes(model, dictionaries)
    measured = measure(model, task, prompts, groups, steps=steps, batch_size=batch_size)
    table = NodeTable([measured.effects(i) for i in range(len(groups))], by_token)
    neurons = NodeTable([measured.neuron_effects(i) for i in range(len(groups))], by_token)
    seconds["effects"] = round(time.perf_counter() - t, 2)
    metric_clean = float(task.metric(measured.logits, prompts).mean())
    metric_cf = float(task.metric(measured.cf_logits, prompts).mean())
    estimated = {"features": round(float(table.effects.sum()), 5), "neurons": round(float(neurons.effects.sum()), 5)}

    t = time.perf_counter()
    nodes = graph_nodes(measured, table, threshold=node_threshold, per_site=nodes_per_site)
    edges = circuit_edges(model, measured, nodes, threshold=edge_threshold)
    seconds["edges"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    curve = curves(model, task, prompts, measured, table, neurons, per_prompt=per_prompt, ablation=ablation,
                   n_random=random_sets, seed=seed)
    seconds["curves"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    checked = check_estimates(model, task, prompts, measured, table, n_nodes=check, seed=seed) if check else None
    seconds["check"] = round(time.perf_counter() - t, 2)
    contexts = {}
    if corpus is not None:
        t = time.perf_counter()
        contexts = node_contexts(model, groups, nodes, corpus)
        seconds["contexts"] = round(time.perf_counter() - t, 2)
    for node in nodes:
        node.pop("_slot"), node.pop("_p")
        node.update(contexts.get(node["id"], {}))
    seconds["total"] = round(time.perf_counter() - t0, 2)
    reach = {"features": nodes_to_reach(curve["n"], curve["features"]["faithfulness"]),
             "neurons": nodes_to_reach(curve["neurons"]["n"], curve["neurons"]["faithfulness"]),
             "random": nodes_to_reach(curve["n"], curve["random"]["faithfulness"])}
    return {"n_prompts": len(prompts), "aggregate": "by-token" if by_token else "summed",
            "estimate": "integrated gradients" if steps else "attribution patching", "steps": steps,
            "sites": [{"site": g.name, "type": g.attached.dictionary.type_name, "d_sae": g.d_sae,
                       "reads": g.reads.name} for g in groups],
            "metric_clean": round(metric_clean, 6), "metric_counterfactual": round(metric_cf, 6),
            "effects_sum": estimated, "n_active_nodes": table.n_active,
            "node_threshold": node_threshold, "edge_threshold": edge_threshold,
            "nodes": nodes, "edges": edges, "curves": curve, "reach": {"faithfulness": REACH, "nodes": reach},
            "check": checked, "seconds": seconds}


class FeatureCircuitOptions(CorpusOptions):
    task = Option(str, "ioi", "a task with counterfactual prompts (ioi, greater-than) or a JSONL file")
    n_prompts = Option(int, 24, "prompt pairs made; those whose counterfactual has another token length are left "
                                "out", min=1)
    prompts = Option(str, "train", "prompt set", choices=("train", "heldout"))
    seed = Option(int, 0, "prompt sampling and random-set seed")
    steps = Option(int, 10, "integrated-gradients points per site (0: attribution patching, faster, poor for error "
                            "terms)", min=0)
    aggregate = Option(str, "summed", "nodes summed over positions, or one per position counted from the end",
                       choices=("summed", "by-token"))
    ranking = Option(str, "shared", "the faithfulness curves keep the top nodes by effect averaged over the prompts "
                                    "(one set for all, as the paper), or each prompt's own top nodes",
                     choices=("shared", "per-prompt"))
    ablation = Option(str, "mean", "what a node outside the circuit is set to in the faithfulness checks: "
                      + "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()), choices=tuple(ABLATIONS))
    node_threshold = Option(float, 0.05, "graph nodes: |effect| on the metric at least this", min=0.0)
    edge_threshold = Option(float, 0.01, "graph edges: |weight| at least this", min=0.0)
    nodes_per_site = Option(int, 12, "graph nodes per site at most (largest |effect| first)", min=1)
    check_nodes = Option(int, 16, "nodes patched one at a time to check the estimates (0: none)", min=0)
    random_sets = Option(int, 2, "random node sets per size on the faithfulness plot", min=1)
    tokens = Option(int, 8_192, "corpus tokens read for the graph nodes' top contexts", min=1)
    ctx_len = Option(int, 64, "tokens per corpus context", min=2)


class FeatureCircuit(Analysis):
    name = "feature-circuit"
    help = "sparse feature circuit of a task through several dictionaries: nodes, edges, faithfulness; HTML graph"
    Options = FeatureCircuitOptions
    many_dictionaries = True

    def run(self, *, model, dictionary, out_dir, options):
        task, prompts = counterfactual_prompts(model, options)
        site_nodes(model, dictionary)  # bad dictionaries fail before any work
        result = {"task": options.task, "model": model_id(model),
                  **feature_circuit(model, task, prompts, dictionary, steps=options.steps,
                                    by_token=options.aggregate == "by-token", per_prompt=options.ranking == "per-prompt",
                                    ablation=options.ablation, node_threshold=options.node_threshold,
                                    edge_threshold=options.edge_threshold, nodes_per_site=options.nodes_per_site,
                                    check=options.check_nodes, random_sets=options.random_sets, seed=options.seed,
                                    corpus=corpus_of(model, options))}
        plot_graph(result, out_dir / "feature-circuit.png")
        plot_curves(result, out_dir / "feature-circuit-curves.png")
        render_page(result, out_dir / "feature-circuit.html")
        result.update(plot="feature-circuit.png", curves_plot="feature-circuit-curves.png",
                      page="feature-circuit.html")
        return result
