"""Attribution patching per head (the default circuit method): the first-order estimate of
each head's ablation effect, from one forward and backward pass per batch, its top candidates
verified by exact patching."""

from __future__ import annotations

import time

import nnsight
import torch

from nnsight_sae.circuits import CircuitMethod
from nnsight_sae.heads import ablation_effects, encode_pair, last_logits_of, replacements, rows_of
from nnsight_sae.models import trace_options
from nnsight_sae.options import Option, Options
from nnsight_sae.sites import n_layers, resolve_site


def attribution_effects(model, task, prompts, *, ablation: str = "mean", batch_size: int = 16) -> torch.Tensor:
    """(n_layers, n_heads): attribution patching, the first-order estimate of
    ``ablation_effects`` with the same ``ablation``: -(replacement - z) . d metric / d z
    per head, summed over positions and averaged over prompts. Per batch: a forward pass for d metric / d logits,
    then one forward and backward pass."""
    L = n_layers(model)
    sites = [resolve_site(model, f"head_out.{layer}") for layer in range(L)]
    H = sites[0].n_heads
    pos, neg = encode_pair(model, prompts)
    width = pos.input_ids.shape[1]
    replaced = replacements(model, prompts, ablation, neg, batch_size=batch_size)
    effects = torch.zeros(L, H)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        enc = {"input_ids": pos.input_ids[idx], "attention_mask": pos.attention_mask[idx]}
        # d metric / d logits first, here: the task's metric is any Python, which cannot run on NDIF
        with torch.enable_grad():
            logits = last_logits_of(model, enc).requires_grad_()
            task.metric(logits, prompts.subset(idx)).sum().backward()
        # NDIF runs models with frozen weights: the graph starts at the heads' inputs. (No comment
        # lines inside this block: nnsight's remote path re-parses it without them and then finds
        # the nested backward block by line number.)
        with model.trace(enc, **trace_options(model, last_position=True)):
            zs, grads = nnsight.save([]), nnsight.save([])
            for site in sites:
                zs.append(site.envoy.input.requires_grad_())
            metric = (model.output.logits[:, -1].float() * logits.grad.to(model.output.logits.device)).sum()
            with metric.backward():
                for z in reversed(zs):  # the backward pass reaches the last layer first
                    grads.append(z.grad)
        grads.reverse()
        mask = enc["attention_mask"][..., None].float()
        for layer in range(L):
            delta = (rows_of(replaced[layer], idx) - zs[layer].detach().float().cpu()) * mask  # (b, p, H*dh)
            contrib = (delta * grads[layer].float().cpu()).reshape(len(idx), width, H, -1).sum(dim=(1, 3))
            effects[layer] -= contrib.sum(0)
    return effects / len(prompts)


class AttributionOptions(Options):
    verify = Option(int, 0, "re-score the top N heads by |estimate| with exact single-head patching "
                            "(each costs what it costs in the reference; 0: the estimate alone)", min=0)


class Attribution(CircuitMethod):
    """Attribution patching: -gradient x (replacement - activation) per head, the
    first-order estimate of each head's ablation effect (with the run's ablation); with
    ``verify`` N, the N heads of largest |estimate| are then patched one at a time and get their
    exact effect: the estimate as a prefilter, patching to verify, as Kramár et al. 2024 use
    attribution patching (arXiv:2403.00745; their QK fix and GradDrop are not done here).
    The default method."""

    name = "attribution"
    help = "attribution patching per head (optionally its top candidates verified by patching); the default"
    signed = True
    default = True
    Options = AttributionOptions

    def score_heads(self, model, task, prompts, *, train_index, seed, options, seconds, ablation):
        t = time.perf_counter()
        effects = attribution_effects(model, task, prompts, ablation=ablation)
        seconds["score"] = round(time.perf_counter() - t, 2)
        if options.verify:
            t = time.perf_counter()
            top = torch.zeros(effects.numel(), dtype=torch.bool)
            top[effects.abs().flatten().topk(min(options.verify, effects.numel())).indices] = True
            top = top.view(effects.shape)
            exact = ablation_effects(model, task, prompts, ablation=ablation, heads=top, progress=False)
            effects = torch.where(top, exact, effects)
            seconds["verify"] = round(time.perf_counter() - t, 2)
        return effects
