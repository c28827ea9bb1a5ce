"""Feature analyses on the embedded SmolLM2 with the quality bars' TopK SAE on resid_post.6
(trained on the code corpus, which these analyses read too) and one trained on the prose corpus
(slow: minutes on 2 cores). The figures are in the README."""

import html
import json
import re
import shutil
import subprocess

import pytest
import torch

from nnsight_sae import attach, load_dictionary, run_analysis
from nnsight_sae_features.common import corpus_tokens, site_codes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def paren_feature(smol, smol_resid6):
    """The resid_post.6 feature whose activation mass lies most on tokens holding '(' (among
    features firing on at least 20 of them), on 16k corpus tokens."""
    att = attach(smol, load_dictionary(smol_resid6))
    vocab = len(smol.tokenizer)
    has_paren = torch.tensor(["(" in smol.tokenizer.decode([i]) for i in range(vocab)])
    tokens = corpus_tokens(smol, n_tokens=16_384, ctx_len=64, corpus="code")
    on_paren = total = fires = 0
    for start in range(0, len(tokens), 32):
        ids = tokens[start:start + 32]
        codes, _ = site_codes(smol, att, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        codes[:, 0] = 0
        paren = has_paren[ids]
        on_paren = on_paren + codes[paren].sum(0)
        total = total + codes.sum((0, 1))
        fires = fires + (codes[paren] > 0).sum(0)
    purity = torch.where(fires >= 20, on_paren / total.clamp_min(1e-9), torch.zeros(()))
    feature = int(purity.argmax())
    print(f"\n'(' feature: {feature}, {100 * float(purity[feature]):.1f}% of its activation on '(' tokens")
    return feature


def feature_patching(smol, run, out, task, n_prompts, candidates, corpus="code"):
    r = run_analysis("feature-patching", model=smol, dictionary=load_dictionary(run), out_dir=out, task=task,
                     n_prompts=n_prompts, candidates=candidates, corpus=corpus)
    print(f"\n{task}:", json.dumps({k: r[k] for k in ("kl_unpatched", "metric_base", "metric_counterfactual",
                                                       "seconds")}))
    for name in ("sae", "pca"):
        for key in ("shared", "per_prompt"):
            c = r[name][key]
            print(name, key, "KL at 1/8/16/last:", [c["kl"][i] for i in (0, 7, 15, -1)], c["directions_needed"])
        print(name, "every direction:", r[name]["kl_all_directions"], "shift reproduced:", r[name]["shift_captured"])
    # every principal direction patched gives the counterfactual activation itself
    assert r["pca"]["kl_all_directions"] == pytest.approx(0, abs=1e-3)
    assert r["pca"]["shift_captured"] == pytest.approx(1, abs=1e-4)
    assert (out / "feature-patching.png").stat().st_size > 20_000
    return r


def test_feature_patching_on_ioi_code_sae_against_prose_sae(smol, smol_resid6, smol_prose_saes, tmp_path):
    """IOI swaps the indirect object's name, which the code corpus rarely has: the SAE trained on prose
    (names, dialogue) reproduces far more of the activation's shift than the one trained on code, and
    each prompt's own features leave less KL, on the same 8 prompts. Measured with these tests' small
    SAEs (code 100k tokens, prose 60k): share of the shift 0.44 vs 0.15, KL with every feature
    patched 0.58 vs 2.19, with each prompt's top 16 features 3.36 vs 4.05, of 5.51. The paper's claim
    (fewer SAE features than principal directions to halve the KL) holds for the README's 300k-token
    prose SAE (8 vs 8) and fails for these small ones, as for the 300k-token code SAE (README)."""
    code = feature_patching(smol, smol_resid6, tmp_path / "code", "ioi", 8, 24)
    prose = feature_patching(smol, smol_prose_saes[6], tmp_path / "prose", "ioi", 8, 24, corpus="prose")
    assert code["kl_unpatched"] == prose["kl_unpatched"] > 1  # the same prompts; the swap moves the prediction
    assert prose["sae"]["shift_captured"] >= 2 * code["sae"]["shift_captured"]
    assert prose["sae"]["kl_all_directions"] < 0.5 * code["sae"]["kl_all_directions"]
    assert prose["sae"]["per_prompt"]["kl"][15] < code["sae"]["per_prompt"]["kl"][15]


def test_causal_tree_of_a_paren_feature(smol, smol_resid6, paren_feature, tmp_path, capsys):
    """Without --upstream the tree trains a TopK SAE on resid_post.5 (100k tokens) and says so."""
    target = load_dictionary(smol_resid6)
    r = run_analysis("causal-tree", model=smol, dictionary=target, out_dir=tmp_path, feature=paren_feature,
                     depth=1, width=3, contexts=20, candidates=64, corpus="code")
    assert "upstream resid_post.5: trained" in capsys.readouterr().out
    tree = r["tree"]
    print(json.dumps({k: tree[k] for k in ("feature", "max_activation", "mean_activation", "top_tokens", "ranking")}))
    assert "(" in tree["top_tokens"][0]
    drops = [e["drop"] for e in tree["ranking"]]
    assert drops == sorted(drops, reverse=True)
    top = tree["ranking"][0]
    # non-trivial: measured 0.073 with these 100k-token SAEs (the '(' feature draws on many upstream
    # features, the top two about 7% each); the README's 300k-token pair: 25%
    assert top["drop_fraction"] >= 0.05
    # the top drop, by hand: that upstream feature ablated with splice on the same contexts
    from nnsight_sae_features.tree import firing_contexts

    upstream = load_dictionary(r["upstream_made"][0].split("trained ")[1])
    t_att, u_att = attach(smol, target), attach(smol, upstream)
    tokens = corpus_tokens(smol, n_tokens=32_768, ctx_len=64, corpus="code")
    ctx = firing_contexts(smol, t_att, tokens, paren_feature, n_contexts=20)
    rows = torch.arange(len(ctx["positions"]))
    with torch.no_grad(), smol.trace(ctx["enc"]):
        clean = t_att.features()[rows, ctx["positions"], paren_feature].save()
    with torch.no_grad(), smol.trace(ctx["enc"]):
        u_att.splice(ablate=[top["feature"]])
        after = t_att.features()[rows, ctx["positions"], paren_feature].save()
    assert float((clean - after).mean()) == pytest.approx(top["drop"], rel=1e-3, abs=1e-3)
    assert (tmp_path / "causal-tree.png").stat().st_size > 10_000


def chromium_render(page, out):
    """Headless Chromium: a screenshot of the page (PNG) and its rendered DOM."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={out / 'profile'}", "--window-size=1200,1400"]
    shot = out / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return shot, dom


def test_feature_report_renders_in_chromium(smol, smol_resid6, paren_feature, tmp_path):
    import matplotlib.image

    r = run_analysis("feature-report", model=smol, dictionary=load_dictionary(smol_resid6), out_dir=tmp_path,
                     features=[paren_feature], contexts=10, tokens=32_768, corpus="code")
    e = r["features"][0]
    top_tokens = [c["tokens"][c["max_position"]] for c in e["contexts"]]
    print(json.dumps({"feature": paren_feature, "top_tokens": top_tokens, "max": e["max_activation"],
                      "frequency": e["frequency"], "ablation_lowered": e["ablation"]["lowered"][:5],
                      "direct": e["direct_logits"]["raised"][:5]}))
    assert sum("(" in t for t in top_tokens) >= 8  # the class it was picked for
    shot, dom = chromium_render(tmp_path / "feature-report.html", tmp_path)
    for token in top_tokens:  # each rendered as the highlighted token of a context line
        shown = html.escape(token.replace("\n", "\u21b5"), quote=False)
        assert re.search(r'class="tok max"[^>]*>' + re.escape(shown) + "</span>", dom)
    pixels = matplotlib.image.imread(shot)[..., :3]
    orange = (pixels[..., 0] > 0.9) & (abs(pixels[..., 1] - 0.55) < 0.08) & (pixels[..., 2] < 0.15)
    assert int(orange.sum()) >= 200  # the fully lit top tokens are on screen
    assert (pixels.mean() < 0.99) and (pixels.std() > 0.05)  # not a blank page
