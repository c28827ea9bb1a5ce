"""circuit-tracer per-layer transcoders: files its own classes write (circuit-tracer 0.5.0,
TranscoderSet.to_safetensors) read by nnsight-sae give its encode/decode, and files our writer makes
load with its own loader (load_relu_transcoder) and give ours."""

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nnsight_sae import DictionaryError, create_dictionary, load_dictionary, registry

D, F = 16, 64
CT = registry().formats["circuit_tracer"].obj
CONFIG = {"model_kind": "transcoder_set", "model_name": "meta-llama/Llama-3.2-1B",
          "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}


def randn(*shape, std=0.3, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


@pytest.fixture
def slt():
    return pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")


def write_set(slt, folder, jump, skip, config=CONFIG):
    """A 2-layer TranscoderSet built and saved by circuit-tracer itself, + its config.yaml."""
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    layers = {}
    for i in range(2):
        act = JumpReLU(0.6 + randn(F, seed=10 + i).abs(), 0.1) if jump else torch.nn.functional.relu
        tc = slt.SingleLayerTranscoder(D, F, act, i, skip_connection=skip, device=torch.device("cpu"),
                                       dtype=torch.float32)
        with torch.no_grad():
            for j, (n, p) in enumerate(tc.named_parameters()):
                if "threshold" not in n:
                    p.copy_(randn(*p.shape, std=0.1 if n == "W_skip" else 0.3, seed=20 * i + j))
        layers[i] = tc
    ts = slt.TranscoderSet(layers, config["feature_input_hook"], config["feature_output_hook"])
    ts.to_safetensors(str(folder))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return ts


def assert_same(ours, theirs, x):
    with torch.no_grad():
        f, f_ref = ours.encode(x), theirs.encode(x)
        assert 0.05 < (f != 0).float().mean() < 0.7  # a realistic fraction fires
        torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-5)
        skip = ours.skip_term(x)  # ours adds the skip in forward only; theirs in decode
        torch.testing.assert_close(ours.decode(f) + skip, theirs.decode(f_ref, x), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("jump, skip", [(True, True), (False, False)])
def test_reads_what_circuit_tracer_writes(tmp_path, slt, jump, skip):
    ts = write_set(slt, tmp_path, jump, skip)
    x = randn(30, D, std=1.0, seed=7)
    ours = load_dictionary(tmp_path / "layer_1.safetensors")
    assert ours.type_name == ("jumprelu" if jump else "transcoder")
    assert (ours.site, ours.out_site, ours.cfg.skip) == ("mlp_in.1", "mlp_out.1", skip)
    assert ours.cfg.model == CONFIG["model_name"]
    assert not ours.cfg.apply_b_dec_to_input
    assert_same(ours, ts[1], x)


@pytest.mark.parametrize("type_name, skip", [("jumprelu", True), ("transcoder", False)])
def test_circuit_tracer_loads_what_we_write(tmp_path, slt, type_name, skip):
    written = {}
    for layer in (0, 1):  # two layers of one set in one folder
        d = create_dictionary(type_name, d_in=D, d_sae=F, site=f"mlp_in.{layer}", out_site=f"mlp_out.{layer}",
                              skip=skip, apply_b_dec_to_input=False, model="meta-llama/Llama-3.2-1B")
        with torch.no_grad():
            for i, (name, p) in enumerate(d.named_parameters()):
                p.copy_(randn(*p.shape, seed=100 * layer + i))
            if type_name == "jumprelu":
                d.threshold.copy_(0.5 + d.threshold.abs())
                d.threshold[:5] = -0.2  # written as 0: relu(x) * (x > t) == x * (x > max(t, 0))
        written[layer] = d
        assert CT.write(d, tmp_path) == tmp_path / f"layer_{layer}.safetensors"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == CONFIG
    x = randn(30, D, std=1.0, seed=8)
    for layer, d in written.items():
        theirs = slt.load_relu_transcoder(str(tmp_path / f"layer_{layer}.safetensors"), layer,
                                          device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
        assert (theirs.W_skip is not None) == skip
        assert_same(d, theirs, x)
        back = load_dictionary(tmp_path / f"layer_{layer}.safetensors")
        assert (back.site, back.out_site, back.cfg.skip) == (d.site, d.out_site, skip)
        assert torch.equal(back(x), d(x))


@pytest.mark.parametrize("hooks, model, sites", [
    (("hook_resid_mid", "hook_mlp_out"), "meta-llama/Llama-3.2-1B", ("resid_mid.1", "mlp_out.1")),
    # circuit-tracer's hook_mlp_out in Gemma 2/3 is post_feedforward_layernorm's output (tl_nnsight_mapping.py)
    (("mlp.hook_in", "hook_mlp_out"), "google/gemma-3-1b-pt",
     ("mlp_in.1", "module:model.layers.1.post_feedforward_layernorm")),
])
def test_hooks_to_sites(tmp_path, hooks, model, sites):
    write_layer(tmp_path, config={**CONFIG, "feature_input_hook": hooks[0], "feature_output_hook": hooks[1],
                                  "model_name": model})
    d = load_dictionary(tmp_path / "layer_1.safetensors")
    assert (d.site, d.out_site) == sites


def write_layer(folder, config=CONFIG, **changes):
    """A ReLU layer_1.safetensors in circuit-tracer's keys and shapes, with changes (None removes a key)."""
    weights = {"W_enc": randn(F, D), "W_dec": randn(F, D, seed=1), "b_enc": randn(F, seed=2), "b_dec": randn(D, seed=3)}
    weights = {k: v for k, v in {**weights, **changes}.items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "layer_1.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    return folder / "layer_1.safetensors"


def test_refusals_name_the_file(tmp_path):
    def refused(path, match):
        with pytest.raises(DictionaryError, match=match) as e:
            load_dictionary(path)
        assert str(path.parent) in str(e.value) and "\n" not in str(e.value)

    refused(write_layer(tmp_path / "a", {**CONFIG, "model_kind": "cross_layer_transcoder"}), "cross-layer")
    refused(write_layer(tmp_path / "b", {k: v for k, v in CONFIG.items() if k != "feature_output_hook"}),
            "missing field 'feature_output_hook'")
    refused(write_layer(tmp_path / "c", {**CONFIG, "feature_input_hook": "hook_foo"}), "no nnsight-sae site")
    refused(write_layer(tmp_path / "d", {**CONFIG, "feature_input_hook": "ln2.hook_normalized"}), "before the norm")
    refused(write_layer(tmp_path / "e", "model_kind: [unclosed"), "not valid YAML")
    refused(write_layer(tmp_path / "f", **{"activation_function.threshold": torch.full((F,), -0.1)}), "negative")
    refused(write_layer(tmp_path / "g", b_enc=torch.zeros(F - 1)), "b_enc has shape")
    refused(write_layer(tmp_path / "h", W_dec=torch.full((F, D), float("nan"))), "NaN")
    refused(write_layer(tmp_path / "i", b_dec=None), "Missing key")
    truncated = write_layer(tmp_path / "j")
    truncated.write_bytes(truncated.read_bytes()[:200])
    refused(truncated, "not a valid safetensors")


def test_writer_refuses_what_circuit_tracer_cannot_hold(tmp_path):
    sae = create_dictionary("relu", d_in=D, d_sae=F, site="resid_post.1")
    with pytest.raises(DictionaryError, match="transcoders"):
        CT.write(sae, tmp_path / "a")
    raw = create_dictionary("transcoder", d_in=D, d_sae=F, site="mlp_in.1",
                            out_site="module:model.layers.1.post_feedforward_layernorm")
    with pytest.raises(DictionaryError, match="TransformerLens hooks"):
        CT.write(raw, tmp_path / "b")
    CT.write(create_dictionary("transcoder", d_in=D, d_sae=F, site="mlp_in.0"), tmp_path / "c")
    with pytest.raises(DictionaryError, match="feature_input_hook"):  # one set, one pair of hooks
        CT.write(create_dictionary("transcoder", d_in=D, d_sae=F, site="resid_mid.1", out_site="mlp_out.1"),
                 tmp_path / "c")
    assert not any(p.name.startswith(".") for p in (tmp_path / "c").iterdir())  # no temporary files left


def test_detect_claims_only_layer_files_beside_a_config(tmp_path):
    layer = write_layer(tmp_path / "set")
    assert CT.detect(layer)
    assert not CT.detect(tmp_path / "set") and not CT.detect(tmp_path / "set" / "config.yaml")
    other = tmp_path / "other"
    other.mkdir()
    save_file(load_file(layer), other / "layer_1.safetensors")  # no config.yaml
    save_file(load_file(layer), other / "sae_weights.safetensors")
    (other / "cfg.json").write_text("{}")
    assert not any(CT.detect(p) for p in (other, other / "layer_1.safetensors", other / "sae_weights.safetensors"))
