"""Attention heads as circuit nodes, through sites only: their outputs, what replaces them when
ablated (``ABLATIONS``), and ablating them one at a time (the patching reference) or all but a
set (faithfulness).
Shared by the reference, the faithfulness check and the circuit methods."""

from __future__ import annotations

import nnsight
import torch
from tqdm.auto import tqdm

from .errors import NnsightSaeError
from .models import trace_options
from .sites import n_layers, resolve_site


def head_sites(model) -> list:
    """Every layer's ``head_out`` site, first layer first."""
    return [resolve_site(model, f"head_out.{layer}") for layer in range(n_layers(model))]


def _encode(model, texts):
    return model.tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def head_outputs(model, texts: list[str], *, reduce: str = "mean", batch_size: int = 16) -> torch.Tensor:
    """(n_prompts, n_layers, n_heads, d_model): each head's output written into the
    residual stream (``head_out.L``), averaged over the prompt's real tokens
    (reduce="mean") or taken at the last token (reduce="last")."""
    sites = head_sites(model)
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


def encode_pair(model, prompts, other: list[str] | None = None):
    """Positive and negative prompts (or ``other`` texts, e.g. the counterfactuals) tokenised
    to one common (left-padded) width, so positions counted from the end line up between them."""
    pos, neg = _encode(model, prompts.positive), _encode(model, prompts.negative if other is None else other)
    width = max(pos.input_ids.shape[1], neg.input_ids.shape[1])

    def pad(enc):
        return model.tokenizer.pad(dict(enc), padding="max_length", max_length=width, return_tensors="pt")

    return pad(pos), pad(neg)


ABLATIONS = {
    "mean": "its mean over the negative prompts at the same position counted from the end",
    "position-mean": "its mean over the negative prompts and all their positions",
    "resample": "its output on the prompt's own negative (counterfactual) prompt, position by position",
    "zero": "zero",
}
"""What an ablated head's output is replaced by (``--ablation``); "mean" is the default."""


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise NnsightSaeError(f"unknown ablation {ablation!r}; one of {', '.join(ABLATIONS)}")
    return ablation


@torch.no_grad()
def replacements(model, prompts, ablation: str = "mean", neg=None, *, batch_size: int = 16) -> list[torch.Tensor]:
    """Per layer, (n_prompts, width, n_heads * d_head), or (1, width, n_heads * d_head) where
    all prompts share it: what each head's output (the ``head_out`` site's per-head input)
    becomes on each positive prompt when the head is ablated (see ``ABLATIONS``), from the
    real tokens of the negatives. ``neg`` is the negatives' encoding from ``encode_pair``.
    ``rows_of`` picks the rows of a batch."""
    check_ablation(ablation)
    neg = encode_pair(model, prompts)[1] if neg is None else neg
    sites = head_sites(model)
    if ablation == "zero":  # no run needed, only the shapes
        return [torch.zeros(1, neg.input_ids.shape[1], site.heads_width) for site in sites]
    outputs = [[] for _ in sites]
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        mask = neg.attention_mask[rows][..., None].float()
        with model.trace({"input_ids": neg.input_ids[rows], "attention_mask": neg.attention_mask[rows]},
                         **trace_options(model, last_position=True)):
            zs = nnsight.save([])
            for site in sites:
                zs.append(site.envoy.input)
        for layer, z in enumerate(zs):
            outputs[layer].append(z.float().cpu() * mask)
    outputs = [torch.cat(z) for z in outputs]  # padding zeroed
    if ablation == "resample":
        return outputs
    real = neg.attention_mask[..., None].float()  # (n, width, 1)
    if ablation == "position-mean":
        return [(z.sum((0, 1)) / real.sum()).expand_as(z[:1]).clone() for z in outputs]
    return [(z.sum(0, keepdim=True) / real.sum(0, keepdim=True).clamp_min(1)) for z in outputs]


def rows_of(replacement: torch.Tensor, idx: list[int], copies: int = 1) -> torch.Tensor:
    """The rows of one layer's ``replacements`` for the prompts ``idx``, repeated ``copies``
    times (a shared replacement stays one row, broadcast where it is used)."""
    return replacement if replacement.shape[0] == 1 else replacement[idx].repeat(copies, 1, 1)


