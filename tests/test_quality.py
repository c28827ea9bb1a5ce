"""Quality bars on the embedded SmolLM2 (slow: minutes on 2 cores). The figures are in the README."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def evaluation(folder):
    ev = json.loads((folder / "eval.json").read_text())
    print(json.dumps(ev))
    return ev


def test_topk_on_resid_post_6(smol_resid6):
    topk = evaluation(smol_resid6)
    # the bar, from a plain 40-line TopK loop on 300k tokens x 3 epochs: FVU 0.09, +0.16 nats, 0.98
    # recovered. This fixture's 100k tokens x 3 epochs: FVU 0.110, +0.198 nats, 0.983 recovered.
    assert topk["fvu"] <= 0.12
    assert topk["ce_increase"] <= 0.25
    assert topk["ce_loss_recovered"] >= 0.95
    assert topk["l0"] == pytest.approx(32, abs=0.01)


def test_transcoder_replacing_one_mlp(transcoders):
    tc = evaluation(transcoders[6])
    # the bar: CE with MLP 6 replaced within 0.15 nats of clean, recovering most of what zeroing the MLP
    # costs, with an FVU below the mean's 1. Measured on this fixture (100k tokens x 2 epochs): +0.048
    # nats, loss recovered 0.717, FVU 0.768, L0 74. The README's table (150k tokens, layers 3, 10, 20)
    # has FVU 0.36 to 0.65 with the longer training; MLP 3 is left out here because zeroing it costs
    # only about 0.07 nats, so its loss recovered is mostly noise at this budget (measured 0.09).
    assert tc["out_site"] == "mlp_out.6"
    assert tc["ce_increase"] <= 0.15
    assert tc["ce_loss_recovered"] >= 0.6 and tc["fvu"] <= 0.8 and tc["l0"] <= 150


def test_de_embeddings_of_token_features(smol, transcoders):
    """Layer-0 transcoder features that put at least 90% of their activation mass on one token:
    their de-embedding ranks that token near the top of the 49,152-token vocabulary. Measured with
    this fixture's transcoder (100k tokens x 2 epochs): 22 such features, 11 rank their token first,
    14 in the top 10, 17 in the top 100, median rank 0.5 (the README's 150k-token run: 29 features,
    10 first, median 26); random encoder directions: median rank in the tens of thousands (a few high-norm tokens rank
    high for any direction)."""
    from nnsight_sae import attach, load_dictionary
    from nnsight_sae_features.common import corpus_tokens, feature_activations
    from nnsight_sae_features.deembed import de_embedding

    d = load_dictionary(transcoders[0])
    tokens = corpus_tokens(smol, n_tokens=32768, ctx_len=128, corpus="code")
    acts = feature_activations(smol, attach(smol, d), tokens, list(range(d.d_sae)), batch_size=32)
    acts, ids = acts.reshape(-1, d.d_sae), tokens.reshape(-1)
    features, favourites = [], []
    for f in ((acts > 0).sum(0) >= 20).nonzero().flatten().tolist():
        active = acts[:, f].nonzero().flatten()
        mass = torch.zeros(len(smol.tokenizer)).index_add_(0, ids[active], acts[active, f])
        if mass.max() >= 0.9 * mass.sum():
            features.append(f)
            favourites.append(int(mass.argmax()))
    assert len(features) >= 10
    scores = de_embedding(smol, d, features)
    ranks = torch.tensor([int((row > row[t]).sum()) for row, t in zip(scores, favourites)])
    print(f"{len(features)} token features; de-embedding ranks of their token: {sorted(ranks.tolist())}")
    assert (ranks == 0).float().mean() >= 0.25
    assert ranks.float().median() < 100
    # random directions instead of the encoder rank the tokens nowhere near the top
    d.W_enc.data = torch.randn(d.W_enc.shape, generator=torch.Generator().manual_seed(0))
    shuffled = de_embedding(smol, d, features)
    random_ranks = torch.tensor([int((row > row[t]).sum()) for row, t in zip(shuffled, favourites)])
    print(f"random encoders: {sorted(random_ranks.tolist())}")
    assert random_ranks.float().median() > 1000


def test_attribution_through_two_transcoders(smol, transcoders, tmp_path):
    """Weights-based attribution on the real model: a layer-6 feature split through MLP 0 into its
    transcoder's features, and a logit through both transcoders; the parts
    add up to the target."""
    from nnsight_sae import load_dictionary, run_analysis
    from nnsight_sae_features.tcattr import capture

    prompt = "The war lasted from the year 1732 to the year 17"
    target = load_dictionary(transcoders[6])
    upstream = [str(transcoders[0])]
    acts = capture(smol, smol.tokenizer(prompt)["input_ids"], [target]).transcoders[6].acts[-1]
    r = run_analysis("tc-attribution", model=smol, dictionary=target, out_dir=tmp_path / "feature", prompt=prompt,
                     feature=int(acts.argmax()), upstream=upstream)
    print(r["value"], r["relative_error"], r["max_relative_error"], r["by_kind"])
    assert r["relative_error"] < 1e-4 and r["max_relative_error"] < 1e-4
    assert {"feature", "error", "mlp", "head", "embedding", "bias"} <= set(r["by_kind"])
    assert any(n["kind"] == "feature" and n["layer"] < 6 for n in _walk(r["tree"]))
    r = run_analysis("tc-attribution", model=smol, dictionary=target, out_dir=tmp_path / "logit", prompt=prompt,
                     target_token="4", upstream=upstream, depth=2)
    print(r["value"], r["relative_error"], r["max_relative_error"], r["by_kind"])
    assert r["relative_error"] < 1e-4 and r["max_relative_error"] < 1e-4


def _walk(tree):
    yield tree
    for c in tree.get("children", []):
        yield from _walk(c)


def test_transcoders_against_saes_at_matched_l0(smol, code_harvest, tmp_path):
    """Issue 18 part 3, small (the README's sweep: three layers, 300k tokens x 3 epochs): at MLP 6,
    on the code fixtures' harvest (100k tokens; 2 epochs, width 2304), one transcoder and two ReLU SAEs on
    the MLP's output with penalties that bracket its L0. The sweep's contract (points, plot, every
    dictionary saved), the two families' L0 ranges overlap so there is a matched-L0 point, and both
    learn."""
    from nnsight_sae import load_dictionary, run_analysis
    from nnsight_sae.testing import random_dictionary

    given = random_dictionary("mlp_in.6", type_name="transcoder", out_site="mlp_out.6", d_in=576, d_sae=2304)
    out = tmp_path / "sweep"
    r = run_analysis("tc-vs-sae", model=smol, dictionary=given, out_dir=out, l1=[5e-4], sae_l1=[1e-3, 8e-3],
                     tokens=100_000, epochs=2, eval_tokens=1024, corpus="code")
    print(json.dumps(r["points"]), json.dumps(r["matched_l0"]))
    assert json.loads((out / "tc-vs-sae.json").read_text()) == r and (out / "tc-vs-sae.png").stat().st_size > 10_000
    tc, *saes = r["points"]
    assert (tc["type"], [s["type"] for s in saes]) == ("transcoder", ["relu", "relu"])
    for p in r["points"]:
        assert load_dictionary(out / "dictionaries" / p["folder"]).d_sae == 2304
    # the SAEs' L0 range holds the transcoder's, so the comparison at matched L0 exists
    assert saes[1]["l0"] < tc["l0"] < saes[0]["l0"]
    (matched,) = r["matched_l0"]
    assert matched["layer"] == 6 and r["mean_difference_at_matched_l0"] == {"6": matched["difference"]}
    # both families learn: below the mean's FVU of 1, at a small cost to the next-token loss. Measured
    # at this small budget: transcoder L0 58.6 / FVU 0.698 / +0.035; SAEs L0 372 / 0.220 / +0.009 and
    # 28.0 / 0.744 / +0.038; at L0 58.6 the SAEs interpolate to +0.029 (the SAEs better by 0.006). The
    # README's sweep (300k tokens x 3 epochs, three layers) has the figures to read.
    assert tc["fvu"] <= 0.8 and max(s["fvu"] for s in saes) <= 0.8
    assert max(p["ce_increase"] for p in r["points"]) <= 0.15
