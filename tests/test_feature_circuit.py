"""Sparse feature circuits (``analyze feature-circuit``) on tiny models: the spliced model, node
effects against autograd by hand, edges, integrated gradients, the outputs and bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from nnsight_sae import run_analysis, save_dictionary
from nnsight_sae.errors import OptionError
from nnsight_sae.heads import encode_pair, last_logits_of
from nnsight_sae.tasks import get_task
from nnsight_sae.testing import random_dictionary
from nnsight_sae_features.circuit import (NodeTable, ablatable_positions, edge_weights, graph_nodes, measure,
                                          site_nodes, spliced_logits)
from nnsight_sae_features.common import FeatureError


@pytest.fixture
def varied_task(tmp_path):
    """The counterfactual task with prompts of three lengths, so left padding is exercised."""
    rows = []
    for i in range(5, 21):
        lead = " ".join(f"w{j}" for j in range(60, 60 + i % 3))
        rows.append({"prompt": f"{lead} w{i} w{i + 1} w{i + 2} w{i + 1}".strip(), "answer": f" w{i}",
                     "negative": f"{lead} w{i} w{i + 1} w{i + 2} w{i + 3}".strip(), "wrong": f" w{i + 2}",
                     "counterfactual": f"{lead} w{i + 40} w{i + 1} w{i + 2} w{i + 1}".strip()})
    path = tmp_path / "varied.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _three(d_in=32):
    """An SAE, a transcoder and a ReLU SAE on a tiny 3-layer model."""
    return [random_dictionary("resid_post.0", seed=1),
            random_dictionary("mlp_in.1", type_name="transcoder", out_site="mlp_out.1", seed=2),
            random_dictionary("resid_post.2", type_name="relu", seed=3)]


def _setup(model, task_path, dictionaries, n=16):
    task = get_task(task_path)
    prompts = task.prompts(model.tokenizer, n)
    return task, prompts, site_nodes(model, dictionaries)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_spliced_dictionaries_with_errors_reproduce_the_clean_logits(tiny_models, varied_task, family):
    model = tiny_models(family)
    task, prompts, groups = _setup(model, varied_task, _three())
    enc = dict(encode_pair(model, prompts, prompts.counterfactual)[0])
    clean = last_logits_of(model, enc)
    shapes = [(g.d_sae + 1) for g in groups]
    keep = [torch.ones(len(prompts), enc["input_ids"].shape[1], k, dtype=torch.bool) for k in shapes]
    means = [(torch.zeros(g.d_sae), torch.zeros(32)) for g in groups]
    spliced = spliced_logits(model, enc, groups, keep, means, ablatable_positions(enc["attention_mask"]))
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    # and with every node ablated the output no longer depends on the prompt beyond its first token
    none = [~k for k in keep]
    mean_x = [(torch.zeros(g.d_sae), torch.zeros(32)) for g in groups]
    ablated = spliced_logits(model, enc, groups, none, mean_x, ablatable_positions(enc["attention_mask"]))
    assert not torch.allclose(ablated, clean, atol=1e-3)


def _by_hand(model, task, prompts, enc, outputs_of, inputs_of, *, backward):
    """Module outputs (and inputs) on ``enc`` with plain torch hooks on the Hugging Face model, no
    nnsight; with ``backward``, also d metric / d each output."""
    hf = model._module
    seen = {}

    def out_hook(name):
        def keep(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if backward:
                t.retain_grad()
            seen[name] = t
        return keep

    def in_hook(name):
        def keep(module, args):
            seen[name + ":input"] = args[0]
        return keep

    handles = [hf.get_submodule(p).register_forward_hook(out_hook(p)) for p in outputs_of]
    handles += [hf.get_submodule(p).register_forward_pre_hook(in_hook(p)) for p in inputs_of]
    try:
        with torch.set_grad_enabled(backward):
            # a left-padded row keeps its tokens at their own positions, as nnsight passes them
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            logits = hf(**enc, position_ids=positions).logits[:, -1]
            if backward:
                task.metric(logits, prompts).sum().backward()
    finally:
        for h in handles:
            h.remove()
    hf.zero_grad(set_to_none=True)
    grads = {p: seen[p].grad.detach() for p in outputs_of} if backward else {}
    return {k: v.detach() for k, v in seen.items()}, grads


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attribution_effects_are_gradient_times_change_by_hand(tiny_models, varied_task, family):
    model = tiny_models(family)
    dictionaries = _three()
    task, prompts, groups = _setup(model, varied_task, dictionaries)
    measured = measure(model, task, prompts, groups, steps=0)

    enc, enc_cf = (dict(e) for e in encode_pair(model, prompts, prompts.counterfactual))
    layers = "model.layers" if family == "llama" else "transformer.h"
    paths = {"resid_post.0": f"{layers}.0", "mlp_out.1": f"{layers}.1.mlp", "resid_post.2": f"{layers}.2"}
    mlp = paths["mlp_out.1"]
    clean, grads = _by_hand(model, task, prompts, enc, list(paths.values()), [mlp], backward=True)
    cf, _ = _by_hand(model, task, prompts, enc_cf, list(paths.values()), [mlp], backward=False)
    mask = enc["attention_mask"][..., None].float()
    for i, d in enumerate(dictionaries):
        path = paths[groups[i].name]
        source = mlp + ":input" if groups[i].reads is not groups[i].writes else path
        with torch.no_grad():
            f0, f1 = d.encode(clean[source]), d.encode(cf[source])
            feature = ((grads[path] @ d.W_dec.T) * (f1 - f0) * mask).mean(0)
            error0, error1 = clean[path] - d.decode(f0), cf[path] - d.decode(f1)
            error = ((grads[path] * (error1 - error0)).sum(-1) * mask[..., 0]).mean(0)
        effects = measured.effects(i).mean(0)  # (p, d_sae + 1)
        torch.testing.assert_close(effects[..., :-1], feature, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(effects[..., -1], error, rtol=1e-4, atol=1e-6)
    # nodes sum to the neurons' total: both are grad . (x_cf - x_clean) at every site
    table = NodeTable([measured.effects(i) for i in range(3)], by_token=False)
    neurons = NodeTable([measured.neuron_effects(i) for i in range(3)], by_token=False)
    assert float(table.effects.sum()) == pytest.approx(float(neurons.effects.sum()), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("by_token", [False, True])
def test_edges_into_a_node_sum_to_its_effect_where_the_decomposition_is_exact(tiny_models, varied_task, by_token):
    """resid_post.0 and resid_pre.1 are one tensor, and a ReLU SAE whose features all fire is
    affine: the downstream nodes are then linear in the upstream site, and the chain rule's
    edges into each node add up to its effect exactly."""
    model = tiny_models("llama")
    linear = random_dictionary("resid_pre.1", type_name="relu", seed=4)
    with torch.no_grad():
        linear.b_enc.fill_(8.0)
    task, prompts, groups = _setup(model, varied_task, [random_dictionary("resid_post.0", seed=1), linear])
    measured = measure(model, task, prompts, groups, steps=0)
    real = measured.mask.bool()
    assert (linear.pre_acts(measured.x[1][real]) > 0).all()  # every feature fires: the SAE is affine here
    table = NodeTable([measured.effects(i) for i in range(2)], by_token)
    nodes = graph_nodes(measured, table, threshold=0.0, per_site=10_000)
    up = [n for n in nodes if n["site_index"] == 0]
    down = [n for n in nodes if n["site_index"] == 1]
    assert len(down) > 20 and any(n["feature"] == "error" for n in up)
    weights = edge_weights(model, measured, 0, up, down)
    effects = torch.tensor([n["effect"] for n in down])
    torch.testing.assert_close(weights.sum(0), effects, rtol=1e-3, atol=2e-5)


def test_integrated_gradients_converge_to_patching_the_whole_site(tiny_models, varied_task):
    """Summed over a site's nodes, integrated gradients along the straight line from the positive
    to the counterfactual activation give the exact effect of patching the whole site, as the
    points grow (completeness); attribution patching, the first-order estimate, does not."""
    from nnsight_sae_features.circuit import last_logits_replaced

    model = tiny_models("llama")
    task, prompts, groups = _setup(model, varied_task, [random_dictionary("resid_post.1", type_name="relu")])
    enc = dict(encode_pair(model, prompts, prompts.counterfactual)[0])
    gaps = {}
    for steps in (0, 2, 32):
        measured = measure(model, task, prompts, groups, steps=steps)
        x_cf = measured.x[0] + measured.dx[0]
        exact = float((task.metric(last_logits_replaced(model, groups[0], enc, x_cf), prompts)
                       - task.metric(measured.logits, prompts)).mean())
        estimate = float(measured.effects(0).sum((1, 2)).mean())
        gaps[steps] = abs(estimate - exact)
    assert abs(exact) > 1e-3
    assert gaps[32] < 0.02 * abs(exact)
    assert gaps[32] < gaps[2] and gaps[32] < gaps[0]


def test_feature_circuit_outputs(tiny_models, varied_task, corpus, tmp_path):
    model = tiny_models("llama")
    out = tmp_path / "fc"
    r = run_analysis("feature-circuit", model=model, dictionary=_three(), out_dir=out, task=varied_task,
                     data=corpus, tokens=2000, ctx_len=40, node_threshold=0.0, edge_threshold=0.0, nodes_per_site=5,
                     check_nodes=8)
    on_disk = json.loads((out / "feature-circuit.json").read_text())
    assert on_disk["nodes"] == r["nodes"]
    assert [s["site"] for s in r["sites"]] == ["resid_post.0", "mlp_out.1", "resid_post.2"]
    assert r["sites"][1]["reads"] == "mlp_in.1"
    assert len(r["nodes"]) == 15 and {n["site"] for n in r["nodes"]} == {s["site"] for s in r["sites"]}
    ids = {n["id"] for n in r["nodes"]} | {"metric"}
    assert r["edges"] and all(e["from"] in ids and e["to"] in ids for e in r["edges"])
    assert any(e["to"] == "metric" for e in r["edges"])
    features = [n for n in r["nodes"] if n["feature"] != "error"]
    assert features and all("contexts" in n for n in features)
    c = r["curves"]
    assert c["features"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-3)  # every node kept: clean
    assert c["features"]["completeness"][-1] == pytest.approx(0.0, abs=1e-3)  # every node ablated
    assert len(c["features"]["faithfulness"]) == len(c["n"]) == len(c["random"]["faithfulness"])
    assert r["check"]["n_nodes"] == 8 and -1 <= r["check"]["correlation"] <= 1 and len(r["check"]["worst"]) == 5
    for name in ("feature-circuit.png", "feature-circuit-curves.png", "feature-circuit.html"):
        assert (out / name).stat().st_size > 1000
    assert c["n"][-1] == 3 * 65 and c["ranking"] == "shared" and c["ablation"] == "mean"
    by_token = run_analysis("feature-circuit", model=model, dictionary=_three(), out_dir=tmp_path / "bt",
                            task=varied_task, data=corpus, tokens=2000, ctx_len=40, aggregate="by-token",
                            ranking="per-prompt", ablation="counterfactual", check_nodes=0, steps=2)
    assert by_token["nodes"] and all(n["position"] is not None and n["position"] < 0 for n in by_token["nodes"])
    assert by_token["estimate"] == "integrated gradients" and by_token["check"] is None
    c = by_token["curves"]
    assert c["ranking"] == "per prompt" and c["ablation"] == "counterfactual"
    assert c["features"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-3)
    assert c["features"]["completeness"][-1] == pytest.approx(0.0, abs=1e-3)
    assert c["neurons"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-3)


def test_feature_circuit_page_click_shows_the_nodes_contexts(tiny_models, varied_task, corpus, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api")
    if chromium is None:
        pytest.skip("needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")
    model = tiny_models("llama")
    r = run_analysis("feature-circuit", model=model, dictionary=_three(), out_dir=tmp_path, task=varied_task,
                     data=corpus, tokens=2000, ctx_len=40, node_threshold=0.0, check_nodes=0)
    node = next(n for n in r["nodes"] if n["feature"] != "error" and n["contexts"])
    context = node["contexts"][0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((tmp_path / "feature-circuit.html").as_uri())
            assert page.locator("[data-node]").count() == len(r["nodes"])
            assert "Click a node" in page.text_content("#panel")
            page.click(f'[data-node="{node["id"]}"]')
            panel = page.text_content("#panel")
            page.screenshot(path="/tmp/fc/page.png")
        finally:
            browser.close()
    assert not errors
    assert f"feature {node['feature']}" in panel and node["site"] in panel
    assert f'{context["activation"]:.2f} {"".join(context["tokens"])}' in panel  # its strongest context


def test_feature_circuit_bad_input(tiny_models, varied_task, counterfactual_task, task_file, tmp_path):
    model = tiny_models("llama")
    kw = dict(model=model, out_dir=tmp_path / "out", task=varied_task)
    two = [random_dictionary("resid_post.0", seed=1), random_dictionary("resid_post.0", type_name="relu")]
    with pytest.raises(FeatureError, match="two dictionaries write 'resid_post.0'"):
        run_analysis("feature-circuit", dictionary=two, **kw)
    # a transcoder and an SAE both writing mlp_out.1
    clash = [random_dictionary("mlp_out.1"),
             random_dictionary("mlp_in.1", type_name="transcoder", out_site="mlp_out.1")]
    with pytest.raises(FeatureError, match="two dictionaries write 'mlp_out.1'"):
        run_analysis("feature-circuit", dictionary=clash, **kw)
    with pytest.raises(FeatureError, match="trained on 'openai-community/gpt2'"):
        run_analysis("feature-circuit", dictionary=[random_dictionary("resid_post.0", model="openai-community/gpt2")],
                     **kw)
    with pytest.raises(Exception, match="d_in=48 does not match"):
        run_analysis("feature-circuit", dictionary=[random_dictionary("resid_post.0", d_in=48)], **kw)
    with pytest.raises(FeatureError, match="named sites"):
        run_analysis("feature-circuit", dictionary=[random_dictionary("module:model.layers.0")], **kw)
    with pytest.raises(FeatureError, match="no counterfactual prompts"):
        run_analysis("feature-circuit", dictionary=_three(), **{**kw, "task": task_file})
    with pytest.raises(OptionError, match="node_threshold must be at least 0"):
        run_analysis("feature-circuit", dictionary=_three(), node_threshold=-1.0, **kw)
    with pytest.raises(OptionError, match="takes one dictionary"):
        run_analysis("feature-patching", dictionary=_three(), **kw)
    assert not (tmp_path / "out").exists()


def test_feature_circuit_cli(tiny_models, varied_task, corpus, tmp_path):
    from nnsight_sae.testing import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "llama")
    dicts = [str(save_dictionary(d, tmp_path / f"d{i}")) for i, d in enumerate(_three())]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nnsight_sae", "analyze", "feature-circuit", "--model",
                               str(folder), *args], capture_output=True, text=True)

    out = tmp_path / "out"
    ok = cli("--dicts", ",".join(dicts), "--task", varied_task, "--data", corpus, "--tokens", "2000",
             "--ctx-len", "40", "--check-nodes", "4", "--out", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((out / "feature-circuit.json").read_text())["sites"][2]["site"] == "resid_post.2"
    bad = [
        (["--dicts", f"{dicts[0]},{dicts[0]}"], "two dictionaries write 'resid_post.0'"),
        (["--dicts", dicts[0], "--edge-threshold", "-1"], "edge_threshold must be at least 0"),
    ]
    for args, message in bad:
        result = cli(*args, "--task", varied_task, "--out", str(tmp_path / "bad"))
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "bad").exists()
