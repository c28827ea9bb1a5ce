import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nnsight_sae import (DictionaryError, SiteError, attach, create_dictionary, load_dictionary,
                         registry, resolve_site, save_dictionary)
from nnsight_sae.files import hook_of_site
from nnsight_sae.remote_check import check_remote_safe, traced_modules
from nnsight_sae.testing import FAMILIES, tiny_prompts

PROMPTS = tiny_prompts(n=2, length=7)
TYPES = ["relu", "topk", "batchtopk", "jumprelu", "gated", "transcoder", "discrete"]


def make(type_name, d_in=32, d_sae=64, site="resid_post.1", seed=0, **cfg):
    """A dictionary with random, non-trivial values in every parameter."""
    if type_name == "transcoder":
        site, cfg = "mlp_in.1", {"out_site": "mlp_out.1", **cfg}
    d = create_dictionary(type_name, d_in=d_in, d_sae=d_sae, site=site, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "threshold" in name else 0.3))
        if hasattr(d, "threshold"):
            d.threshold.abs_()
    return d


def test_all_types_registered():
    assert set(TYPES) <= set(registry().dictionary_types)


@pytest.mark.parametrize("type_name", TYPES + ["relu-tied", "transcoder-skip"])
def test_round_trip_is_bit_exact(tmp_path, type_name):
    extra = {"relu-tied": {"tied": True}, "transcoder-skip": {"skip": True}}.get(type_name, {})
    d = make(type_name.split("-")[0], **extra)
    save_dictionary(d, tmp_path / "d", model_name="tiny")
    back = load_dictionary(tmp_path / "d")
    assert type(back) is type(d) and back.cfg == d.cfg
    for key, value in d.file_state().items():  # a tied ReLU's copies refreshed from its decoder
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.randn(5, 32)
    assert torch.equal(back(x), d(x))
    assert {p.name for p in (tmp_path / "d").iterdir()} == {"cfg.json", "sae_weights.safetensors"}


def test_tied_relu_decoder_is_encoder_transpose():
    d = create_dictionary("relu", d_in=8, d_sae=16, site="resid_post.0", tied=True)
    with torch.no_grad():
        d.W_dec.mul_(3.0)
    d.normalize_decoder()
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(16))
    assert torch.equal(d.W_enc, d.W_dec.T) and not d.b_dec.any()
    assert not d.W_enc.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("type_name", TYPES)
def test_splice_with_error_term_reproduces_clean_logits(tiny_models, family, type_name):
    model = tiny_models(family)
    att = attach(model, make(type_name))
    with model.trace(PROMPTS):
        clean = model.output.logits.save()
    with model.trace(PROMPTS):
        if type_name == "transcoder":
            att.replace_mlp(error=True)
        else:
            att.splice(error=True)
        spliced = model.output.logits.save()
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)
    with model.trace(PROMPTS):
        if type_name == "transcoder":
            att.replace_mlp(error=False)
        else:
            att.splice(error=False)
        bare = model.output.logits.save()
    assert (bare - clean).abs().max() > 1e-4  # without the error term it really is replaced


@pytest.mark.parametrize("type_name", ["relu", "topk", "jumprelu", "gated"])
def test_ablating_a_feature_removes_exactly_its_contribution(tiny_models, type_name):
    model = tiny_models("llama")
    att = attach(model, make(type_name))
    after = resolve_site(model, "resid_pre.2")  # what layer 2 receives = resid_post.1 as written
    with model.trace(PROMPTS):
        x = att.site.read().clone().save()
        f = att.dictionary.encode(x).save()
        att.splice(ablate=[int(f[0, -1].argmax())])
        written = after.read().save()
    j = int(f[0, -1].argmax())
    assert f[0, -1, j] > 0
    expected = x - f[..., j:j + 1] * att.dictionary.W_dec[j]
    torch.testing.assert_close(written, expected, rtol=0, atol=1e-6)


def test_clamp_and_add_edit_only_the_chosen_features(tiny_models):
    model = tiny_models("gpt2")
    att = attach(model, make("relu"))
    after = resolve_site(model, "resid_pre.2")
    with model.trace(PROMPTS):
        x = att.site.read().clone().save()
        f = att.dictionary.encode(x).save()
        edited = att.splice(clamp={3: 2.0}, add={5: -1.0}).save()
        written = after.read().save()
    W = att.dictionary.W_dec
    expected = x + (2.0 - f[..., 3:4]) * W[3] + (-1.0) * W[5]
    torch.testing.assert_close(written, expected, rtol=0, atol=1e-5)
    assert torch.all(edited[..., 3] == 2.0)
    others = [i for i in range(64) if i not in (3, 5)]
    assert torch.equal(edited[..., others], f[..., others])


def test_features_inside_a_trace_match_encoding_the_site(tiny_models):
    model = tiny_models("gemma2")
    att = attach(model, make("topk", k=4))
    with model.trace(PROMPTS):
        x = att.site.read().save()
        f = att.features().save()
    assert torch.equal(f, att.dictionary.encode(x))
    assert ((f != 0).sum(-1) <= 4).all()


