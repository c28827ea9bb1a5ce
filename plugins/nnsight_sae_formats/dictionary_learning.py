"""saprmarks/dictionary_learning's layout: a trainer folder with ``ae.pt`` (a state dict saved by
``torch.save``) and ``config.json`` (``{"trainer": {...}, "buffer": {...}}``).

Facts below are from dictionary-learning 0.1.0 (``dictionary_learning/dictionary.py``, ``utils.py``,
``training.py``, ``buffer.py``, ``trainers/*.py``). ``ae.pt`` is read with
``torch.load(weights_only=True)`` only: a pickle that is not a plain tensor state dict is refused
without running anything. Read only.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from nnsight_sae.errors import DictionaryError
from nnsight_sae.files import Format, build, check_tensors, read_json

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ae.pt, unpickled only by torch's weights-only unpickler."""
    if not file.is_file():
        raise DictionaryError(f"{file} is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about a pickle's protocol on its way to refusing it
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":  # weights_only met something it will not run
            # torch 2.13's message: advice, then a line such as "Trying to load unsupported GLOBAL posix.mkdir ..."
            detail = next((line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()), "")
            raise DictionaryError(f"{file} is not a plain tensor state dict; it was refused without being run "
                                  f"(torch.load weights_only=True{': ' + detail if detail else ''})") from None
        # a truncated or foreign file: torch raises RuntimeError, EOFError, ...
        first = re.split(r"(?<=\.)\s", str(e).strip(), maxsplit=1)[0]  # torch's first sentence, not its advice
        raise DictionaryError(f"{file} is not a readable torch.save file (truncated?): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise DictionaryError(f"{file} is not a plain tensor state dict (it holds a {type(state).__name__}"
                              f"{' with keys ' + str(sorted(map(str, state))) if isinstance(state, dict) else ''})")
    return state


# submodule_name is free text, None unless the trainer config gives it (GitHub HEAD's tests/test_end_to_end.py:
# "resid_post_layer_3"; README.md's released sets sit in folders such as mlp_out_layer1). buffer.py
# ActivationBuffer's io: the submodule's input or output ("out" by default; a config has no "buffer" when
# the data was a plain iterator).
_KINDS = (("resid", ("resid",)), ("mlp", ("mlp",)), ("attn", ("attn", "attention")))
_SITES = {("resid", "out"): "resid_post", ("resid", "in"): "resid_pre", ("mlp", "out"): "mlp_out",
          ("mlp", "in"): "mlp_in", ("attn", "out"): "attn_out"}


def site_of(trainer: dict, buffer: dict, where: Path) -> str:
    """Our site for the trainer's submodule_name and layer and the buffer's io."""
    name, layer, io = trainer.get("submodule_name"), trainer.get("layer"), buffer.get("io", "out")
    kind = next((k for k, words in _KINDS if any(w in str(name).lower() for w in words)), None)
    if isinstance(layer, bool) or not isinstance(layer, int):
        m = re.search(r"layer_?(\d+)", str(name))
        if not m:
            raise DictionaryError(f"{where}: trainer.layer {layer!r} is not a layer number")
        layer = int(m[1])
    if kind is None or (kind, io) not in _SITES:
        raise DictionaryError(f"{where}: submodule_name {name!r} with io {io!r} has no nnsight-sae site (understood: "
                              f"names containing resid, mlp or attn; io 'out', or 'in' for resid and mlp)")
    return f"{_SITES[kind, io]}.{layer}"


# One converter per dictionary class: (our type, its options, its weights) from a state dict w, checked
# against D = activation_dim, F = dict_size. nn.Linear stores (out, in) and computes x @ W.T.

def _linear(D, F):
    return {"encoder.weight": (F, D), "encoder.bias": (F,), "decoder.weight": (D, F)}


def _from_linear(w, b_dec):
    return {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].T,
            "b_dec": w[b_dec]}


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")  # nn.Parameter layouts, the same as ours


def _params(D, F):
    return {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}


def autoencoder(w, D, F, trainer, where):
    """dictionary.py AutoEncoder: relu(encoder(x - bias)); decoder(f) + bias."""
    check_tensors(w, {**_linear(D, F), "bias": (D,)}, where)
    enc, enc_b, dec = w["encoder.weight"], w["encoder.bias"], w["decoder.weight"]
    # utils.load_dictionary -> AutoEncoder.from_pretrained(normalize_decoder=True) -> normalize_decoder: unless
    # every decoder column has norm 1 (allclose), divide the columns by their norms and multiply the encoder
    # rows and bias by them (the same outputs; each feature scales by its norm). The same ops as theirs.
    norms = torch.norm(dec, dim=0)
    if not torch.allclose(norms, torch.ones_like(norms)):
        dec, enc, enc_b = dec / norms, enc * norms[:, None], enc_b * norms
    return "relu", {}, {"W_enc": enc.T, "b_enc": enc_b, "W_dec": dec.T, "b_dec": w["bias"]}


def autoencoder_new(w, D, F, trainer, where):
    """dictionary.py AutoEncoderNew: relu(encoder(x)); decoder(f), the decoder with a bias (not renormalised)."""
    check_tensors(w, {**_linear(D, F), "decoder.bias": (D,)}, where)
    return "relu", {"apply_b_dec_to_input": False}, _from_linear(w, "decoder.bias")


def gated(w, D, F, trainer, where):
    """dictionary.py GatedAutoEncoder: our gated math (b_dec subtracted first), in their names."""
    check_tensors(w, {"encoder.weight": (F, D), "decoder.weight": (D, F), "decoder_bias": (D,), "r_mag": (F,),
                      "gate_bias": (F,), "mag_bias": (F,)}, where)
    return "gated", {}, {"W_enc": w["encoder.weight"].T, "W_dec": w["decoder.weight"].T, "b_dec": w["decoder_bias"],
                         "r_mag": w["r_mag"], "b_gate": w["gate_bias"], "b_mag": w["mag_bias"]}


def jumprelu(w, D, F, trainer, where):
    """dictionary.py JumpReluAutoEncoder: relu(pre * (pre > threshold)), which is ours, relu(pre) * (pre >
    threshold). b_dec is not subtracted: apply_b_dec_to_input is a plain attribute, never saved, False unless
    the object was built from SAELens."""
    check_tensors(w, {**_params(D, F), "threshold": (F,)}, where)
    return "jumprelu", {"apply_b_dec_to_input": False}, {k: w[k] for k in (*PARAMS, "threshold")}


def _k(w, F, trainer, where):
    """k from the config, which must agree with the k buffer (as the classes' from_pretrained checks)."""
    k = trainer.get("k", int(w["k"]))
    config = where.parent / CONFIG_FILE
    if isinstance(k, bool) or not isinstance(k, int) or k != int(w["k"]):
        raise DictionaryError(f"{config}: k={k!r} differs from {WEIGHTS_FILE}'s k={int(w['k'])}")
    if not 1 <= k <= F:
        raise DictionaryError(f"{config}: k={k} is out of range for {F} features")
    return k


def topk(w, D, F, trainer, where):
    """trainers/top_k.py AutoEncoderTopK: relu(encoder(x - b_dec)), then each row's top k (encode's default
    use_threshold=False: the threshold buffer is unused). Ours takes the top k, then ReLU: the same features."""
    check_tensors(w, {**_linear(D, F), "b_dec": (D,), "k": (), "threshold": ()}, where)
    return "topk", {"k": _k(w, F, trainer, where)}, _from_linear(w, "b_dec")


def batchtopk(w, D, F, trainer, where):
    """trainers/batch_top_k.py BatchTopKSAE: encode's default use_threshold=True keeps relu(pre) * (relu(pre) >
    threshold), one scalar (-1 until training sets it): the same as ours, relu(pre) * (pre > threshold), for any
    threshold. Ours is per feature: broadcast."""
    check_tensors(w, {**_linear(D, F), "b_dec": (D,), "k": (), "threshold": ()}, where)
    weights = _from_linear(w, "b_dec")
    weights["threshold"] = w["threshold"].to(weights["W_enc"].dtype).expand(F).clone()
    return "batchtopk", {"k": _k(w, F, trainer, where)}, weights


def matryoshka(w, D, F, trainer, where):
    """trainers/matryoshka_batch_top_k.py MatryoshkaBatchTopKSAE: BatchTopKSAE's inference math, then features
    from group_indices[active_groups] on are zeroed; from_pretrained builds it with active_groups =
    len(group_sizes), so that index is dict_size and nothing is zeroed. Its __init__ asserts the group sizes
    are positive and sum to dict_size."""
    groups = w.get("group_sizes", torch.zeros(()))
    check_tensors(w, {**_params(D, F), "k": (), "threshold": (), "group_sizes": tuple(groups.shape)}, where)
    if groups.ndim != 1 or (groups <= 0).any() or int(groups.sum()) != F:
        raise DictionaryError(f"{where}: group_sizes {groups.tolist()} must be positive and sum to dict_size {F}")
    weights = {k: w[k] for k in PARAMS}
    weights["threshold"] = w["threshold"].to(weights["W_enc"].dtype).expand(F).clone()
    return "batchtopk", {"k": _k(w, F, trainer, where)}, weights


# utils.load_dictionary's classes
CONVERTERS = {"AutoEncoder": autoencoder, "AutoEncoderNew": autoencoder_new, "GatedAutoEncoder": gated,
              "JumpReluAutoEncoder": jumprelu, "AutoEncoderTopK": topk, "BatchTopKSAE": batchtopk,
              "MatryoshkaBatchTopKSAE": matryoshka}


class DictionaryLearningFormat(Format):
    """dictionary_learning: a trainer folder with ae.pt + config.json."""

    name = "dictionary_learning"
    help = "saprmarks/dictionary_learning trainer folder (ae.pt + config.json); read only"
    library = "dictionary-learning 0.1.0"
    hub_files = (WEIGHTS_FILE, CONFIG_FILE)
    writes = False

    def detect(self, path):
        return path.is_dir() and (path / WEIGHTS_FILE).is_file()

    def read(self, path):
        where = path / CONFIG_FILE
        config = read_json(where)
        trainer, buffer = config.get("trainer"), config.get("buffer") or {}
        if not isinstance(trainer, dict) or not isinstance(buffer, dict):
            raise DictionaryError(f"{where}: expected {{\"trainer\": {{...}}, \"buffer\": {{...}}}} (training.py)")
        cls, D, F = trainer.get("dict_class"), trainer.get("activation_dim"), trainer.get("dict_size")
        if not isinstance(cls, str) or cls not in CONVERTERS:
            raise DictionaryError(f"{where}: dict_class {cls!r} is not supported (supported: {', '.join(CONVERTERS)})")
        if not all(isinstance(n, int) and n > 0 for n in (D, F)):
            raise DictionaryError(f"{where}: trainer.activation_dim and dict_size must be positive integers")
        site = site_of(trainer, buffer, where)
        file = path / WEIGHTS_FILE
        # every class's from_pretrained loads the state dict into float32 parameters (then computes there)
        w = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(file).items()}
        type_name, own, weights = CONVERTERS[cls](w, D, F, trainer, file)
        # training.py writes ae.pt with the biases already scaled back by any norm_factor: raw units
        options = {"d_in": D, "d_sae": F, "site": site, "model": trainer.get("lm_name"), "dtype": "float32", **own}
        return build(type_name, options, weights, file)
