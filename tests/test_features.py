"""Feature analyses on tiny models: feature patching against PCA, causal trees, feature
reports, their files and their bad-input errors."""

import json
import subprocess
import sys

import pytest
import torch

from nnsight_sae import OptionError, SiteError, attach, create_dictionary, load_dictionary, run_analysis, save_dictionary
from nnsight_sae.testing import WORDS, random_dictionary, tiny_prompts
from nnsight_sae_features.common import FeatureError


def test_feature_patching_curves(tiny_models, counterfactual_task, corpus, tmp_path):
    model = tiny_models("llama")
    d = random_dictionary("resid_post.1")
    out = tmp_path / "fp"
    r = run_analysis("feature-patching", model=model, dictionary=d, out_dir=out, task=counterfactual_task,
                     n_prompts=16, candidates=6, data=corpus, tokens=2000, ctx_len=40)
    assert json.loads((out / "feature-patching.json").read_text()) == r
    assert (out / "feature-patching.png").stat().st_size > 5000
    assert r["n_prompts"] == 16 and r["kl_unpatched"] > 0
    for name in ("sae", "pca"):
        shared, per_prompt = r[name]["shared"], r[name]["per_prompt"]
        assert shared["n"] == per_prompt["n"] == [1, 2, 3, 4, 5, 6]
        assert len(shared["kl"]) == len(per_prompt["kl"]) == 6 and len(set(shared["order"])) == 6
        assert shared["kl_alone"] == sorted(shared["kl_alone"])  # greedy order: best alone first
        # the first point patches the same single direction as the best "alone" run
        assert shared["kl"][0] == pytest.approx(shared["kl_alone"][0], rel=1e-4, abs=1e-6)
        # each prompt's own best direction does at least as well on average as one shared
        assert per_prompt["kl"][0] <= shared["kl"][0] + 1e-6
    # every principal direction patched turns the base activation into the counterfactual's: KL 0
    assert r["pca"]["kl_all_directions"] == pytest.approx(0, abs=1e-5)
    assert r["sae"]["kl_all_directions"] > 1e-4  # a random dictionary's error terms differ


def test_feature_patching_patch_is_the_papers_formula(tiny_models, counterfactual_task):
    """x' = x + sum_j (c_cf_j - c_base_j) f_j, checked against the dictionary by hand."""
    from nnsight_sae.tasks import get_task
    from nnsight_sae_features.patching import Basis, read_site

    model = tiny_models("llama")
    att = attach(model, random_dictionary("resid_post.1"))
    prompts = get_task(counterfactual_task).prompts(model.tokenizer, 4)
    enc = {k: dict(model.tokenizer(p, return_tensors="pt", padding=True))
           for k, p in (("base", prompts.positive), ("cf", prompts.counterfactual))}
    x_base, _ = read_site(model, att.site, enc["base"])
    x_cf, _ = read_site(model, att.site, enc["cf"])
    d = att.dictionary
    with torch.no_grad():
        basis = Basis("sae", d.encode(x_base), d.encode(x_cf), d.decoder_directions())
        by_hand = sum((d.encode(x_cf)[..., j] - d.encode(x_base)[..., j])[..., None] * d.W_dec[j] for j in (3, 7))
        torch.testing.assert_close(basis.patch(torch.tensor([[3, 7]]).expand(4, 2)), by_hand)
        # per prompt: prompt 0 patches feature 3, the others feature 7
        mixed = basis.patch(torch.tensor([[3], [7], [7], [7]]))
        one = lambda j: (d.encode(x_cf)[..., j] - d.encode(x_base)[..., j])[..., None] * d.W_dec[j]  # noqa: E731
        torch.testing.assert_close(mixed[0], one(3)[0])
        torch.testing.assert_close(mixed[1:], one(7)[1:])


