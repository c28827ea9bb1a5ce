"""Gemma Scope files read by nnsight-sae match SAELens' own Gemma Scope loaders (sae-lens 6.54.12,
loading/pretrained_sae_loaders.py), run on the same local files with its Hub download redirected."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nnsight_sae import DictionaryError, create_dictionary, load_dictionary, registry, save_dictionary

D, F = 16, 64
GS = registry().formats["gemma_scope"].obj
POST_FF = "module:model.layers.3.post_feedforward_layernorm"


def params(d_in=D, d_out=D, seed=0):
    """Published-layout weights (W_enc (d_in, F), W_dec (F, d_out)) with about a fifth of features firing."""
    rng = np.random.default_rng(seed)
    return {"W_enc": (rng.standard_normal((d_in, F)) * 0.3).astype(np.float32),
            "W_dec": (rng.standard_normal((F, d_out)) * 0.3).astype(np.float32),
            "b_enc": (rng.standard_normal(F) * 0.2).astype(np.float32),
            "b_dec": (rng.standard_normal(d_out) * 0.2).astype(np.float32),
            "threshold": (0.8 + np.abs(rng.standard_normal(F)) * 0.5).astype(np.float32)}


def write_gs1(root, repo, folder, p):
    path = root / repo / folder / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **p)
    return path


def write_gs2(root, repo, folder, p, skip=None, config=None):
    path = root / repo / folder / "params.safetensors"
    path.parent.mkdir(parents=True)
    tensors = {k.lower(): torch.from_numpy(v) for k, v in p.items()}
    if skip is not None:
        tensors["affine_skip_connection"] = torch.from_numpy(skip)  # (d_in, d_out)
    save_file(tensors, path)
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def saelens(monkeypatch):
    """load(loader, repo_id, folder, file, **cfg_overrides) -> SAELens' SAE, through its real loader."""
    loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")
    from sae_lens import SAE

    def load(loader, repo_id, folder, file, **overrides):
        def download(repo_id, filename, subfolder=None, **kw):  # every file it asks for is in file's folder
            local = file.parent / filename.rsplit("/", 1)[-1]
            if not local.exists():
                raise loaders.EntryNotFoundError(f"{filename} not in the local repo")
            return str(local)

        def shapes(repo_id, filename, *a, **k):
            return {key: list(v.shape) for key, v in load_file(file).items()}

        monkeypatch.setattr(loaders, "hf_hub_download", download)
        monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
        cfg, state, _ = getattr(loaders, loader)(repo_id, folder, cfg_overrides=overrides or None)
        sae = SAE.from_dict(loaders.handle_config_defaulting(cfg))
        sae.load_state_dict(state)
        return sae.eval(), cfg

    return load