def _ablate(z: torch.Tensor, replacement: torch.Tensor, heads: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """z (rows, p, H*dh) with the heads marked in ``heads`` (rows, H) replaced by
    ``replacement`` (rows or 1, p, H*dh) at the real positions (``real``: rows x p)."""
    rows, width, _ = z.shape
    H = heads.shape[1]
    where = (heads[:, None, :, None] & real[:, :, None, None]).to(z.device)
    out = torch.where(where, replacement.reshape(len(replacement), width, H, -1).to(z.device, z.dtype),
                      z.reshape(rows, width, H, -1))
    return out.reshape(z.shape)


@torch.no_grad()
def ablation_effects(model, task, prompts, *, ablation: str = "mean", heads: torch.Tensor | None = None,
                     replaced: list[torch.Tensor] | None = None, batch_size: int = 16, rows_per_pass: int = 96,
                     progress: bool = True) -> torch.Tensor:
    """(n_layers, n_heads): drop in the task metric on positive prompts when one head's
    output is ablated (by default replaced by its mean over the negative prompts per
    position, right-aligned; ``ablation`` picks another of ``ABLATIONS``). ``heads``: a bool
    (n_layers, n_heads) mask of the heads to measure (default all; the others get 0);
    ``replaced``: ``replacements`` for ``ablation`` when the caller has them.
    The heads of a layer run in batched passes, copy i of the prompts ablating the layer's
    i-th head, about ``rows_per_pass`` sequences a pass, starting from the cached residual."""
    pos, neg = encode_pair(model, prompts)
    if replaced is None:
        replaced = replacements(model, prompts, ablation, neg, batch_size=batch_size)
    L = n_layers(model)
    H = resolve_site(model, "head_out.0").n_heads
    heads = torch.ones(L, H, dtype=torch.bool) if heads is None else heads
    effects = torch.zeros(L, H)
    layers = [resolve_site(model, f"resid_post.{layer}") for layer in range(L)]
    with model.trace(dict(pos), **trace_options(model, last_position=True)):
        resid = nnsight.save([])  # the clean residual after each layer: patched passes skip the layers before
        for site in layers:
            resid.append(site.read())
        clean_logits = model.output.logits[:, -1].float().save()
    clean = task.metric(clean_logits.cpu(), prompts).mean()  # padded as the patched passes are
    n = len(prompts)
    for layer in tqdm([layer for layer in range(L) if heads[layer].any()], desc="patch heads", disable=not progress,
                      leave=False):
        site = resolve_site(model, f"head_out.{layer}")
        chosen = heads[layer].nonzero().flatten()
        copies, per_pass = len(chosen), max(1, rows_per_pass // len(chosen))
        metrics = []
        for start in range(0, n, per_pass):
            idx = list(range(start, min(n, start + per_pass)))
            ids = pos.input_ids[idx].repeat(copies, 1)
            mask = pos.attention_mask[idx].repeat(copies, 1)
            which = torch.eye(H, dtype=torch.bool)[chosen].repeat_interleave(len(idx), dim=0)
            with model.trace({"input_ids": ids, "attention_mask": mask}, **trace_options(model, last_position=True)):
                if layer > 0:
                    before = resid[layer - 1][idx].repeat(copies, 1, 1)
                    for skipped in layers[:layer]:  # only the last one's output is used downstream
                        skipped.envoy.skip(before)
                site.envoy.input = _ablate(site.envoy.input, rows_of(replaced[layer], idx, copies), which,
                                           mask.bool())
                logits = model.output.logits[:, -1].float().save()
            sub = prompts.subset(idx)
            metrics.append(torch.stack([task.metric(logits[i * len(idx):(i + 1) * len(idx)].cpu(), sub)
                                        for i in range(copies)]))  # (copies, len(idx))
        effects[layer, chosen] = clean - torch.cat(metrics, dim=1).mean(1)
    return effects


@torch.no_grad()
def keep_only_metric(model, task, prompts, keep: torch.Tensor, replaced=None, *, ablation: str = "mean",
                     batch_size: int = 16) -> torch.Tensor:
    """Per positive prompt, the task metric when every head outside ``keep`` (a bool
    (n_layers, n_heads) mask) is ablated at once: the circuit run alone. ``replaced``
    from ``replacements`` (computed for ``ablation`` when not given)."""
    pos, neg = encode_pair(model, prompts)
    if replaced is None:
        replaced = replacements(model, prompts, ablation, neg, batch_size=batch_size)
    sites = head_sites(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        real = pos.attention_mask[idx].bool()
        with model.trace({"input_ids": pos.input_ids[idx], "attention_mask": pos.attention_mask[idx]},
                         **trace_options(model, last_position=True)):
            for layer, site in enumerate(sites):
                ablate = (~keep[layer])[None].expand(len(idx), -1)
                site.envoy.input = _ablate(site.envoy.input, rows_of(replaced[layer], idx), ablate, real)
            logits = model.output.logits[:, -1].float().save()
        out.append(task.metric(logits.cpu(), prompts.subset(idx)))
    return torch.cat(out)