def test_feature_patching_bad_input(tiny_models, tmp_path, counterfactual_task):
    model = tiny_models("llama")
    d = random_dictionary("resid_post.1")
    with pytest.raises(FeatureError, match="no counterfactual prompts"):
        run_analysis("feature-patching", model=model, dictionary=d, out_dir=tmp_path, task="docstring")
    rows = [json.loads(line) for line in open(counterfactual_task)]
    del rows[3]["counterfactual"]
    bad = tmp_path / "half.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(Exception, match="counterfactual on every line or on none"):
        run_analysis("feature-patching", model=model, dictionary=d, out_dir=tmp_path, task=str(bad))
    with pytest.raises(OptionError, match="candidates must be at least 1, got 0"):
        run_analysis("feature-patching", model=model, dictionary=d, out_dir=tmp_path, task=counterfactual_task,
                     candidates=0)
    other = random_dictionary("resid_post.1")
    other.cfg.model = "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(FeatureError, match="trained on 'HuggingFaceTB/SmolLM2-135M'"):
        run_analysis("feature-patching", model=model, dictionary=other, out_dir=tmp_path, task=counterfactual_task)
    with pytest.raises(SiteError, match="layer 7 out of range; this model has layers 0..2"):
        run_analysis("feature-patching", model=model, dictionary=random_dictionary("resid_post.7"),
                     out_dir=tmp_path, task=counterfactual_task)
    assert not (tmp_path / "feature-patching.json").exists()


def test_causal_tree_drops_match_ablation_by_hand(tiny_models, corpus, tmp_path):
    from nnsight_sae_features.common import corpus_tokens
    from nnsight_sae_features.tree import ablation_drops, firing_contexts

    model = tiny_models("llama")
    target = attach(model, random_dictionary("resid_post.2", seed=1))
    upstream = attach(model, random_dictionary("resid_post.1", seed=2))
    tokens = corpus_tokens(model, n_tokens=2000, ctx_len=40, data=corpus)
    feature = 5
    ctx = firing_contexts(model, target, tokens, feature, n_contexts=6)
    assert len(ctx["positions"]) == 6
    assert (ctx["activations"] >= ctx["max"] / 2).all()
    keep, clean, drops, strongest = ablation_drops(model, target, upstream, ctx, feature, candidates=10,
                                                   batch_size=24)
    assert len(strongest) == 10
    assert len(keep) == 10 and drops.shape == (10, 6)
    torch.testing.assert_close(clean, ctx["activations"], rtol=1e-4, atol=1e-5)  # right padding changes nothing
    # by hand: the upstream feature ablated with splice (error term kept), one trace
    rows = torch.arange(6)
    for k in (0, 4):
        with torch.no_grad(), model.trace(ctx["enc"]):
            upstream.splice(ablate=[keep[k]])
            after = target.features()[rows, ctx["positions"], feature].save()
        torch.testing.assert_close(drops[k], clean - after, rtol=1e-4, atol=1e-5)


def test_causal_tree_analysis(tiny_models, corpus, tmp_path):
    model = tiny_models("llama")
    chain = [random_dictionary(f"resid_post.{layer}", seed=layer) for layer in (2, 1, 0)]
    folders = []
    for i, d in enumerate(chain[1:]):
        folders.append(save_dictionary(d, tmp_path / f"up{i}"))
    out = tmp_path / "tree"
    r = run_analysis("causal-tree", model=model, dictionary=chain[0], out_dir=out, feature=5,
                     upstream=[str(f) for f in folders], depth=2, width=2, contexts=5, candidates=12,
                     data=corpus, tokens=2000, ctx_len=40)
    assert (out / "causal-tree.png").stat().st_size > 5000
    tree = r["tree"]
    assert tree["feature"] == 5 and tree["site"] == "resid_post.2" and tree["upstream_site"] == "resid_post.1"
    drops = [e["drop"] for e in tree["ranking"]]
    assert drops == sorted(drops, reverse=True) and len(drops) == 10
    assert [c["feature"] for c in tree["children"]] == [e["feature"] for e in tree["ranking"][:2]]
    for child in tree["children"]:  # depth 2: each child explained by the next dictionary up
        assert child["site"] == "resid_post.1" and child["upstream_site"] == "resid_post.0"
        assert len(child["children"]) == 2 and "children" not in child["children"][0]
    assert r["upstream_made"] == []