def assert_same(ours, theirs, d_in=D):
    x = torch.randn(40, d_in, generator=torch.Generator().manual_seed(1))
    # SAELens takes attn.hook_z as (..., n_heads, d_head) and flattens it (4 heads here)
    x_theirs = x.view(40, 4, -1) if theirs.cfg.reshape_activations == "hook_z" else x
    with torch.no_grad():
        f, f_ref = ours.encode(x), theirs.encode(x_theirs)
        assert 0.05 < (f != 0).float().mean() < 0.6  # a realistic fraction fires
        torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(f), theirs.decode(f_ref).reshape(40, -1), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x_theirs).reshape(40, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("repo, d_in, hook, site", [
    ("models--google--gemma-scope-2b-pt-res/snapshots/0a1b2c", D, "blocks.3.hook_resid_post", "resid_post.3"),
    ("gemma-scope-9b-pt-mlp", D, "blocks.3.hook_mlp_out", POST_FF),  # Gemma 2's hook_mlp_out: after the post-MLP norm
    ("gemma-scope-2b-pt-att", 24, "blocks.3.attn.hook_z", "attn_z.3"),
])
def test_gemma_scope_1_matches_saelens(tmp_path, saelens, repo, d_in, hook, site):
    folder = "layer_3/width_16k/average_l0_71"
    file = write_gs1(tmp_path, repo, folder, params(d_in=d_in, d_out=d_in))
    ours = load_dictionary(file.parent)
    repo_id = "google/" + repo.split("/")[0].rsplit("--", 1)[-1]
    theirs, cfg = saelens("gemma_2_sae_huggingface_loader", repo_id, folder, file, d_in=d_in, d_sae=F)
    assert cfg["hook_name"] == hook and cfg["apply_b_dec_to_input"] is False
    assert (ours.type_name, ours.site, ours.out_site, ours.cfg.apply_b_dec_to_input) == ("jumprelu", site, None, False)
    assert ours.cfg.model == "google/" + cfg["model_name"]
    assert_same(ours, theirs, d_in)


@pytest.mark.parametrize("folder, config, site, out_site", [
    ("resid_post/layer_3_width_16k_l0_small", None, "resid_post.3", None),
    ("attn_out_all/layer_3_width_16k_l0_big", None, "attn_z.3", None),
    ("mlp_out/layer_3_width_65k_l0_medium", None, POST_FF, None),
    ("transcoder/layer_3_width_16k_l0_medium", None, "mlp_in.3", POST_FF),
    ("transcoder/layer_3_width_16k_l0_medium_affine",
     {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt", "affine_connection": True,
      "hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output",
      "hf_hook_point_out": "model.layers.3.post_feedforward_layernorm.output"}, "mlp_in.3", POST_FF),
    ("resid_post/layer_9_width_16k_l0_small",  # config.json's hook point wins over the folder name
     {"architecture": "jump_relu", "model_name": "google/gemma-3-1b-pt", "hf_hook_point_in": "model.layers.3.output",
      "hf_hook_point_out": "model.layers.3.output"}, "resid_post.3", None),
])
def test_gemma_scope_2_matches_saelens(tmp_path, saelens, folder, config, site, out_site):
    affine = folder.endswith("_affine")
    skip = (np.random.default_rng(2).standard_normal((D, D)) * 0.1).astype(np.float32) if affine else None
    repo = "models--google--gemma-scope-2-1b-pt/snapshots/abc"
    file = write_gs2(tmp_path, repo, folder, params(seed=3), skip, config)
    ours = load_dictionary(file)
    theirs, cfg = saelens("gemma_3_sae_huggingface_loader", "google/gemma-scope-2-1b-pt", folder, file)
    assert (ours.site, ours.out_site, ours.cfg.skip) == (site, out_site, affine)
    assert ours.cfg.model == cfg["model_name"] == "google/gemma-3-1b-pt"
    assert_same(ours, theirs)


def test_threshold_is_strict(tmp_path):
    p = params()
    p["threshold"] = np.abs(p["b_enc"])  # at x = 0 the features with b_enc > 0 sit exactly on their threshold
    d = load_dictionary(write_gs1(tmp_path, "gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_5", p))
    on_threshold = d.pre_acts(torch.zeros(1, D)) == d.threshold
    assert on_threshold.sum() > 10
    assert not d.encode(torch.zeros(1, D)).any()
    with torch.no_grad():  # a hair below, they fire
        d.threshold.copy_(torch.nextafter(d.threshold, torch.tensor(-1.0)))
    assert torch.equal(d.encode(torch.zeros(1, D)) != 0, on_threshold)


class Boom:
    """Unpickling this would record it: the reader must refuse the object array without doing so."""

    def __reduce__(self):
        return (UNPICKLED.append, ("unpickled",))


UNPICKLED = []


def test_refusals_name_the_file(tmp_path):
    def refused(path, match):
        with pytest.raises(DictionaryError, match=match) as e:
            load_dictionary(path)
        assert str(path.parent) in str(e.value) and "\n" not in str(e.value)

    folder = "layer_3/width_16k/average_l0_5"
    refused(write_gs1(tmp_path, "gemma-scope-2b-pt-transcoders", folder, params()), "ln2.hook_normalized")
    refused(write_gs1(tmp_path, "gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6", params()), "rescales")
    refused(write_gs1(tmp_path, "my-saes", folder, params()), "no config")
    bad = params()
    bad["b_enc"] = bad["b_enc"][:-1]
    refused(write_gs1(tmp_path / "a", "gemma-scope-2b-pt-res", folder, bad), "b_enc has shape")
    bad = params()
    bad["W_dec"][0, 0] = np.nan
    refused(write_gs1(tmp_path / "b", "gemma-scope-2b-pt-res", folder, bad), "NaN")
    bad = params()
    del bad["threshold"]
    refused(write_gs1(tmp_path / "c", "gemma-scope-2b-pt-res", folder, bad), "threshold")
    pickled = write_gs1(tmp_path / "d", "gemma-scope-2b-pt-res", folder, {**params(), "extra": np.array([Boom()])})
    refused(pickled, "object arrays")
    assert UNPICKLED == []
    truncated = write_gs1(tmp_path / "e", "gemma-scope-2b-pt-res", folder, params())
    truncated.write_bytes(truncated.read_bytes()[:500])
    refused(truncated, "not a valid .npz")

    repo = "gemma-scope-2-1b-pt"
    tc = write_gs2(tmp_path, repo, "transcoder/layer_3_width_16k_l0_small", params())
    tc.write_bytes(tc.read_bytes()[:300])
    refused(tc, "not a valid safetensors")
    p = params()
    p["W_dec"] = np.stack([p["W_dec"]] * 2, axis=1)  # a CLT decoder (F, n_layers_out, d)
    refused(write_gs2(tmp_path, repo, "transcoder/layer_4_width_16k_l0_small", p), "cross-layer")
    clt = write_gs2(tmp_path, repo, "clt/x", params())
    refused(clt.rename(clt.parent.parent / "width_16k_l0_small.safetensors"), "cross-layer")
    refused(write_gs2(tmp_path, repo, "resid_post/layer_5_width_16k_l0_small", params(),
                      config={"architecture": "jump_relu", "hf_hook_point_in": "blocks.5.hook_foo"}), "hook point")
    refused(write_gs2(tmp_path, repo, "resid_post/layer_6_width_16k_l0_small", params(),
                      config={"architecture": "topk"}), "architecture")
    refused(write_gs2(tmp_path, repo, "weird/layer_7", params()), "no site")


def test_detect_claims_only_gemma_scope(tmp_path):
    gs1 = write_gs1(tmp_path, "gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_5", params())
    gs2 = write_gs2(tmp_path, "gemma-scope-2-1b-pt", "resid_post/layer_3_width_16k_l0_small", params())
    assert all(GS.detect(p) for p in (gs1, gs1.parent, gs2, gs2.parent))
    ours = save_dictionary(create_dictionary("jumprelu", d_in=4, d_sae=8, site="resid_post.0"), tmp_path / "ours")
    sparsify = tmp_path / "sparsify" / "layers.3"
    sparsify.mkdir(parents=True)
    (sparsify / "cfg.json").write_text("{}")
    save_file({"W_dec": torch.zeros(2, 2)}, sparsify / "sae.safetensors")
    tracer = tmp_path / "tracer"
    tracer.mkdir()
    (tracer / "config.yaml").write_text("model_kind: transcoder_set\n")
    save_file({"W_enc": torch.zeros(2, 2)}, tracer / "layer_0.safetensors")
    dl = tmp_path / "trainer_0"
    dl.mkdir()
    (dl / "config.json").write_text("{}")
    (dl / "ae.pt").write_bytes(b"")
    others = (ours, ours / "sae_weights.safetensors", sparsify, sparsify / "sae.safetensors", tracer,
              tracer / "layer_0.safetensors", dl, dl / "config.json")
    assert not any(GS.detect(p) for p in others)
