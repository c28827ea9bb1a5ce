"""Attention heads as circuit nodes, through sites only: their outputs, their negative means,
and mean-ablating them one at a time (the patching reference) or all but a set (faithfulness).
Shared by the reference, the faithfulness check and the circuit methods."""

from __future__ import annotations

import nnsight
import torch
from tqdm.auto import tqdm

from .models import trace_options
from .sites import n_layers, resolve_site


def _encode(model, texts):
    return model.tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def head_outputs(model, texts: list[str], *, reduce: str = "mean", batch_size: int = 16) -> torch.Tensor:
    """(n_prompts, n_layers, n_heads, d_model): each head's output written into the
    residual stream (``head_out.L``), averaged over the prompt's real tokens
    (reduce="mean") or taken at the last token (reduce="last")."""
    sites = [resolve_site(model, f"head_out.{layer}") for layer in range(n_layers(model))]
    out = []
    for start in range(0, len(texts), batch_size):
        enc = _encode(model, texts[start:start + batch_size])
        mask = enc.attention_mask.float()
        with model.trace(dict(enc), **trace_options(model, last_position=True)):
            saved = nnsight.save([])
            for site in sites:
                heads = site.read()  # (b, p, H, d)
                if reduce == "last":
                    saved.append(heads[:, -1])  # left padding: the last position is real
                else:
                    w = (mask / mask.sum(1, keepdim=True)).to(heads.device)
                    saved.append(torch.einsum("bp,bphd->bhd", w, heads))
        out.append(torch.stack([s.float().cpu() for s in saved], dim=1))
    return torch.cat(out)


@torch.no_grad()
def last_logits_of(model, enc: dict) -> torch.Tensor:
    """The last position's logits (n, vocab) on CPU in float32."""
    with model.trace(dict(enc), **trace_options(model, last_position=True)):
        logits = model.output.logits[:, -1].save()
    return logits.float().cpu()