def test_causal_tree_bad_input(tiny_models, corpus, tmp_path):
    model = tiny_models("llama")
    target = random_dictionary("resid_post.1")
    before = save_dictionary(random_dictionary("resid_post.0"), tmp_path / "before")
    after = save_dictionary(random_dictionary("resid_post.2"), tmp_path / "after")
    common = dict(model=model, dictionary=target, out_dir=tmp_path / "t", data=corpus, tokens=2000, ctx_len=40)
    with pytest.raises(FeatureError, match="feature 64 is out of range: this dictionary has features 0..63"):
        run_analysis("causal-tree", feature=64, upstream=[str(before)], **common)
    with pytest.raises(OptionError, match="depth must be at least 1, got 0"):
        run_analysis("causal-tree", feature=1, upstream=[str(before)], depth=0, **common)
    with pytest.raises(OptionError, match="width must be at least 1, got 0"):
        run_analysis("causal-tree", feature=1, upstream=[str(before)], width=0, **common)
    with pytest.raises(FeatureError, match="resid_post.2 is not before resid_post.1"):
        run_analysis("causal-tree", feature=1, upstream=[str(after)], **common)
    dead = random_dictionary("resid_post.1", type_name="relu")
    with torch.no_grad():
        dead.W_enc[:, 9] = 0
        dead.b_enc[9] = -1
    with pytest.raises(FeatureError, match="feature 9 .* never fires on 2,000 corpus tokens"):
        run_analysis("causal-tree", feature=9, upstream=[str(before)], **{**common, "dictionary": dead})
    with pytest.raises(FeatureError, match="no layer before resid_post.0"):
        run_analysis("causal-tree", feature=1, **{**common, "dictionary": random_dictionary("resid_post.0")})


def test_feature_report(tiny_models, corpus, tmp_path):
    model = tiny_models("gpt2")
    d = random_dictionary("resid_post.1")
    out = tmp_path / "report"
    r = run_analysis("feature-report", model=model, dictionary=d, out_dir=out, features=[3, 11], contexts=4,
                     data=corpus, tokens=2000, ctx_len=40)
    page = (out / "feature-report.html").read_text()
    assert json.loads((out / "feature-report.json").read_text()) == r
    assert [e["feature"] for e in r["features"]] == [3, 11]
    for e in r["features"]:
        assert len(e["contexts"]) == 4
        tops = [c["activation"] for c in e["contexts"]]
        assert tops == sorted(tops, reverse=True) and tops[0] == e["max_activation"]
        for c in e["contexts"]:
            assert c["activations"][c["max_position"]] == c["activation"] == max(c["activations"])
            assert all(t in WORDS for t in c["tokens"])
        assert sum(e["histogram"]["counts"]) == round(e["frequency"] * e["tokens_read"])
        assert len(e["ablation"]["lowered"]) == 10 and len(e["direct_logits"]["raised"]) == 10
        assert len(e["de_embedding"]["raised"]) == 10
        assert f'id="feature-{e["feature"]}"' in page
        top = e["contexts"][0]
        assert f'class="tok max" style="background: rgba(255, 140, 0, 1.00)" title="{top["activation"]:.3f}">' \
               f'{top["tokens"][top["max_position"]]}</span>' in page
    assert "<script" not in page and "http" not in page  # self-contained


