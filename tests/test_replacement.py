"""The replacement model: several MLPs replaced by transcoders in one forward pass."""

import pytest
import torch

from nnsight_sae import DictionaryError, create_dictionary
from nnsight_sae.evaluate import evaluate, replacement_ce
from nnsight_sae.sites import architecture_of, submodule, torch_module
from nnsight_sae.testing import tiny_prompts


def transcoder(layer, seed=0):
    d = create_dictionary("transcoder", d_in=32, d_sae=64, site=f"mlp_in.{layer}", out_site=f"mlp_out.{layer}")
    d.reset_parameters(seed)
    return d


@pytest.fixture
def tokens(tiny_models):
    model = tiny_models("llama")
    return model.tokenizer(tiny_prompts(n=6, length=12, seed=3), return_tensors="pt").input_ids


def mlp_calls(model, layers):
    """Counts forward calls of the given layers' MLPs, by the first projection inside each (a
    skipped module's own hooks still fire; the modules inside it do not run)."""
    arch = architecture_of(model)
    calls = {layer: 0 for layer in layers}
    handles = []
    for layer in layers:
        mlp = submodule(torch_module(model), f"{arch.layers}.{layer}.{arch.mlp}")
        first = next(m for m in mlp.modules() if isinstance(m, torch.nn.Linear))

        def count(module, args, output, layer=layer):
            calls[layer] += 1

        handles.append(first.register_forward_hook(count))
    return calls, handles


def test_error_terms_reproduce_the_clean_model(tiny_models, tokens):
    model = tiny_models("llama")
    r = replacement_ce(model, [transcoder(2, 2), transcoder(0, 0), transcoder(1, 1)], tokens, error=True,
                       progress=False)
    assert r["replaced"] == ["mlp_in.0", "mlp_in.1", "mlp_in.2"]  # forward order, whatever the given order
    assert r["ce_replaced"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["kl"] == pytest.approx(0, abs=1e-6)


def test_replaced_mlps_do_not_run(tiny_models, tokens):
    model = tiny_models("llama")
    calls, handles = mlp_calls(model, [0, 1, 2])
    try:
        one = replacement_ce(model, [transcoder(1)], tokens, progress=False)  # one batch of 6 contexts
        assert calls == {0: 2, 1: 1, 2: 2}  # the clean pass runs every MLP, the replaced pass all but layer 1
        every = replacement_ce(model, [transcoder(0), transcoder(1), transcoder(2)], tokens, progress=False)
        assert calls == {0: 3, 1: 2, 2: 3}
    finally:
        for h in handles:
            h.remove()
    assert every["ce_replaced"] != pytest.approx(every["ce_clean"], abs=1e-3)
    assert one["ce_increase"] == pytest.approx(one["ce_replaced"] - one["ce_clean"])


def test_one_transcoder_matches_evaluate(tiny_models, tokens):
    """drop_bos=True replaces as evaluate() does, so CE matches its ce_spliced."""
    model = tiny_models("llama")
    d = transcoder(1)
    r = replacement_ce(model, [d], tokens, drop_bos=True, progress=False)
    ev = evaluate(model, [d], tokens, progress=False)[0]
    assert r["ce_replaced"] == pytest.approx(ev["ce_spliced"], rel=1e-5)
    assert r["ce_clean"] == pytest.approx(ev["ce_clean"], rel=1e-5)


def test_evaluating_together_equals_evaluating_alone(tiny_models, tokens):
    """evaluate() shares the clean pass, and the zeroed pass between dictionaries writing one site
    (a transcoder and an SAE on mlp_out.1); each result equals the dictionary's own evaluation."""
    model = tiny_models("llama")
    relu = create_dictionary("relu", d_in=32, d_sae=64, site="mlp_out.1")
    resid = create_dictionary("topk", d_in=32, d_sae=64, site="resid_post.0", k=4)
    for seed, d in enumerate((relu, resid), start=1):
        d.reset_parameters(seed)
    dictionaries = [transcoder(1), relu, resid]
    together = evaluate(model, dictionaries, tokens, progress=False)
    for d, got in zip(dictionaries, together):
        alone = evaluate(model, [d], tokens, progress=False)[0]
        assert got.keys() == alone.keys()
        for key, value in alone.items():
            assert got[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    assert together[0]["ce_zero_ablation"] == together[1]["ce_zero_ablation"] != together[2]["ce_zero_ablation"]


def test_bad_input(tiny_models, tokens):
    model = tiny_models("llama")
    sae = create_dictionary("topk", d_in=32, d_sae=64, site="resid_post.1", k=4)
    with pytest.raises(DictionaryError, match="topk at resid_post.1 is not a transcoder"):
        replacement_ce(model, [transcoder(0), sae], tokens, progress=False)
    with pytest.raises(DictionaryError, match="two transcoders read the same site"):
        replacement_ce(model, [transcoder(1), transcoder(1, seed=4)], tokens, progress=False)
