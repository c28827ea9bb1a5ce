"""Steer the embedded model by adding one SAE feature at every generated token.

Uses the TopK SAE that `make demo` trains (demo-out/topk-resid_post.6); run the demo first,
or pass another dictionary folder: python examples/steering.py [DICT_DIR]
"""

import sys

import torch

import nnsight_sae as ns

DICT = sys.argv[1] if len(sys.argv) > 1 else "demo-out/topk-resid_post.6"
CODE = "import os\nimport sys\n\ndef main():\n    path = os.path.join(sys.argv[1])\n"
PROMPT = "My favourite season of the year is"


def main():
    model = ns.load_model()
    att = ns.attach(model, ns.load_dictionary(DICT))
    # the feature that fires most on code relative to prose: a "Python source" direction
    with torch.no_grad(), model.trace(CODE):
        code = att.features().save()
    with torch.no_grad(), model.trace("The sun was shining and the birds were singing in the quiet village."):
        prose = att.features().save()
    feature = int((code[0].mean(0) - prose[0].mean(0)).argmax())
    strength = 4 * float(code[0, :, feature].max())
    print(f"feature #{feature}: mean on code {code[0, :, feature].mean():.2f}, on prose {prose[0, :, feature].mean():.2f}")

    n = 24
    with model.generate(PROMPT, max_new_tokens=n, do_sample=False) as tracer:
        plain = tracer.result.save()
    with model.generate(PROMPT, max_new_tokens=n, do_sample=False) as tracer:
        for _ in tracer.iter[:n]:  # one iteration per generation step: the edit applies at every token
            att.splice(add={feature: strength})
        steered = tracer.result.save()
    tok = model.tokenizer
    print(f"\nbefore: {tok.decode(plain[0])!r}")
    print(f"after (+{strength:.1f} x feature #{feature} at {att.site.name}): {tok.decode(steered[0])!r}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