def test_direct_logits_match_the_model(tiny_models):
    """Decoder direction x final-norm weight x unembedding, against the model's own modules."""
    from nnsight_sae.sites import torch_module
    from nnsight_sae_features.report import direct_logits

    model = tiny_models("llama")
    att = attach(model, random_dictionary("resid_post.1"))
    root = torch_module(model)
    expected = root.lm_head.weight @ (root.model.norm.weight * att.dictionary.W_dec[4])
    torch.testing.assert_close(direct_logits(model, att, 4), expected.detach())
    mlp_in = attach(model, random_dictionary("mlp_in.1"))
    assert direct_logits(model, mlp_in, 4) is None


def test_cli_lists_and_runs_the_feature_analyses(tiny_models, corpus, tmp_path):
    model = tiny_models("llama")
    folder = save_dictionary(random_dictionary("resid_post.1"), tmp_path / "d")
    info = subprocess.run([sys.executable, "-m", "nnsight_sae", "info"], capture_output=True, text=True)
    names = json.loads(info.stdout)["analyses"]
    assert {"feature-patching", "causal-tree", "feature-report", "de-embed"} <= set(names)
    model_dir = torch_folder(model)
    cmd = [sys.executable, "-m", "nnsight_sae", "analyze", "feature-report", "--dict", str(folder),
           "--model", model_dir, "--features", "1,2", "--data", corpus, "--tokens", "2000", "--ctx-len", "40",
           "--out", str(tmp_path / "out")]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "out" / "feature-report.html").exists()
    bad = subprocess.run(cmd[:-6] + ["--features", "1,99", "--data", corpus, "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "nnsight-sae analyze: error: feature 99 is out of range: this dictionary has features 0..63"]
    assert not (tmp_path / "bad").exists()


def torch_folder(model) -> str:
    return model._module.config.name_or_path


def test_causal_tree_finds_or_trains_its_upstream_dictionary(tiny_models, corpus, tmp_path, capsys):
    model = tiny_models("llama")
    target = random_dictionary("resid_post.1")
    common = dict(model=model, dictionary=target, feature=5, contexts=4, candidates=8, data=corpus, tokens=2000,
                  ctx_len=40)
    first = run_analysis("causal-tree", out_dir=tmp_path / "a", **common)
    assert "training topk-resid_post.0-64-" in capsys.readouterr().out
    (how,) = first["upstream_made"]
    assert how.startswith("upstream resid_post.0: trained ")
    folder = how.split("trained ")[1]
    assert load_dictionary(folder).site == "resid_post.0" and load_dictionary(folder).d_sae == 64
    second = run_analysis("causal-tree", out_dir=tmp_path / "b", **common)
    assert second["upstream_made"] == [f"upstream resid_post.0: found {folder}"]
    assert second["tree"]["ranking"] == first["tree"]["ranking"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "gpt_neox", "gemma2", "gemma3"])
def test_mlp_norm_feeds_mlp_in(tiny_models, family):
    """The map's mlp_norm is the norm whose output is the mlp_in site."""
    from nnsight_sae import resolve_site
    from nnsight_sae.sites import architecture_of, envoy_at, join_path

    model = tiny_models(family)
    arch = architecture_of(model)
    norm = envoy_at(model, join_path(arch.layers, "1", arch.mlp_norm))
    with torch.no_grad(), model.trace(tiny_prompts(2, 6)):
        normed = norm.output.save()
        mlp_in = resolve_site(model, "mlp_in.1").read().save()
    torch.testing.assert_close(normed, mlp_in)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "gemma3"])  # no absolute position embeddings
def test_de_embedding_is_the_encoder_on_layer_0_input(tiny_models, family):
    """For a dictionary on resid_pre.0, token t's de-embedding is its pre-activation on the model's
    own layer-0 input for the one-token text t (Gemma's scaled embeddings included)."""
    from nnsight_sae import resolve_site
    from nnsight_sae_features.deembed import de_embedding

    model = tiny_models(family)
    d = random_dictionary("resid_pre.0")
    scores = de_embedding(model, d, [3, 9])
    assert scores.shape == (2, len(model.tokenizer))
    ids = torch.tensor([[17], [42]])
    with torch.no_grad(), model.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        x = resolve_site(model, "resid_pre.0").read().save()
    with torch.no_grad():
        expected = d.pre_acts(x[:, 0])[:, [3, 9]]
    torch.testing.assert_close(scores[:, [17, 42]].T, expected, rtol=1e-5, atol=1e-5)


