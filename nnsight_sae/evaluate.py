"""Evaluation of dictionaries on held-out contexts: reconstruction and downstream loss."""

from __future__ import annotations

import nnsight
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attach import attach
from .dictionary import Dictionary
from .errors import DictionaryError
from .harvest import forward_order
from .models import trace_options
from .traced import at_positions

DENSE_FRACTION = 0.1  # a feature firing on more than this fraction of tokens counts as dense


def _predicting(logits, mask):
    """Logits (n, vocab) at the positions that predict a real next token, and where they are."""
    keep = (mask[:, 1:] * mask[:, :-1]).bool().to(logits.device)
    return logits[:, :-1][keep].float(), keep


def _next_token_ce(logits, ids, mask):
    """Cross-entropy of predicting ids[t+1] from logits[t], summed over real positions, and the count."""
    predicting, keep = _predicting(logits, mask)
    ce = F.cross_entropy(predicting, ids[:, 1:].to(keep.device)[keep], reduction="sum")
    return float(ce), int(keep.sum())


def _kl(clean_logits, logits, ids, mask):
    """KL(clean || other) summed over positions that predict a real next token."""
    clean, _ = _predicting(clean_logits, mask)
    other, _ = _predicting(logits, mask)
    return float(F.kl_div(other.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="sum"))


class _Accumulator:
    def __init__(self, d: Dictionary):
        self.d = d
        self.rows = 0
        self.sq_err = self.sum = self.sq = self.cos = self.l0 = 0.0
        self.fires = torch.zeros(d.d_sae, dtype=torch.long)
        self.ce = {"spliced": 0.0, "zero": 0.0}
        self.kl = 0.0

    def add_activations(self, x, target, keep):
        d = self.d
        with torch.no_grad():
            # one row per vector (head_out: one per head)
            x = x[keep].float().reshape(-1, x.shape[-1])
            target = target[keep].float().reshape(-1, target.shape[-1])
            f = d.encode(x)
            recon = d.decode(f) + d.skip_term(x)
            self.rows += len(x)
            self.sq_err += float((target - recon).pow(2).sum())
            self.sum = self.sum + target.sum(0)
            self.sq = self.sq + target.pow(2).sum(0)
            self.cos += float(torch.nn.functional.cosine_similarity(target, recon, dim=-1).sum())
            active = f != 0
            self.l0 += float(active.sum())
            self.fires += active.sum(0).cpu()

    def result(self, ce_clean, n_tokens):
        variance = float((self.sq - self.sum.pow(2) / self.rows).sum())
        fvu = self.sq_err / max(variance, 1e-12)
        ce_spliced, ce_zero = self.ce["spliced"] / n_tokens, self.ce["zero"] / n_tokens
        d = self.d
        out = {
            "type": d.type_name, "site": d.site, "d_in": d.d_in, "d_sae": d.d_sae,
            "rows": self.rows,
            "l0": self.l0 / self.rows,
            "mse": self.sq_err / (self.rows * d.d_out),
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "cosine_similarity": self.cos / self.rows,
            "ce_clean": ce_clean,
            "ce_spliced": ce_spliced,
            "ce_zero_ablation": ce_zero,
            "ce_increase": ce_spliced - ce_clean,
            "ce_loss_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_clean) if ce_zero != ce_clean else None,
            "kl_div": self.kl / n_tokens,
            "dead_fraction": float((self.fires == 0).float().mean()),
            "dense_fraction": float((self.fires > DENSE_FRACTION * self.rows).float().mean()),
        }
        if d.out_site:
            out["out_site"] = d.out_site
        return out