def last_logits(model, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    return torch.cat([last_logits_of(model, _encode(model, texts[start:start + batch_size]))
                      for start in range(0, len(texts), batch_size)])


def encode_pair(model, prompts):
    """Positive and negative prompts tokenised to one common (left-padded) width,
    so positions counted from the end line up between them."""
    pos, neg = _encode(model, prompts.positive), _encode(model, prompts.negative)
    width = max(pos.input_ids.shape[1], neg.input_ids.shape[1])

    def pad(enc):
        return model.tokenizer.pad(dict(enc), padding="max_length", max_length=width, return_tensors="pt")

    return pad(pos), pad(neg)


@torch.no_grad()
def negative_means(model, prompts, neg=None, *, batch_size: int = 16) -> list[torch.Tensor]:
    """Per layer, (width, n_heads * d_head): each head's output (the ``head_out`` site's
    per-head input) averaged over the negative prompts at each position counted from
    the end, real tokens only. ``neg`` is the negatives' encoding from ``encode_pair``."""
    neg = encode_pair(model, prompts)[1] if neg is None else neg
    sites = [resolve_site(model, f"head_out.{layer}") for layer in range(n_layers(model))]
    sums, count = None, 0
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        mask = neg.attention_mask[rows][..., None].float()
        with model.trace({"input_ids": neg.input_ids[rows], "attention_mask": neg.attention_mask[rows]},
                         **trace_options(model, last_position=True)):
            zs = nnsight.save([])
            for site in sites:
                zs.append(site.envoy.input)
        batch = [(z.float().cpu() * mask).sum(0) for z in zs]
        sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
        count = count + mask.sum(0)
    return [total / count.clamp_min(1) for total in sums]


def _ablate(z: torch.Tensor, mean: torch.Tensor, heads: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """z (rows, p, H*dh) with the heads marked in ``heads`` (rows, H) replaced by
    ``mean`` (p, H*dh) at the real positions (``real``: rows x p)."""
    rows, width, _ = z.shape
    H = heads.shape[1]
    where = (heads[:, None, :, None] & real[:, :, None, None]).to(z.device)
    out = torch.where(where, mean.view(1, width, H, -1).to(z.device, z.dtype), z.reshape(rows, width, H, -1))
    return out.reshape(z.shape)


@torch.no_grad()
def mean_ablation_effects(model, task, prompts, *, batch_size: int = 16, rows_per_pass: int = 96,
                          progress: bool = True) -> torch.Tensor:
    """(n_layers, n_heads): drop in the task metric on positive prompts when one head's
    output is replaced by its mean over the negative prompts (per position, right-aligned).
    All heads of a layer run in batched passes: copy h of the prompts ablates head h
    (about ``rows_per_pass`` sequences per pass)."""
    clean = task.metric(last_logits(model, prompts.positive, batch_size), prompts).mean()
    pos, neg = encode_pair(model, prompts)
    means = negative_means(model, prompts, neg, batch_size=batch_size)
    L = n_layers(model)
    H = resolve_site(model, "head_out.0").n_heads
    effects = torch.zeros(L, H)
    layers = [resolve_site(model, f"resid_post.{layer}") for layer in range(L)]
    with model.trace(dict(pos), **trace_options(model, last_position=True)):
        resid = nnsight.save([])  # the clean residual after each layer: patched passes skip the layers before
        for site in layers:
            resid.append(site.read())
    n, per_pass = len(prompts), max(1, rows_per_pass // H)
    for layer in tqdm(range(L), desc="patch heads", disable=not progress, leave=False):
        site = resolve_site(model, f"head_out.{layer}")
        metrics = []
        for start in range(0, n, per_pass):
            idx = list(range(start, min(n, start + per_pass)))
            ids = pos.input_ids[idx].repeat(H, 1)
            mask = pos.attention_mask[idx].repeat(H, 1)
            which = torch.eye(H, dtype=torch.bool).repeat_interleave(len(idx), dim=0)  # copy h ablates head h
            with model.trace({"input_ids": ids, "attention_mask": mask}, **trace_options(model, last_position=True)):
                if layer > 0:
                    before = resid[layer - 1][idx].repeat(H, 1, 1)
                    for skipped in layers[:layer]:  # only the last one's output is used downstream
                        skipped.envoy.skip(before)
                site.envoy.input = _ablate(site.envoy.input, means[layer], which, mask.bool())
                logits = model.output.logits[:, -1].float().save()
            sub = prompts.subset(idx)
            metrics.append(torch.stack([task.metric(logits[h * len(idx):(h + 1) * len(idx)].cpu(), sub)
                                        for h in range(H)]))  # (H, len(idx))
        effects[layer] = clean - torch.cat(metrics, dim=1).mean(1)
    return effects


@torch.no_grad()
def keep_only_metric(model, task, prompts, keep: torch.Tensor, means=None, *, batch_size: int = 16) -> torch.Tensor:
    """Per positive prompt, the task metric when every head outside ``keep`` (a bool
    (n_layers, n_heads) mask) is replaced by its negative mean at once: the circuit
    run alone. ``means`` from ``negative_means`` (computed when not given)."""
    pos, neg = encode_pair(model, prompts)
    means = negative_means(model, prompts, neg, batch_size=batch_size) if means is None else means
    sites = [resolve_site(model, f"head_out.{layer}") for layer in range(n_layers(model))]
    out = []
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        real = pos.attention_mask[idx].bool()
        with model.trace({"input_ids": pos.input_ids[idx], "attention_mask": pos.attention_mask[idx]},
                         **trace_options(model, last_position=True)):
            for layer, site in enumerate(sites):
                ablate = (~keep[layer])[None].expand(len(idx), -1)
                site.envoy.input = _ablate(site.envoy.input, means[layer], ablate, real)
            logits = model.output.logits[:, -1].float().save()
        out.append(task.metric(logits.cpu(), prompts.subset(idx)))
    return torch.cat(out)