def test_de_embedding_ranks_the_token_a_transcoder_feature_reads(tiny_models, tmp_path):
    from nnsight_sae.sites import architecture_of, submodule, torch_module

    model = tiny_models("llama")
    tc = create_dictionary("transcoder", d_in=32, d_sae=64, site="mlp_in.1", out_site="mlp_out.1")
    tc.reset_parameters(0)
    root, arch = torch_module(model), architecture_of(model)
    with torch.no_grad():
        normed = submodule(root, f"{arch.layers}.1.{arch.mlp_norm}")(root.model.embed_tokens.weight)
        tc.W_enc[:, 7] = normed[55] / normed[55].norm()  # feature 7 reads token 55's normed embedding
    r = run_analysis("de-embed", model=model, dictionary=tc, out_dir=tmp_path, features=[7], top=5)
    assert r["features"][0]["raised"][0]["token"] == WORDS[55]
    assert len(r["features"][0]["raised"]) == 5 and (tmp_path / "de-embed.json").exists()
    with pytest.raises(FeatureError, match="mlp_out.1 is neither"):
        run_analysis("de-embed", model=model, dictionary=random_dictionary("mlp_out.1"), out_dir=tmp_path,
                     features=[1])


def test_tc_vs_sae_sweep(tiny_models, corpus, tmp_path, monkeypatch):
    from nnsight_sae import load_dictionary

    model = tiny_models("llama")
    monkeypatch.setenv("NNSIGHT_SAE_CACHE", str(tmp_path / "cache"))  # to count the harvests
    tc = random_dictionary("mlp_in.1", type_name="transcoder", out_site="mlp_out.1")
    out = tmp_path / "sweep"
    r = run_analysis("tc-vs-sae", model=model, dictionary=tc, out_dir=out, l1=[1e-3, 3.0], sae_l1=[1e-3, 3.0, 10.0],
                     layers=[0, 1], tokens=6000, ctx_len=40, eval_tokens=200, data=corpus)
    assert json.loads((out / "tc-vs-sae.json").read_text()) == r
    assert (out / "tc-vs-sae.png").stat().st_size > 5000
    assert r["layers"] == [0, 1] and r["penalties"] == {"transcoder": [1e-3, 3.0], "relu": [1e-3, 3.0, 10.0]}
    assert [(p["layer"], p["type"], p["l1_coefficient"]) for p in r["points"]] == [
        (layer, kind, penalty) for layer in (0, 1) for kind, penalties in r["penalties"].items()
        for penalty in penalties]
    # one harvest (every layer's MLP input and output) for all ten dictionaries
    (harvest,) = (tmp_path / "cache" / "activations").glob("*/meta.json")
    assert sorted(json.loads(harvest.read_text())["shapes"]) == ["mlp_in.0", "mlp_in.1", "mlp_out.0", "mlp_out.1"]
    assert len({round(p["ce_clean"], 6) for p in r["points"]}) == 1  # every point scored on the same tokens
    for layer in (0, 1):
        for kind in ("transcoder", "relu"):
            weak, strong = [p for p in r["points"] if p["type"] == kind and p["layer"] == layer][:2]
            assert strong["l0"] < weak["l0"]  # a larger penalty, fewer active features
        matched = [m for m in r["matched_l0"] if m["layer"] == layer]
        assert set(r["mean_difference_at_matched_l0"]) == ({str(layer)} if matched else set())
    for p in r["points"]:
        d = load_dictionary(out / "dictionaries" / p["folder"])
        assert d.d_sae == 64 and d.site == f"{'mlp_in' if p['type'] == 'transcoder' else 'mlp_out'}.{p['layer']}"
    with pytest.raises(FeatureError, match="compares dictionaries on one MLP"):
        run_analysis("tc-vs-sae", model=model, dictionary=random_dictionary("resid_post.1"), out_dir=tmp_path / "x")
    with pytest.raises(FeatureError, match="--l1 needs positive penalties"):
        run_analysis("tc-vs-sae", model=model, dictionary=tc, out_dir=tmp_path / "x", l1=[0.0])
    with pytest.raises(FeatureError, match="--sae-l1 needs positive penalties"):
        run_analysis("tc-vs-sae", model=model, dictionary=tc, out_dir=tmp_path / "x", sae_l1=[0.0])
    with pytest.raises(SiteError):
        run_analysis("tc-vs-sae", model=model, dictionary=tc, out_dir=tmp_path / "x", layers=[1, 9])
    assert not (tmp_path / "x").exists()


