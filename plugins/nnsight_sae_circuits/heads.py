"""Per-head residual contributions and per-head patching, through sites only."""

from __future__ import annotations

import torch

from nnsight_sae import n_layers, resolve_site


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
        saved = []
        with model.trace(dict(enc)):
            for site in sites:
                heads = site.read()  # (b, p, H, d)
                if reduce == "last":
                    saved.append(heads[:, -1].save())  # left padding: the last position is real
                else:
                    w = (mask / mask.sum(1, keepdim=True)).to(heads.device)
                    saved.append(torch.einsum("bp,bphd->bhd", w, heads).save())
        out.append(torch.stack([s.float().cpu() for s in saved], dim=1))
    return torch.cat(out)


@torch.no_grad()
def last_logits(model, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    chunks = []
    for start in range(0, len(texts), batch_size):
        with model.trace(dict(_encode(model, texts[start:start + batch_size]))):
            chunks.append(model.output.logits[:, -1].float().cpu().save())
    return torch.cat(chunks)


def _encode_pair(model, prompts):
    """Positive and negative prompts tokenised to one common (left-padded) width,
    so positions counted from the end line up between them."""
    pos, neg = _encode(model, prompts.positive), _encode(model, prompts.negative)
    width = max(pos.input_ids.shape[1], neg.input_ids.shape[1])

    def pad(enc):
        return model.tokenizer.pad(dict(enc), padding="max_length", max_length=width, return_tensors="pt")

    return pad(pos), pad(neg)


def _right_aligned_mean(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of z (n, p, w) at each position counted from the end, real tokens only."""
    m = mask[..., None].float()
    return (z * m).sum(0) / m.sum(0).clamp_min(1)


@torch.no_grad()
def mean_ablation_effects(model, task, prompts, *, batch_size: int = 16, rows_per_pass: int = 96,
                          progress: bool = True) -> torch.Tensor:
    """(n_layers, n_heads): drop in the task metric on positive prompts when one head's
    output is replaced by its mean over the negative prompts (per position, right-aligned).
    All heads of a layer run in batched passes: copy h of the prompts ablates head h
    (about ``rows_per_pass`` sequences per pass)."""
    from tqdm.auto import tqdm

    clean = task.metric(last_logits(model, prompts.positive, batch_size), prompts).mean()
    pos, neg = _encode_pair(model, prompts)
    L = n_layers(model)
    effects = torch.zeros(L, resolve_site(model, "head_out.0").n_heads)
    layers = [resolve_site(model, f"resid_post.{layer}") for layer in range(L)]
    resid = []  # the clean residual after each layer: patched passes skip the layers before the head's
    with torch.no_grad(), model.trace(dict(pos)):
        for site in layers:
            resid.append(site.read().save())
    for layer in tqdm(range(L), desc="patch heads", disable=not progress, leave=False):
        site = resolve_site(model, f"head_out.{layer}")
        H = site.n_heads
        with model.trace(dict(neg)) as tracer:
            z_neg = site.envoy.input.save()
            tracer.stop()
        mean = _right_aligned_mean(z_neg.float(), neg.attention_mask)  # (p, H*dh)
        dh = mean.shape[-1] // H
        metrics = []
        n, per_pass = len(prompts), max(1, rows_per_pass // H)
        for start in range(0, n, per_pass):
            idx = list(range(start, min(n, start + per_pass)))
            ids = pos.input_ids[idx].repeat(H, 1)
            mask = pos.attention_mask[idx].repeat(H, 1)
            with model.trace({"input_ids": ids, "attention_mask": mask}):
                if layer > 0:
                    before = resid[layer - 1][idx].repeat(H, 1, 1)
                    for skipped in layers[:layer]:  # only the last one's output is used downstream
                        skipped.envoy.skip(before)
                z = site.envoy.input
                patched = z.clone()
                for h in range(H):
                    rows = slice(h * len(idx), (h + 1) * len(idx))
                    real = mask[rows].bool().to(z.device)[..., None]
                    head = patched[rows, :, h * dh:(h + 1) * dh]
                    patched[rows, :, h * dh:(h + 1) * dh] = torch.where(
                        real, mean[:, h * dh:(h + 1) * dh].to(z.device, z.dtype), head)
                site.envoy.input = patched
                logits = model.output.logits[:, -1].float().save()
            sub = prompts.subset(idx)
            metrics.append(torch.stack([task.metric(logits[h * len(idx):(h + 1) * len(idx)].cpu(), sub)
                                        for h in range(H)]))  # (H, len(idx))
        effects[layer] = clean - torch.cat(metrics, dim=1).mean(1)
    return effects


def attribution_effects(model, task, prompts, *, batch_size: int = 16) -> torch.Tensor:
    """(n_layers, n_heads): attribution patching, the first-order estimate of
    ``mean_ablation_effects``: -(mean_neg_z - z) . d metric / d z per head, summed
    over positions and averaged over prompts. One forward and backward pass per batch."""
    L = n_layers(model)
    sites = [resolve_site(model, f"head_out.{layer}") for layer in range(L)]
    H = sites[0].n_heads
    pos, neg = _encode_pair(model, prompts)
    width = pos.input_ids.shape[1]
    means = []
    with torch.no_grad(), model.trace(dict(neg)):
        for site in sites:
            means.append(site.envoy.input.save())
    means = [_right_aligned_mean(z.float(), neg.attention_mask) for z in means]
    effects = torch.zeros(L, H)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        enc = {"input_ids": pos.input_ids[idx], "attention_mask": pos.attention_mask[idx]}
        zs, grads = [], []
        with model.trace(enc):
            for site in sites:
                zs.append(site.envoy.input.save())
            metric = task.metric(model.output.logits[:, -1].float(), prompts.subset(idx)).sum()
            with metric.backward():
                for z in reversed(zs):  # the backward pass reaches the last layer first
                    grads.append(z.grad.save())
        grads.reverse()
        mask = enc["attention_mask"][..., None].float()
        for layer in range(L):
            delta = (means[layer] - zs[layer].detach().float()) * mask  # (b, p, H*dh)
            contrib = (delta * grads[layer].float()).reshape(len(idx), width, H, -1).sum(dim=(1, 3))
            effects[layer] -= contrib.sum(0)
    return effects / len(prompts)
