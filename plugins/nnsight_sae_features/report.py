"""Feature reports (case studies, Cunningham et al. 2023 section 5): what makes a
feature fire and what it does, as JSON and one self-contained HTML page.

Input side: the corpus contexts where the feature is strongest, with every
token's activation, the histogram of its non-zero activations, and its
de-embedding (the tokens that excite it most with no context, see ``deembed``). Output side:
(1) the next-token log-probabilities that move most when the feature is ablated
at its top contexts (x -> x - c d at every position, error term kept; averaged
over the contexts, at the strongest position), and (2) its decoder direction
through the final norm's weight and the unembedding (the norm's per-token scale
left out: a direction, not a prediction).
"""

from __future__ import annotations

import html

import torch

from nnsight_sae.analysis import Analysis
from nnsight_sae.atomic import write_text
from nnsight_sae.models import model_id
from nnsight_sae.options import Option
from nnsight_sae.sites import architecture_of, submodule, torch_module

from .common import (FEATURES, CorpusOptions, FeatureError, ablation_deltas, bind, check_features, corpus_of,
                     feature_activations, prefix_batch, run_with_additions, site_codes, text_of, top_tokens)
from .deembed import de_embedding


@torch.no_grad()
def direct_logits(model, attached, feature: int) -> torch.Tensor | None:
    """Unembedding x (final norm weight * decoder direction), or None where the decoder
    does not write the residual stream (width differs from the unembedding's input)."""
    root = torch_module(model)
    arch = architecture_of(model)
    unembed = submodule(root, arch.unembed).weight  # (vocab, d_model)
    direction = attached.dictionary.decoder_directions()[feature].detach()
    written = (attached.out_site or attached.site).name
    if direction.shape[0] != unembed.shape[1] or written.startswith("mlp_in"):
        return None
    norm = submodule(root, arch.final_norm) if arch.final_norm else None
    scale = getattr(norm, "weight", None)
    if scale is not None:
        direction = direction * (1 + scale if getattr(root.config, "model_type", "").startswith("gemma") else scale)
    return (unembed.float() @ direction.to(unembed.device).float()).cpu()


@torch.no_grad()
def ablation_effect(model, attached, tokens, rows: list[int], positions: list[int], feature: int) -> torch.Tensor:
    """Mean change of next-token log-probabilities at each context's position when the
    feature is ablated (ablated - clean), over the contexts."""
    enc = prefix_batch(tokens, rows, positions, model.tokenizer.pad_token_id or 0)
    codes, directions = site_codes(model, attached, enc)
    make_delta, write_site = ablation_deltas(attached, codes, directions, [None, feature])
    at = torch.tensor(positions)

    def read(repeats):
        return model.output.logits[torch.arange(len(rows) * repeats), at.repeat(repeats)]

    clean, ablated = run_with_additions(model, enc, write_site, make_delta, 2, read)
    return (ablated.log_softmax(-1) - clean.log_softmax(-1)).mean(0)


def top_contexts(tokenizer, tokens: torch.Tensor, a: torch.Tensor, n_contexts: int, *, before: int = 24,
                 after: int = 4) -> tuple[list[dict], list[int], torch.Tensor]:
    """The ``n_contexts`` corpus contexts where activations ``a`` (n, ctx_len) peak highest, each as
    its tokens around the peak with their activations; also the rows chosen and each row's peak."""
    best, where = a.max(1)
    order = [r for r in best.argsort(descending=True).tolist() if best[r] > 0][:n_contexts]
    out = []
    for r in order:
        p = int(where[r])
        span = range(max(1, p - before), min(a.shape[1], p + after + 1))
        out.append({"max_position": p - span.start, "activation": round(float(best[r]), 4),
                    "tokens": [text_of(tokenizer, tokens[r, j].item()) for j in span],
                    "activations": [round(float(a[r, j]), 4) for j in span]})
    return out, order, where


