"""An out-of-tree plugin: the ``relu6`` dictionary type and the ``top-features`` analysis."""

import torch

from nnsight_sae import Analysis, Dictionary, attach, hookimpl


class Relu6SAE(Dictionary):
    """A ReLU SAE whose activations are capped at ``cap`` (default 6)."""

    type_name = "relu6"
    defaults = {"cap": 6.0}

    def encode(self, x):
        return torch.clamp(self.pre_acts(x), 0.0, self.cfg["cap"])


class TopFeatures(Analysis):
    """The features with the largest mean activation on a prompt."""

    name = "top-features"
    help = "the features with the largest mean activation on a prompt"

    def add_arguments(self, parser):
        parser.add_argument("--prompt", default="def add(a, b):\n    return a + b")
        parser.add_argument("--n", type=int, default=5)

    def run(self, *, model, dictionary, out_dir, options):
        prompt = options.get("prompt", "def add(a, b):\n    return a + b")
        n = int(options.get("n", 5))
        att = attach(model, dictionary)
        with model.trace(prompt):
            features = att.features().save()
        mean = features[0].mean(0)
        values, indices = mean.topk(min(n, mean.numel()))
        return {"prompt": prompt, "features": [{"index": int(i), "mean": float(v)}
                                               for v, i in zip(values, indices)]}


@hookimpl
def nnsight_sae_dictionary_types():
    return [Relu6SAE]


@hookimpl
def nnsight_sae_analyses():
    return [TopFeatures()]
