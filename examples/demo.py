"""The main job on the embedded model, offline: train a TopK SAE on SmolLM2's residual
stream, evaluate it, splice it into a trace, look at what it reads on an IOI prompt
(with a feature report page), then find the IOI circuit's attention heads and check
them against exhaustive patching.

Run with `make demo` (about 5 minutes on 2 CPU cores). Results land in demo-out/.
"""

import json
import sys
import time
from pathlib import Path

import torch

import nnsight_sae as ns
from nnsight_sae.circuits import run_circuit, run_reference
from nnsight_sae.pipeline import DataSpec, RunSpec, train_and_evaluate

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
SITE = "resid_post.6"
IOI = "When Mary and John went to the store, John gave a drink to"


def main():
    t = time.perf_counter()
    model = ns.load_model()
    print(f"loaded the embedded SmolLM2-135M-Instruct in {time.perf_counter() - t:.1f}s")

    folder = OUT / "topk-resid_post.6"
    if not (folder / "sae_weights.safetensors").exists():
        print(f"training a TopK SAE (d_sae 4608, k 32) on {SITE} over 100k tokens of the embedded code + prose "
              f"corpus ...")
        train_and_evaluate(model, DataSpec(tokens=100_000, eval_tokens=4096),
                           RunSpec(types=["topk"], sites=[SITE], d_sae=[4608], hyper={"k": 32}, epochs=2),
                           {"lr": 4e-4}, folder)
    ev = json.loads((folder / "eval.json").read_text())
    print(f"eval on held-out text: L0 {ev['l0']:.0f}, FVU {ev['fvu']:.3f}, "
          f"CE {ev['ce_clean']:.3f} clean -> {ev['ce_spliced']:.3f} spliced "
          f"(loss recovered {ev['ce_loss_recovered']:.3f})")

    sae = ns.load_dictionary(folder)
    att = ns.attach(model, sae)
    tok = model.tokenizer
    mary, john = tok(" Mary").input_ids[0], tok(" John").input_ids[0]
    with model.trace(IOI):
        clean = model.output.logits[0, -1].save()
    with model.trace(IOI):
        features = att.splice(error=True).save()
        spliced = model.output.logits[0, -1].save()
    with model.trace(IOI):
        att.splice(error=False)
        bare = model.output.logits[0, -1].save()
    print(f"\nIOI prompt: {IOI!r}")
    print(f"  logit(Mary) - logit(John): clean {clean[mary] - clean[john]:.2f}, "
          f"SAE spliced with error term {spliced[mary] - spliced[john]:.2f}, "
          f"bare reconstruction {bare[mary] - bare[john]:.2f}")
    last = features[0, -1]
    top = last.topk(5)
    print(f"  {int((last != 0).sum())} features active at the last token; strongest: "
          + ", ".join(f"#{i} ({v:.1f})" for v, i in zip(top.values.tolist(), top.indices.tolist())))
    print(f"\ndictionary, eval.json: {folder}")
    report(model, att, last)
    ioi_circuit(model)


def report(model, att, last):
    """Case studies of the strongest features at the IOI prompt's last token that are not dense
    (firing on under 5% of corpus tokens): an HTML page."""
    from nnsight_sae.corpus import contexts, load_corpus

    last = last.detach()
    active = last.nonzero().flatten()
    tokens = contexts(load_corpus(), model.tokenizer, 128, 8192)
    fires = torch.zeros(len(active))
    for batch in tokens.split(16):
        with torch.no_grad(), model.trace({"input_ids": batch}) as tracer:
            f = att.features()[:, 1:, active].save()
            tracer.stop()
        fires += (f > 0).float().sum((0, 1)).cpu()
    sparse = [(float(last[i]), int(i)) for i, n in zip(active, fires) if n < 0.05 * tokens[:, 1:].numel()]
    features = [i for _, i in sorted(sparse, reverse=True)[:3]]
    out = OUT / "feature-report"
    r = ns.run_analysis("feature-report", model=model, dictionary=att.dictionary, out_dir=out, features=features,
                        contexts=8, tokens=32_768)
    print(f"\nthe strongest of them that fire on under 5% of tokens, {features}, on 32k corpus tokens:")
    for e in r["features"]:
        tokens = [c["tokens"][c["max_position"]] for c in e["contexts"][:5]]
        promoted = [t["token"] for t in e["ablation"]["lowered"][:5]] if "ablation" in e else []
        print(f"  #{e['feature']}: fires on {100 * e['frequency']:.2f}% of tokens, strongest on {tokens}; "
              f"ablating it lowers {promoted}")
    print(f"  page: {out / 'feature-report.html'} (open it in a browser)")


def ioi_circuit(model):
    """The default circuit method on held-out IOI prompts, against the patching reference."""
    reference = OUT / "reference-ioi"
    if not (reference / "reference.json").exists():
        print("\nIOI reference: mean-ablating each of the 270 heads in turn on 40 prompts (about 3 min, once) ...")
        run_reference(model, "ioi", reference)
    ref = json.loads((reference / "reference.json").read_text())
    print(f"\nIOI reference circuit (top {len(ref['circuit'])} heads by |effect|, {ref['seconds']:.0f}s): "
          + ", ".join(f"L{layer}H{head}" for layer, head in ref["circuit"][:8]) + ", ...")
    out = OUT / "circuit-ioi"
    c = run_circuit(model, "ioi", out, split="heldout", reference=reference)
    m, f = c["metrics"], c["faithfulness"]
    print(f"circuit --method {c['method']} on 40 held-out IOI prompts (new names, templates, places) "
          f"in {c['seconds']['total']:.1f}s:")
    print("  top heads " + ", ".join(f"L{h['layer']}H{h['head']} ({h['effect']:+.2f})" for h in c["heads"][:8]))
    print(f"  ROC AUC {m['roc_auc']:.3f} against the reference; precision = recall @{m['k']} "
          f"{m['precision_at_k']:.2f}")
    print(f"  the top {f['k']} heads alone keep {f['top_k']:.0%} of the logit difference; the {f['k']} of largest "
          f"positive effect keep {f['top_k_positive']:.0%}; random {f['k']}-head sets {f['random_k_mean']:.0%}")
    print(f"  plots: {out / 'heads.png'}, {out / 'roc.png'}; scores: {out / 'circuit.json'}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