def feature_report(model, attached, tokens: torch.Tensor, features: list[int], *, n_contexts: int = 10,
                   before: int = 24, after: int = 4, n_tokens: int = 10, bins: int = 30) -> dict:
    """The report's data for each feature (see the module docstring)."""
    tok = model.tokenizer
    acts = feature_activations(model, attached, tokens, features, desc="feature activations")
    try:
        embedding = de_embedding(model, attached.dictionary, features)
    except FeatureError:  # a site the direct path from the embeddings does not reach
        embedding = None
    out = []
    for i, f in enumerate(features):
        a = acts[..., i]
        real = a[:, 1:]  # the first position is left out, as in training
        top = float(a.max())
        entry = {"feature": f, "max_activation": round(top, 4),
                 "frequency": round(float((real > 0).float().mean()), 6), "tokens_read": int(real.numel())}
        nonzero = real[real > 0]
        edges = torch.linspace(0, max(top, 1e-6), bins + 1)
        entry["histogram"] = {"edges": [round(float(e), 4) for e in edges],
                              "counts": torch.histc(nonzero, bins, 0, max(top, 1e-6)).int().tolist()}
        entry["contexts"], order, where = top_contexts(tok, tokens, a, n_contexts, before=before, after=after)
        if order:
            entry["ablation"] = top_tokens(tok, ablation_effect(model, attached, tokens, order,
                                                                 [int(where[r]) for r in order], f), n_tokens)
        logits = direct_logits(model, attached, f)
        if logits is not None:
            entry["direct_logits"] = top_tokens(tok, logits, n_tokens)
        if embedding is not None:
            entry["de_embedding"] = top_tokens(tok, embedding[i], n_tokens)
        out.append(entry)
    return {"features": out}


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h2 { border-top: 1px solid #ccc; padding-top: 14px; }
.stats { color: #555; }
.ctx { font-family: ui-monospace, monospace; font-size: 13px; margin: 3px 0; white-space: pre-wrap; }
.tok { border-radius: 2px; }
.tok.max { outline: 1.5px solid #b34700; }
.cols { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 1px 8px; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
"""


def _token_span(text: str, value: float, top: float, is_max: bool) -> str:
    alpha = 0 if top <= 0 else min(1.0, max(0.0, value / top))
    shown = html.escape(text.replace("\n", "\u21b5"))
    cls = "tok max" if is_max else "tok"
    return (f'<span class="{cls}" style="background: rgba(255, 140, 0, {alpha:.2f})" '
            f'title="{value:.3f}">{shown}</span>')


def _histogram_svg(hist: dict, width: int = 360, height: int = 140) -> str:
    counts = hist["counts"]
    peak = max(counts) or 1
    bar = width / len(counts)
    rects = "".join(f'<rect x="{i * bar:.1f}" y="{height - 20 - c / peak * (height - 30):.1f}" '
                    f'width="{bar - 1:.1f}" height="{c / peak * (height - 30):.1f}" fill="#4a7ab5"/>'
                    for i, c in enumerate(counts))
    edges = hist["edges"]
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">{rects}'
            f'<text x="0" y="{height - 4}" font-size="11">{edges[0]:g}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{edges[-1]:g}</text>'
            f'<text x="{width / 2}" y="{height - 4}" font-size="11" text-anchor="middle">activation '
            f'(non-zero, {sum(counts):,} tokens)</text></svg>')


def _token_table(title: str, rows: list[dict]) -> str:
    body = "".join(f'<tr><td>{html.escape(repr(r["token"]))}</td><td class="num">{r["value"]:+.3f}</td></tr>'
                   for r in rows)
    return f"<table><tr><th colspan=2>{html.escape(title)}</th></tr>{body}</table>"


def render_html(report: dict) -> str:
    """One self-contained page (inline CSS and SVG, no scripts, no network)."""
    head = (f"<h1>Feature report</h1><p class=stats>{html.escape(report['model'])}, dictionary "
            f"{html.escape(report['dictionary'])} at <b>{html.escape(report['site'])}</b>; "
            f"{report['corpus_tokens']:,} corpus tokens read.</p>")
    parts = []
    for e in report["features"]:
        top = e["max_activation"]
        lines = []
        for c in e["contexts"]:
            spans = "".join(_token_span(t, v, top, j == c["max_position"])
                            for j, (t, v) in enumerate(zip(c["tokens"], c["activations"])))
            lines.append(f'<div class=ctx><b>{c["activation"]:.2f}</b>  {spans}</div>')
        tables = []
        if "ablation" in e:
            tables.append(_token_table("ablated: log-prob lowered", e["ablation"]["lowered"]))
            tables.append(_token_table("ablated: log-prob raised", e["ablation"]["raised"]))
        if "de_embedding" in e:
            tables.append(_token_table("de-embedding: excite most (no context)", e["de_embedding"]["raised"]))
        if "direct_logits" in e:
            tables.append(_token_table("decoder x unembedding: top", e["direct_logits"]["raised"]))
            tables.append(_token_table("decoder x unembedding: bottom", e["direct_logits"]["lowered"]))
        parts.append(
            f'<section id="feature-{e["feature"]}"><h2>Feature {e["feature"]}</h2>'
            f'<p class=stats>max activation {top:.3f}; fires on {100 * e["frequency"]:.3f}% of tokens</p>'
            f'<div class=cols><div>{_histogram_svg(e["histogram"])}</div>{"".join(tables)}</div>'
            f'<h3>Top contexts</h3>{"".join(lines) or "<p>never fires on the tokens read</p>"}</section>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Feature report: '
            f'{html.escape(report["site"])}</title><style>{_STYLE}</style></head><body>{head}{"".join(parts)}'
            f'</body></html>')


class FeatureReportOptions(CorpusOptions):
    features = FEATURES
    contexts = Option(int, 10, "top contexts shown per feature", min=1)
    tokens = Option(int, 65_536, "corpus tokens to read", min=1)


class FeatureReport(Analysis):
    name = "feature-report"
    help = "case studies: top contexts, activation histogram, logits moved; an HTML page and JSON"
    Options = FeatureReportOptions

    def run(self, *, model, dictionary, out_dir, options):
        features = check_features(dictionary, options.features)
        attached = bind(model, dictionary)
        tokens = corpus_of(model, options)
        report = {"model": model_id(model), "dictionary": dictionary.type_name, "site": dictionary.site,
                  "corpus_tokens": int(tokens.numel()),
                  **feature_report(model, attached, tokens, features, n_contexts=options.contexts)}
        write_text(out_dir / "feature-report.html", render_html(report))
        report["page"] = "feature-report.html"
        return report