@torch.no_grad()
def evaluate(model, dictionaries: list[Dictionary], tokens: torch.Tensor, *,
             attention_mask: torch.Tensor | None = None, batch_size: int = 8, drop_bos: bool = True,
             progress: bool = True) -> list[dict]:
    """Metrics of each dictionary on held-out token contexts.

    L0, MSE, FVU, explained variance, cosine similarity on the site's rows
    (padding excluded); next-token CE clean, with the reconstruction spliced in
    (transcoders: the MLP replaced) and with the site zero-ablated; CE loss
    recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean); KL(clean || spliced);
    dead (never fired) and dense (fired on > 10% of tokens) feature fractions.
    drop_bos: leave each context's first position (BOS, or the attention-sink
    position of models without one) out of the statistics and unspliced, as in training.
    """
    attached = [attach(model, d) for d in dictionaries]
    sites = forward_order(list({s for a in attached for s in (a.site.name, a.out_site.name if a.out_site else None)
                                if s}))
    resolved = {a.site.name: a.site for a in attached} | {a.out_site.name: a.out_site for a in attached if a.out_site}
    acc = [_Accumulator(a.dictionary) for a in attached]
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    bar = tqdm(total=len(tokens), desc="eval", unit="ctx", disable=not progress, leave=False)
    ce_clean, n_tokens = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        ids, mask = tokens[start:start + batch_size], attention_mask[start:start + batch_size]
        inputs = {"input_ids": ids, "attention_mask": mask}
        where = mask.bool().clone()
        if drop_bos:
            where[:, 0] = False
        with model.trace(inputs, **trace_options(model)):
            saved = nnsight.save({})  # made and saved inside: only saved values come back from NDIF
            for s in sites:
                saved[s] = resolved[s].read()
            clean = model.output.logits.save()
        ce, n = _next_token_ce(clean, ids, mask)
        ce_clean, n_tokens = ce_clean + ce, n_tokens + n
        zero_ce = {}  # site -> CE with it zeroed: dictionaries writing one site share the pass
        for a, ac in zip(attached, acc):
            x = saved[a.site.name]
            ac.add_activations(x, saved[a.out_site.name] if a.out_site else x, where.to(x.device))
            with model.trace(inputs, **trace_options(model)):
                if a.out_site is not None:
                    a.replace_mlp(error=False, mask=where)
                else:
                    a.splice(error=False, mask=where)
                spliced = model.output.logits.save()
            zero_site = a.out_site or a.site
            if zero_site.name not in zero_ce:
                with model.trace(inputs, **trace_options(model)):
                    current = zero_site.read()
                    zero_site.write(at_positions(where, torch.zeros_like(current), current))
                    zeroed = model.output.logits.save()
                zero_ce[zero_site.name] = _next_token_ce(zeroed, ids, mask)[0]
            ac.ce["spliced"] += _next_token_ce(spliced, ids, mask)[0]
            ac.ce["zero"] += zero_ce[zero_site.name]
            ac.kl += _kl(clean, spliced, ids, mask)
        bar.update(len(ids))
    bar.close()
    return [ac.result(ce_clean / n_tokens, n_tokens) for ac in acc]


@torch.no_grad()
def replacement_ce(model, transcoders: list[Dictionary], tokens: torch.Tensor, *, error: bool = False,
                   attention_mask: torch.Tensor | None = None, batch_size: int = 8, drop_bos: bool = False,
                   progress: bool = True) -> dict:
    """Next-token CE of the replacement model: every given transcoder replaces its MLP in the
    same forward pass, against the clean model.

    error=False: the MLPs' own compute is skipped (families with one MLP module) and each
    transcoder's prediction is written instead; error=True runs them and keeps each
    transcoder's error term, so the logits equal the clean ones to float tolerance.
    drop_bos=True leaves each context's first position unreplaced, as ``evaluate`` does
    (the MLPs then run). Returns ce_clean, ce_replaced, ce_increase, kl (per token), the
    replaced sites and the token count.
    """
    attached = [attach(model, d) for d in transcoders]
    for a in attached:
        if a.out_site is None:
            raise DictionaryError(f"{a.dictionary.type_name} at {a.site.name} is not a transcoder: "
                                  f"only transcoders replace MLPs")
    names = [a.site.name for a in attached]
    if len(set(names)) != len(names):
        raise DictionaryError(f"two transcoders read the same site: {', '.join(names)}")
    order = forward_order(names)
    attached.sort(key=lambda a: order.index(a.site.name))  # replaced in forward order within the trace
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    totals = {"clean": 0.0, "replaced": 0.0, "kl": 0.0, "n": 0}
    for start in tqdm(range(0, len(tokens), batch_size), desc="replacement model", disable=not progress,
                      leave=False):
        ids, mask = tokens[start:start + batch_size], attention_mask[start:start + batch_size]
        inputs = {"input_ids": ids, "attention_mask": mask}
        where = None
        if drop_bos:
            where = mask.bool().clone()
            where[:, 0] = False
        with model.trace(inputs, **trace_options(model)):
            clean = model.output.logits.save()
        with model.trace(inputs, **trace_options(model)):
            for a in attached:
                a.replace_mlp(error=error, mask=where)
            replaced = model.output.logits.save()
        ce, n = _next_token_ce(clean, ids, mask)
        totals["clean"] += ce
        totals["replaced"] += _next_token_ce(replaced, ids, mask)[0]
        totals["kl"] += _kl(clean, replaced, ids, mask)
        totals["n"] += n
    n = totals["n"]
    return {"replaced": [a.site.name for a in attached], "error_terms": error, "n_tokens": n,
            "ce_clean": totals["clean"] / n, "ce_replaced": totals["replaced"] / n,
            "ce_increase": (totals["replaced"] - totals["clean"]) / n, "kl": totals["kl"] / n}
