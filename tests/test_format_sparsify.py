"""EleutherAI sparsify's layout (cfg.json + sae.safetensors per hook point), checked against eai-sparsify
1.3.3's own code: SparseCoder builds and saves (save_to_disk) and loads (load_from_disk) and computes."""

import json
import shutil

import pytest
import torch

pytest.importorskip("sparsify")
from safetensors.torch import load_file, save_file  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

from nnsight_sae import DictionaryError, create_dictionary, load_dictionary, save_dictionary  # noqa: E402
from nnsight_sae.files import formats  # noqa: E402
from nnsight_sae_formats.sparsify import SparsifyFormat  # noqa: E402

D, F, K = 16, 64, 6


def coder(bias=0.0, seed=0, **cfg):
    """A sparsify coder with random non-trivial weights; ``bias`` shifts the encoder bias."""
    sc = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "W_skip" else 0.3))
        sc.encoder.bias.add_(bias)
    return sc


def sparsify_outputs(sc, x):
    """(dense features, decode, forward) by sparsify's own encode, decode and forward."""
    with torch.no_grad():
        acts, indices, _ = sc.encode(x)
        f = torch.zeros(len(x), sc.num_latents).scatter(-1, indices, acts)
        return f, sc.decode(acts, indices), sc(x).sae_out


def assert_same(ours, sc, x):
    f, y, out = sparsify_outputs(sc, x)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), f, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(f), y, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), out, rtol=0, atol=1e-5)
    return f


X = torch.randn(32, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("hook, cfg, sites", [
    ("layers.2", {}, ("resid_post.2", None)),
    ("layers.2", {"transcode": True}, ("resid_pre.2", "resid_post.2")),
    ("layers.2.mlp", {}, ("mlp_out.2", None)),
    ("layers.2.mlp", {"transcode": True, "skip_connection": True}, ("mlp_in.2", "mlp_out.2")),
    ("h.2.attn", {}, ("attn_out.2", None)),
])
def test_features_and_outputs_match_sparsify(tmp_path, hook, cfg, sites):
    sc = coder(**cfg)
    sc.save_to_disk(tmp_path / hook)
    d = load_dictionary(tmp_path / hook)
    skip = cfg.get("skip_connection", False)
    assert (d.type_name, d.site, d.out_site, d.cfg.k, d.cfg.skip) == ("topk", *sites, K, skip)
    f = assert_same(d, sc, X)
    assert ((f > 0).sum(-1) == K).all()


def test_relu_then_topk_equals_topk_then_relu_when_few_fire(tmp_path):
    """sparsify takes ReLU, then the top k; ours the top k, then ReLU: the same, also when fewer than k are positive."""
    sc = coder(bias=-1.2)
    sc.save_to_disk(tmp_path / "layers.1")
    f = assert_same(load_dictionary(tmp_path / "layers.1"), sc, X)
    assert ((f > 0).sum(-1) < K).any() and (f > 0).any()


@pytest.mark.parametrize("folder, site", [("gpt_neox.layers.3", "resid_post.3"), ("layers.4.attention", "attn_out.4"),
                                          ("model.layers.0.self_attn", "attn_out.0"), ("h.1.mlp", "mlp_out.1"),
                                          ("layers.5/seed7", "resid_post.5")])
def test_site_from_hook_point_folder(tmp_path, folder, site):
    coder().save_to_disk(tmp_path / folder)
    assert load_dictionary(tmp_path / folder).site == site


def test_run_config_names_the_model(tmp_path):
    coder().save_to_disk(tmp_path / "run" / "layers.1")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "tiny/lm", "sae": {}}))
    assert load_dictionary(tmp_path / "run" / "layers.1").cfg.model == "tiny/lm"