def test_transcoder_replacement_skips_the_mlp(tiny_models):
    model = tiny_models("llama")
    att = attach(model, make("transcoder", skip=True))
    assert att.mlp is not None
    with model.trace(PROMPTS):
        x = att.site.read().clone().save()
        att.replace_mlp()
        mlp_out = att.out_site.read().save()
    torch.testing.assert_close(mlp_out, att.dictionary(x), rtol=0, atol=1e-6)


def test_steering_applies_at_every_generated_token(tiny_models):
    model = tiny_models("llama")
    att = attach(model, make("relu"))
    prompt = PROMPTS[0]
    with model.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
        plain = tracer.result.save()
    seen = []  # created outside: appends from inside the trace land in it
    with model.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
        for _ in tracer.iter[:4]:
            f = att.splice(add={7: 50.0})
            seen.append(f[..., 7].min().item())
        steered = tracer.result.save()
    assert len(seen) == 4 and min(seen) >= 50.0  # the edit was applied at each of the 4 steps
    assert not torch.equal(plain, steered)


def test_in_trace_code_is_remote_safe():
    modules = traced_modules()
    assert "nnsight_sae.traced" in modules and "nnsight_sae_saes.topk" in modules
    assert check_remote_safe(*modules) == []


def test_remote_checker_catches_disallowed_imports(tmp_path, monkeypatch):
    (tmp_path / "nnsight_sae_badtraced.py").write_text(
        "import torch\nimport json\n\ndef f(x):\n    from abc import ABC\n    return x\n")
    monkeypatch.syspath_prepend(tmp_path)
    problems = check_remote_safe("nnsight_sae_badtraced")
    assert problems == ["nnsight_sae_badtraced:2 imports json", "nnsight_sae_badtraced:5 imports abc"]


def test_splice_runs_through_nnsight_remote_simulation(tiny_models):
    model = tiny_models("llama")
    att = attach(model, make("topk", k=4))
    with model.trace(PROMPTS):
        clean = model.output.logits.save()
    with model.trace(PROMPTS, remote="local"):
        f = att.splice(ablate=[0]).save()
        logits = model.output.logits.save()
    assert f.shape == (2, 7, 64) and logits.shape == clean.shape


# ---- SAELens compatibility -------------------------------------------------

def _write_saelens_folder(folder, cfg, weights):
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae_weights.safetensors")


@pytest.mark.parametrize("flat", [False, True], ids=["v6", "pre6-flat"])
def test_hand_written_saelens_folder_loads_and_reconstructs(tmp_path, flat, tiny_models):
    g = torch.Generator().manual_seed(1)
    w = {"W_enc": torch.randn(32, 48, generator=g), "b_enc": torch.randn(48, generator=g),
         "W_dec": torch.randn(48, 32, generator=g), "b_dec": torch.randn(32, generator=g)}
    if flat:  # SAELens < 6: hook fields at the top level, activation_fn_str
        cfg = {"d_in": 32, "d_sae": 48, "dtype": "torch.float32", "device": "cpu", "hook_point": "blocks.1.hook_resid_pre",
               "model_name": "tiny", "activation_fn_str": "relu", "apply_b_dec_to_input": True,
               "normalize_activations": "none"}
    else:
        cfg = {"d_in": 32, "d_sae": 48, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.1.hook_resid_pre",
                            "model_name": "tiny"}, "architecture": "standard"}
    _write_saelens_folder(tmp_path / "s", cfg, w)
    d = load_dictionary(tmp_path / "s")
    assert d.type_name == "relu" and d.site == "resid_pre.1"
    x = torch.randn(4, 32, generator=g)
    reference = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(d(x), reference, rtol=1e-6, atol=1e-5)
    attach(tiny_models("llama"), d)  # the translated hook name is a site of this model


