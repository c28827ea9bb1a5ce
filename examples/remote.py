"""What a remote trace sends: a dictionary spliced into SmolLM2 through nnsight's local
simulation of the NDIF round trip, with the request sizes printed.

    python examples/remote.py                      # simulated here (no network)
    NDIF_API_KEY=... python examples/remote.py --ndif meta-llama/Llama-3.1-8B   # on NDIF

Every request is checked the way NDIF takes it (size limit, import allow-list) before it
leaves; a dictionary's weights travel with every request that uses it.
"""

import argparse

import torch

import nnsight_sae as ns
from nnsight_sae.models import trace_options
from nnsight_sae.remote import last_request_bytes

PROMPT = "When Mary and John went to the store, John gave a drink to"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ndif", metavar="HUB_ID", help="run on NDIF with this model instead of simulating")
    args = parser.parse_args()
    model = ns.load_model(args.ndif, remote=True) if args.ndif else ns.load_model(remote="local")
    d_in = ns.resolve_site(model, "resid_post.6").d_in
    for width in (8 * d_in, 32 * d_in):
        sae = ns.create_dictionary("topk", d_in=d_in, d_sae=width, site="resid_post.6", k=32)
        attached = ns.attach(model, sae)
        with torch.no_grad(), model.trace(PROMPT, **trace_options(model)):
            features = attached.splice().save()
            logits = model.output.logits.save()
        weights = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
        print(f"TopK SAE d_sae={width:>6}: weights {weights / 2**20:6.1f} MiB, request {last_request_bytes(model) / 2**20:6.1f} MiB; "
              f"features {tuple(features.shape)}, logits {tuple(logits.shape)}")
    with torch.no_grad(), model.trace(PROMPT, **trace_options(model)):
        logits = model.output.logits.save()
    print(f"the same trace without a dictionary: request {last_request_bytes(model) / 2**10:.0f} KiB")


if __name__ == "__main__":
    main()
