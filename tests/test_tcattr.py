"""Weights-based transcoder attribution (tc-attribution) on tiny models: the parts add up to
the target, single contributions match a computation by hand, files, bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch
import transformers

from nnsight_sae import OptionError, attach, run_analysis, save_dictionary
from nnsight_sae.testing import random_dictionary
from nnsight_sae_features.common import FeatureError
from nnsight_sae_features.tcattr import attribute, capture, split, target_node

IDS = [2, 17, 40, 9, 33, 61, 12]  # the tiny vocabulary's word ids


def transcoder(layer, seed=None):
    return random_dictionary(f"mlp_in.{layer}", type_name="transcoder", out_site=f"mlp_out.{layer}",
                             seed=layer if seed is None else seed)


def most_active(cap, layer):
    return int(cap.transcoders[layer].acts[-1].argmax())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # qwen2: value biases
def test_parts_add_up_to_the_target(tiny_models, family):
    model = tiny_models(family)
    tcs = [transcoder(layer) for layer in range(3)]
    for d in tcs:
        attach(model, d)
    cap = capture(model, IDS, tcs)
    j = most_active(cap, 2)
    root = target_node(cap, layer=2, feature=j)
    assert math.isclose(root.value, float(tcs[2].pre_acts(cap.layers[2].mlp_in[-1].float()).detach()[j]), rel_tol=1e-5)
    checks = attribute(cap, root, depth=4, width=6)
    assert checks["relative_error"] < 1e-4 and checks["max_relative_error"] < 1e-4
    assert math.isclose(checks["sum_of_parts"], root.value, rel_tol=1e-4)
    assert math.isclose(sum(checks["by_kind"].values()), root.value, rel_tol=1e-4)
    assert {"embedding", "feature", "error", "head", "bias"} <= set(checks["by_kind"])
    # the search went through heads into earlier positions and features
    nodes, stack = [], [root]
    while stack:
        n = stack.pop()
        nodes.append(n)
        stack += n.children
    assert any(n.kind == "head" and n.children for n in nodes)
    assert {n.pos for n in nodes} != {len(IDS) - 1}

    # a token's logit, with every MLP split by its transcoder
    unembed = model._module.lm_head.weight
    w = torch.zeros(len(unembed))
    w[50], w[60], w[70] = 1.0, -0.5, -0.5  # a logit difference
    logit = target_node(cap, logit_weights=w, unembed=unembed, text="w45 - (w55 + w65) / 2")
    logits = cap.logits[-1]
    assert math.isclose(logit.value, float(logits[50] - (logits[60] + logits[70]) / 2), rel_tol=1e-9)
    checks = attribute(cap, logit, depth=2, width=5)
    assert checks["relative_error"] < 1e-4
    assert {"feature", "error", "head", "embedding"} <= set(checks["by_kind"])


@torch.no_grad()
def test_contributions_match_a_computation_by_hand(tiny_models, tmp_path):
    """Feature i of layer 0 into feature j of layer 2: directly z_i (d_i . u_j), and through head h
    of layer 1 A[p, q] z_i(q) (W_O W_V (s_q g d_i)) . u_j, the pattern and norms read from the
    plain transformers model (eager attention), not from our capture."""
    model = tiny_models("llama")
    tcs = [transcoder(0), transcoder(2)]
    cap = capture(model, IDS, tcs)
    j = most_active(cap, 2)
    root = target_node(cap, layer=2, feature=j)
    parts = split(cap, root)

    hf = transformers.AutoModelForCausalLM.from_pretrained(model._module.config.name_or_path,
                                                           attn_implementation="eager").double()
    layers, eps = hf.model.layers, hf.config.rms_norm_eps
    resid_mid = {}  # the input of each layer's MLP norm, by a plain torch hook
    for n, layer in enumerate(layers):
        layer.post_attention_layernorm.register_forward_pre_hook(lambda _, args, n=n: resid_mid.update({n: args[0][0]}))
    with torch.no_grad():
        out = hf(torch.tensor([IDS]), output_attentions=True, output_hidden_states=True)
    hidden = [h[0] for h in out.hidden_states]  # the residual stream before each layer

    def rms(x):
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    p = len(IDS) - 1
    u = rms(resid_mid[2][p]) * layers[2].post_attention_layernorm.weight * tcs[1].W_enc[:, j].double()

    d0 = tcs[0]
    z0 = d0.encode(layers[0].post_attention_layernorm(resid_mid[0]).float()).double()
    i = int(z0[p].argmax())
    direct = [n for n in parts if n.kind == "feature" and n.layer == 0 and n.index == i and n.pos == p]
    assert len(direct) == 1
    assert math.isclose(direct[0].value, float(z0[p, i] * (d0.W_dec[i].double() @ u)), rel_tol=1e-5)

    # through head h of layer 1, from an earlier position q
    h, q = 3, 2
    head = next(n for n in parts if n.kind == "head" and n.layer == 1 and n.index == h)
    via = split(cap, head)
    attn1 = layers[1].self_attn
    hd, group = attn1.head_dim, h // attn1.num_key_value_groups
    W_V = attn1.v_proj.weight[group * hd:(group + 1) * hd]
    W_O = attn1.o_proj.weight[:, h * hd:(h + 1) * hd]
    A = out.attentions[1][0, h, p, q]
    s_q = rms(hidden[1][q])
    for k in z0[q].nonzero().flatten().tolist()[:5]:
        hand = float(A * z0[q, k] * (W_O @ (W_V @ (s_q * layers[1].input_layernorm.weight * d0.W_dec[k].double()))) @ u)
        ours = [n for n in via if n.kind == "feature" and n.layer == 0 and n.index == k and n.pos == q]
        assert len(ours) == 1 and math.isclose(ours[0].value, hand, rel_tol=1e-5, abs_tol=1e-9)


def test_analysis_files_and_graph(tiny_models, tmp_path):
    model = tiny_models("llama")
    target, up = transcoder(2), [transcoder(0), transcoder(1)]
    folders = [str(save_dictionary(d, tmp_path / f"tc{i}")) for i, d in enumerate(up)]
    prompt = "w10 w20 w30 w40 w50 w60"
    cap = capture(model, model.tokenizer(prompt)["input_ids"], [target])
    j = most_active(cap, 2)
    out = tmp_path / "out"
    r = run_analysis("tc-attribution", model=model, dictionary=target, out_dir=out, prompt=prompt, feature=j,
                     upstream=folders, depth=3, width=3)
    assert json.loads((out / "tc-attribution.json").read_text()) == r
    assert (out / "tc-attribution.png").stat().st_size > 5000
    assert r["tokens"] == prompt.split() and r["transcoders"] == ["mlp_in.2", "mlp_in.0", "mlp_in.1"]
    assert r["relative_error"] < 1e-4
    tree = r["tree"]
    assert tree["label"] == f"tc2 #{j} @'w60'" and math.isclose(tree["value"], r["value"], rel_tol=1e-5)
    assert len(tree["children"]) == 3
    assert math.isclose(sum(c["value"] for c in tree["children"]) + tree["rest"], r["value"], rel_tol=1e-4)
    values = [abs(c["value"]) for c in tree["children"]]
    assert values == sorted(values, reverse=True)
    kinds = {c["kind"] for c in _walk(tree)}
    assert "feature" in kinds and "head" in kinds

    # one transcoder: a logit's parts include that layer's features; MLPs 0 and 1 stay whole
    r = run_analysis("tc-attribution", model=model, dictionary=target, out_dir=tmp_path / "logit", prompt=prompt,
                     target_token="w7", depth=1, width=200)
    assert r["target"] == {"token": "w7", "token_id": 12} and r["relative_error"] < 1e-4
    children = r["tree"]["children"]
    assert {(c["kind"], c["layer"]) for c in children if c["kind"] in ("feature", "mlp", "error")} >= {
        ("feature", 2), ("mlp", 0), ("mlp", 1), ("error", 2)}


def _walk(tree):
    yield tree
    for c in tree.get("children", []):
        yield from _walk(c)


def test_bad_input(tiny_models, tmp_path):
    model = tiny_models("llama")
    prompt = "w10 w20 w30 w40"

    def run(dictionary, **options):
        return run_analysis("tc-attribution", model=model, dictionary=dictionary, out_dir=tmp_path / "x",
                            prompt=prompt, **options)

    with pytest.raises(FeatureError, match="needs transcoders from mlp_in.L to mlp_out.L; got a topk reading "
                                           "resid_post.1"):
        run(random_dictionary("resid_post.1"), feature=1)
    other_layer = random_dictionary("mlp_in.1", type_name="transcoder", out_site="mlp_out.2")
    with pytest.raises(FeatureError, match="got a transcoder reading mlp_in.1 and writing mlp_out.2"):
        run(other_layer, feature=1)
    other_model = transcoder(1)
    other_model.cfg.model = "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(FeatureError, match="trained on 'HuggingFaceTB/SmolLM2-135M'"):
        run(other_model, feature=1)
    up = str(save_dictionary(transcoder(2), tmp_path / "up"))
    with pytest.raises(FeatureError, match="must come before the target's layer 1"):
        run(transcoder(1), feature=1, upstream=[up])
    with pytest.raises(OptionError, match="depth must be at least 1"):
        run(transcoder(1), feature=1, depth=0)
    with pytest.raises(FeatureError, match="give one target"):
        run(transcoder(1))
    with pytest.raises(FeatureError, match="--target-token must be one token; 'w1 w2' is 2"):
        run(transcoder(1), target_token="w1 w2")
    with pytest.raises(FeatureError, match="out of range"):
        run(transcoder(1), feature=64)
    d = transcoder(1)
    cap = capture(model, model.tokenizer(prompt)["input_ids"], [d])
    zero = int(cap.transcoders[1].acts[-1].argmin())
    top = int(cap.transcoders[1].acts[-1].argmax())
    assert cap.transcoders[1].acts[-1, zero] == 0
    with pytest.raises(FeatureError, match=rf"feature {zero} of the transcoder at mlp_in.1 is zero at the prompt's "
                                           rf"last token \('w40'\); the most active there: #{top} \("):
        run(d, feature=zero)
    gpt2 = tiny_models("gpt2")
    with pytest.raises(FeatureError, match="decomposes pre-norm RMSNorm models .*the Llama family.*; gpt2 is not one"):
        run_analysis("tc-attribution", model=gpt2, dictionary=transcoder(1), out_dir=tmp_path / "g", prompt=prompt,
                     feature=1)
    assert not (tmp_path / "x").exists()


def test_cli(tiny_models, tmp_path):
    model = tiny_models("llama")
    folder = str(save_dictionary(transcoder(2), tmp_path / "tc"))
    cmd = [sys.executable, "-m", "nnsight_sae", "analyze", "tc-attribution", "--dict", folder, "--model",
           model._module.config.name_or_path, "--prompt", "w10 w20 w30", "--target-token", "w9",
           "--out", str(tmp_path / "out")]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "tc-attribution.json").read_text())["relative_error"] < 1e-4
    bad = subprocess.run(cmd[:-2] + ["--depth", "0", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["nnsight-sae analyze: error: analysis 'tc-attribution': depth must be at least 1, got 0"]
    assert not (tmp_path / "bad").exists()
