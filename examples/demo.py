"""The main job on the embedded model, offline: train a TopK SAE on SmolLM2's residual
stream, evaluate it, splice it into a trace, and look at what it reads on an IOI prompt.

Run with `make demo` (a few minutes on 2 CPU cores). Results land in demo-out/.
"""

import json
import sys
import time
from pathlib import Path

import torch

import nnsight_sae as ns
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
        print(f"training a TopK SAE (d_sae 4608, k 32) on {SITE} over 100k tokens of the stdlib corpus ...")
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


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