@pytest.mark.parametrize("type_name, arch", [("relu", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu"),
                                             ("jumprelu", "jumprelu"), ("gated", "gated"),
                                             ("transcoder", "transcoder")])
def test_our_files_use_saelens_names(tmp_path, type_name, arch):
    d = make(type_name)
    save_dictionary(d, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    keys = set(load_file(tmp_path / "d" / "sae_weights.safetensors"))
    assert cfg["architecture"] == arch and cfg["metadata"]["hook_name"] == hook_of_site(d.site)
    assert cfg["metadata"]["hook_name"].startswith("blocks.1.") and cfg["metadata"]["nnsight_sae"]["site"] == d.site
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    assert {"W_enc", "W_dec", "b_dec"} <= keys
    assert ("b_enc" in keys) == (type_name != "gated")
    assert ("threshold" in keys) == (arch == "jumprelu")


# ---- bad input ---------------------------------------------------------------

def _saved(tmp_path, **kw):
    folder = save_dictionary(make("topk", **kw), tmp_path / "d")
    return folder, json.loads((folder / "cfg.json").read_text())


def test_d_in_mismatch_is_caught_before_model_work(tiny_models):
    model = tiny_models("llama")
    d = make("topk", d_in=16)
    with pytest.raises(DictionaryError, match="d_in=16 does not match site 'resid_post.1'.*width 32"):
        attach(model, d)


def test_a_dictionary_for_another_model_is_refused_or_warned_about(tiny_models):
    model = tiny_models("llama")
    other = make("topk", d_in=16, model="HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(DictionaryError, match=r"width 32\); it was made for HuggingFaceTB/SmolLM2-135M"):
        attach(model, other)
    same_width = make("topk", model="HuggingFaceTB/SmolLM2-135M")
    with pytest.warns(UserWarning, match="made for 'HuggingFaceTB/SmolLM2-135M', not 'llama"):
        attach(model, same_width)


def test_site_from_another_family(tiny_models):
    d = make("relu", site="module:transformer.h.1")
    with pytest.raises(SiteError, match="no module 'transformer.h.1'"):
        attach(tiny_models("llama"), d)


@pytest.mark.parametrize("corrupt, match", [
    (lambda f, c: (f / "cfg.json").write_text(json.dumps(c)[:40]), "not valid JSON"),
    (lambda f, c: (f / "cfg.json").write_text(json.dumps({**c, "architecture": "mystery", "metadata": {}})),
     "unknown architecture 'mystery'"),
    (lambda f, c: (f / "cfg.json").write_text(json.dumps(
        {**c, "metadata": {**c["metadata"], "nnsight_sae": {**c["metadata"]["nnsight_sae"], "type": "mystery"}}})),
     "dictionary type 'mystery' is not registered"),
    (lambda f, c: (f / "cfg.json").write_text(json.dumps(
        {**c, "metadata": {**c["metadata"], "nnsight_sae": {**c["metadata"]["nnsight_sae"], "d_sae": 65}}})),
     r"W_(enc|dec) has shape"),
    (lambda f, c: save_file({**load_file(f / "sae_weights.safetensors"),
                             "b_dec": torch.full((32,), float("nan"))}, f / "sae_weights.safetensors"),
     "b_dec contains NaN"),
    (lambda f, c: save_file({k: v for k, v in load_file(f / "sae_weights.safetensors").items() if k != "b_enc"},
                            f / "sae_weights.safetensors"), r'Missing key\(s\) in state_dict: "b_enc"'),
    (lambda f, c: (f / "sae_weights.safetensors").write_bytes(b"\x00" * 20), "not a valid safetensors"),
    (lambda f, c: (f / "cfg.json").unlink(), "not a dictionary in any layout nnsight-sae reads"),
])
def test_bad_files_are_clear_errors_and_nothing_is_modified(tmp_path, corrupt, match):
    folder, cfg = _saved(tmp_path)
    corrupt(folder, cfg)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DictionaryError, match=match):
        load_dictionary(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_save_over_an_existing_folder_is_atomic(tmp_path):
    folder, _ = _saved(tmp_path)
    d2 = make("topk", seed=5)
    save_dictionary(d2, folder)
    assert torch.equal(load_dictionary(folder).W_enc, d2.W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or backup folders left


@pytest.mark.slow
@pytest.mark.parametrize("type_name", TYPES)
def test_splice_on_the_embedded_model(smol, type_name):
    site = "mlp_in.6" if type_name == "transcoder" else "resid_post.6"
    d = make(type_name, d_in=576, d_sae=1024, site=site)
    if type_name == "transcoder":
        d.cfg.out_site = "mlp_out.6"
    att = attach(smol, d)
    prompt = ["When Mary and John went to the store, John gave a drink to", "def f(x):"]
    with smol.trace(prompt):
        clean = smol.output.logits.save()
    with smol.trace(prompt):
        (att.replace_mlp if type_name == "transcoder" else att.splice)(error=True)
        spliced = smol.output.logits.save()
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-4)
    with smol.trace(prompt):
        (att.replace_mlp if type_name == "transcoder" else att.splice)(error=False)
        bare = smol.output.logits.save()
    assert (bare - clean).abs().max() > 0.1


def test_padded_batches_match_each_prompt_alone(tiny_models):
    """Left padding: a prompt's features in a padded batch equal its features alone, and the
    padded positions are excluded from the harvested rows that statistics are computed on."""
    from nnsight_sae.harvest import harvest

    model = tiny_models("llama")
    att = attach(model, make("topk", k=4))
    short, long = "w5 w6 w7", "w8 w9 w10 w11 w12 w13"
    with model.trace([short, long]):
        both = att.features().save()
    with model.trace(short):
        alone = att.features().save()
    enc = model.tokenizer([short, long], return_tensors="pt", padding=True)
    assert model.tokenizer.padding_side == "left" and enc.attention_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(both[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
    rows = next(harvest(model, ["resid_post.1"], enc.input_ids, attention_mask=enc.attention_mask,
                        progress=False))["resid_post.1"]
    assert len(rows) == 9  # 3 + 6 real tokens, no padding