def ours(site="resid_post.1", seed=0, **cfg):
    d = create_dictionary("topk", d_in=D, d_sae=F, site=site, k=K, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return d


@pytest.mark.parametrize("cfg", [{}, {"apply_b_dec_to_input": False},
                                 {"site": "mlp_in.1", "out_site": "mlp_out.1", "apply_b_dec_to_input": False,
                                  "skip": True}], ids=["sae", "sae-no-b_dec-input", "skip-transcoder"])
def test_written_files_load_in_sparsify(tmp_path, cfg):
    d = ours(**cfg)
    transcode = d.out_site is not None
    folder = SparsifyFormat().write(d, tmp_path / ("layers.1.mlp" if transcode else "layers.1"))
    expected = SparseCoderConfig(expansion_factor=F // D, num_latents=F, k=K, transcode=transcode,
                                 skip_connection=d.cfg.skip).to_dict()
    assert json.loads((folder / "cfg.json").read_text()) == {**expected, "d_in": D}
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # atomic: nothing else left
    sc = SparseCoder.load_from_disk(folder)  # strict: exactly sparsify's keys and shapes
    assert_same(d, sc, X)
    back = load_dictionary(folder)
    assert (back.site, back.out_site) == (d.site, d.out_site)
    torch.testing.assert_close(back(X), d(X), rtol=0, atol=1e-5)


def test_writer_refuses_other_types_and_warns_on_a_misleading_name(tmp_path):
    relu = create_dictionary("relu", d_in=D, d_sae=F, site="resid_post.1")
    with pytest.raises(DictionaryError, match="TopK coders only; this dictionary is 'relu'"):
        SparsifyFormat().write(relu, tmp_path / "layers.1")
    assert not (tmp_path / "layers.1").exists()
    with pytest.warns(UserWarning, match=r"'layers.1.mlp' reads back as site\(s\) \('mlp_out.1', None\)"):
        SparsifyFormat().write(ours(), tmp_path / "layers.1.mlp")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sparsify") / "layers.2"
    coder().save_to_disk(folder)
    return folder


def test_detect_claims_only_its_own_layout(tmp_path, saved):
    assert next(f.name for f in formats() if f.detect(saved)) == "sparsify"
    dl = tmp_path / "trainer_0"
    dl.mkdir()
    (dl / "config.json").write_text("{}")
    (dl / "ae.pt").write_bytes(b"")
    our_folder = save_dictionary(ours(), tmp_path / "ours")
    assert not SparsifyFormat().detect(dl) and not SparsifyFormat().detect(our_folder)
    assert not SparsifyFormat().detect(saved / "sae.safetensors")
    assert [f.name for f in formats() if f.detect(our_folder)] == ["saelens"]


def _cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _weights(folder, drop=(), **tensors):
    weights = {k: v for k, v in load_file(folder / "sae.safetensors").items() if k not in drop}
    save_file({**weights, **tensors}, folder / "sae.safetensors")


@pytest.mark.parametrize("corrupt, match", [
    (lambda f: (f / "cfg.json").write_text((f / "cfg.json").read_text()[:30]), r"cfg\.json is not valid JSON"),
    (lambda f: _cfg(f, activation="groupmax"), r"cfg\.json: activation 'groupmax' is not supported"),
    (lambda f: _cfg(f, k=F + 1), r"cfg\.json: k=65 is out of range for 64 latents"),
    (lambda f: _cfg(f, skip_connection=True), r"cfg\.json: an SAE with a skip connection"),
    (lambda f: _weights(f, **{"encoder.weight": torch.zeros(F, D + 1)}),
     r"sae\.safetensors: encoder.weight has shape \(64, 17\), the config implies \(64, 16\)"),
    (lambda f: _weights(f, b_dec=torch.full((D,), float("nan"))), r"sae\.safetensors: b_dec contains NaN"),
    (lambda f: _weights(f, drop=("encoder.bias",)), r"sae\.safetensors: holds \['W_dec', 'b_dec', 'encoder.weight'\]"),
    (lambda f: (f / "sae.safetensors").write_bytes(b"\0" * 20), r"sae\.safetensors is not a valid safetensors file"),
    (lambda f: (f / "cfg.json").unlink(), r"cfg\.json is missing"),
    (lambda f: f.rename(f.with_name("embed_tokens")), r"hook point 'embed_tokens' has no nnsight-sae site"),
])
def test_bad_files_are_clear_errors(tmp_path, saved, corrupt, match):
    folder = shutil.copytree(saved, tmp_path / "layers.2")
    corrupt(folder)
    folder = next(tmp_path.iterdir())
    with pytest.raises(DictionaryError, match=match) as error:
        load_dictionary(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)
