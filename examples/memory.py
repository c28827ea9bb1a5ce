"""Peak memory of the embedded model with a 16x TopK dictionary spliced on every layer
(the SmolLM2 row of the README's scaling table). CPU, float32; prints peak resident memory."""

import resource

import torch

import nnsight_sae as ns


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def main():
    model = ns.load_model()
    n_params = sum(p.numel() for p in model._module.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters; peak after loading {peak_gb():.2f} GB")
    config = model._module.config
    d, layers = config.hidden_size, config.num_hidden_layers
    attached = [ns.attach(model, ns.create_dictionary("topk", d_in=d, d_sae=16 * d, site=f"resid_post.{layer}",
                                                      k=32))
                for layer in range(layers)]
    per = sum(p.numel() for p in attached[0].dictionary.parameters())
    print(f"{layers} dictionaries of width {16 * d}: {per / 1e6:.2f}M parameters each "
          f"({per * 4 / 1e6:.1f} MB float32); peak {peak_gb():.2f} GB")
    batch = dict(model.tokenizer(["def f(x):\n    return x"] * 8, return_tensors="pt"))
    with torch.no_grad(), model.trace(batch):
        for att in attached:
            att.splice()
        model.output.logits.save()
    print(f"a trace of 8 prompts with all {layers} spliced: peak {peak_gb():.2f} GB")


if __name__ == "__main__":
    main()