def test_matched_l0_interpolates_in_log_l0():
    from nnsight_sae_features.sweep import matched_l0

    points = [{"type": "relu", "l0": 10, "ce_increase": 0.4}, {"type": "relu", "l0": 1000, "ce_increase": 0.0},
              {"type": "transcoder", "l0": 100, "ce_increase": 0.1},  # halfway in log L0: the SAE is at 0.2
              {"type": "transcoder", "l0": 5000, "ce_increase": 0.0}]  # outside the SAEs' range: left out
    (m,) = matched_l0(points)
    assert m["l0"] == 100 and m["sae_ce_increase"] == pytest.approx(0.2) and m["difference"] == pytest.approx(-0.1)


def test_de_embedding_through_a_head_is_its_ov_circuit(tiny_models, tmp_path):
    """Llama (grouped-query attention), head 2 of layer 1, by hand: W_O^h W_V^g norm(embedding)."""
    from nnsight_sae_features.deembed import de_embedding, through_head

    model = tiny_models("llama")
    hf = model._module.model
    attn, norm = hf.layers[1].self_attn, hf.layers[1].input_layernorm
    dh, group = 8, 2 // 2  # 4 heads of 8 dims share 2 value heads
    with torch.no_grad():
        emb = hf.embed_tokens.weight[[17, 42]]
        value = norm(emb) @ attn.v_proj.weight[group * dh:(group + 1) * dh].T
        by_hand = value @ attn.o_proj.weight[:, 2 * dh:3 * dh].T
    torch.testing.assert_close(through_head(model, emb, (1, 2)), by_hand, rtol=1e-5, atol=1e-6)
    d = random_dictionary("resid_post.1")
    scores = de_embedding(model, d, [3, 9], head=(1, 2))
    with torch.no_grad():
        torch.testing.assert_close(scores[:, [17, 42]].T, d.pre_acts(by_hand)[:, [3, 9]], rtol=1e-5, atol=1e-5)
    r = run_analysis("de-embed", model=model, dictionary=d, out_dir=tmp_path / "e", features=[3], head="1.2")
    assert r["head"] == [1, 2] and len(r["features"][0]["raised"]) == 20
    with pytest.raises(FeatureError, match="head 2.0 comes after resid_post.1"):
        de_embedding(model, d, [3], head=(2, 0))
    with pytest.raises(FeatureError, match="head 1.0 comes after resid_pre.1"):
        de_embedding(model, random_dictionary("resid_pre.1"), [3], head=(1, 0))
    with pytest.raises(FeatureError, match="head 9 is out of range: layer 1 has heads 0..3"):
        de_embedding(model, d, [3], head=(1, 9))
    with pytest.raises(FeatureError, match="--head takes LAYER.HEAD"):
        run_analysis("de-embed", model=model, dictionary=d, out_dir=tmp_path / "e", features=[3], head="x")
