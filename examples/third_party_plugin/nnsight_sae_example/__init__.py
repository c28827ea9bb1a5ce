"""An out-of-tree plugin: the ``relu6`` dictionary type and the ``top-features`` analysis.

Each declares its options once (``Option``): ``nnsight-sae train --type relu6 --cap 4`` and
``nnsight-sae analyze top-features --n 3`` take them as flags, the API as keywords."""

import torch

from nnsight_sae import Analysis, Dictionary, DictionaryConfig, Option, Options, attach, hookimpl


class Relu6Config(DictionaryConfig):
    cap = Option(float, 6.0, "the largest activation a feature takes", min=0.0)
    l1_coefficient = Option(float, 2e-3, "sparsity penalty (L1 of the features)", min=0.0, flags=("--l1",))


class Relu6SAE(Dictionary):
    """A ReLU SAE whose activations are capped at ``cap`` (default 6)."""

    type_name = "relu6"
    help = "a ReLU SAE whose activations are capped"
    config_class = Relu6Config

    def encode(self, x):
        return torch.clamp(self.pre_acts(x), 0.0, self.cfg.cap)


class TopFeaturesOptions(Options):
    prompt = Option(str, "def add(a, b):\n    return a + b", "the prompt")
    n = Option(int, 5, "features listed", min=1)


class TopFeatures(Analysis):
    """The features with the largest mean activation on a prompt."""

    name = "top-features"
    help = "the features with the largest mean activation on a prompt"
    Options = TopFeaturesOptions

    def run(self, *, model, dictionary, out_dir, options):
        att = attach(model, dictionary)
        with model.trace(options.prompt):
            features = att.features().save()
        mean = features[0].mean(0)
        values, indices = mean.topk(min(options.n, mean.numel()))
        return {"prompt": options.prompt, "features": [{"index": int(i), "mean": float(v)}
                                                       for v, i in zip(values, indices)]}


@hookimpl
def nnsight_sae_dictionary_types():
    return [Relu6SAE]


@hookimpl
def nnsight_sae_analyses():
    return [TopFeatures()]
