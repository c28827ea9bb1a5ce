"""Circuit discovery pieces on tiny models: metrics, the JSONL task, the patching reference,
the scoring methods and the circuit.json / reference.json contracts."""

import json
import subprocess
import sys

import pytest
import torch

from nnsight_sae import NnsightSaeError, resolve_site
from nnsight_sae.circuits import precision_recall_at_k, roc_auc, run_circuit, run_reference
from nnsight_sae.tasks import get_task


def test_roc_auc_and_precision_recall():
    truth = torch.tensor([[True, False], [False, True]])
    assert roc_auc(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), truth) == 1.0
    assert roc_auc(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), truth) == 0.0
    assert roc_auc(torch.ones(2, 2), truth) == 0.5  # ties count half
    assert precision_recall_at_k(torch.tensor([[0.9, 0.5], [0.8, 0.1]]), truth, 2) == (0.5, 0.5)


def test_file_task_checks_prompts(tiny_models, task_file, tmp_path):
    prompts = get_task(task_file).prompts(tiny_models("llama").tokenizer)
    assert len(prompts) == 40 and prompts.skipped == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w5", "answer": " w6"}))
    with pytest.raises(NnsightSaeError, match="missing negative"):
        get_task(str(bad)).prompts(tiny_models("llama").tokenizer)
    with pytest.raises(NnsightSaeError, match="no such task file"):
        get_task(str(tmp_path / "none.jsonl"))


@pytest.mark.parametrize("ablation", ["mean", "position-mean", "resample", "zero"])
def test_reference_effect_equals_patching_one_head_by_hand(tiny_models, task_file, ablation):
    from nnsight_sae.heads import ablation_effects, last_logits

    model = tiny_models("llama")
    task = get_task(task_file)
    prompts = task.prompts(model.tokenizer, 12)
    effects = ablation_effects(model, task, prompts, ablation=ablation, progress=False)
    assert effects.shape == (3, 4)
    # head 2 of layer 1, by hand: its slice of o_proj's input replaced as the ablation says
    site = resolve_site(model, "head_out.1")
    enc_neg = model.tokenizer(prompts.negative, return_tensors="pt", padding=True)
    with model.trace(dict(enc_neg)):
        z_neg = site.envoy.input.save()  # all prompts have the same length here: no padding
    replacement = {"mean": z_neg.mean(0), "position-mean": z_neg.mean((0, 1)), "resample": z_neg,
                   "zero": torch.zeros(z_neg.shape[-1])}[ablation]
    enc = model.tokenizer(prompts.positive, return_tensors="pt", padding=True)
    with model.trace(dict(enc)):
        z = site.envoy.input.clone()
        z[..., 16:24] = replacement[..., 16:24]
        site.envoy.input = z
        logits = model.output.logits[:, -1].save()
    clean = task.metric(last_logits(model, prompts.positive), prompts).mean()
    by_hand = clean - task.metric(logits.cpu(), prompts).mean()
    torch.testing.assert_close(effects[1, 2], by_hand, rtol=1e-4, atol=1e-5)
    assert by_hand.abs() > 1e-4  # the head matters: the comparison is not 0 == 0


@pytest.mark.parametrize("ablation", ["mean", "position-mean", "resample", "zero"])
def test_attribution_tracks_the_reference_on_a_tiny_model(tiny_models, task_file, ablation):
    from nnsight_sae.heads import ablation_effects
    from nnsight_sae_circuits.attribution import attribution_effects

    model = tiny_models("gpt2")
    task = get_task(task_file)
    prompts = task.prompts(model.tokenizer, 16)
    exact = ablation_effects(model, task, prompts, ablation=ablation, progress=False).flatten()
    approx = attribution_effects(model, task, prompts, ablation=ablation).flatten()
    corr = torch.corrcoef(torch.stack([exact, approx]))[0, 1]
    assert corr > 0.9, corr


def test_circuit_and_reference_json_contracts(tiny_models, task_file, tmp_path):
    model = tiny_models("llama")
    ref = run_reference(model, task_file, tmp_path / "ref", n_prompts=20, top=4, progress=False)
    assert set(ref) >= {"task", "model", "method", "seconds", "heads", "circuit", "threshold"}
    assert len(ref["circuit"]) == 4 and ref["threshold"] == abs(ref["heads"][3]["effect"])
    for method in ("code-overlap", "code-overlap-edges", "mean-diff", "attribution"):
        out = tmp_path / method
        c = run_circuit(model, task_file, out, method=method, n_prompts=20, n_train=5, reference=tmp_path / "ref",
                        n_random=2, progress=False)
        saved = json.loads((out / "circuit.json").read_text())
        assert saved == json.loads(json.dumps(c))
        assert set(c) >= {"task", "model", "method", "n_train_prompts", "seconds", "heads", "metrics", "reference"}
        assert set(c["seconds"]) >= {"total", "harvest", "fit", "score"}
        assert set(c["metrics"]) == {"roc_auc", "precision_at_k", "recall_at_k", "k", "roc_auc_top"}
        assert c["metrics"]["k"] == 4 and set(c["metrics"]["roc_auc_top"]) == {"4", "10", "30"}
        scores = [h["score"] for h in c["heads"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 12
        assert (out / "heads.png").stat().st_size > 1000 and (out / "roc.png").stat().st_size > 1000
        f = c["faithfulness"]
        assert f["k"] == 4 and len(f["random_k"]) == 2 and ("top_k_positive" in f) == (method == "attribution")
    signed = c  # attribution: heads carry the signed estimate, ranked by its size
    assert all(h["score"] == abs(h["effect"]) for h in signed["heads"])
    as_reference = json.loads((tmp_path / "attribution" / "reference.json").read_text())
    assert as_reference["method"] == "attribution" and len(as_reference["circuit"]) == 4
    scored = run_circuit(model, task_file, tmp_path / "vs-attribution", method="mean-diff", n_prompts=20,
                         reference=tmp_path / "attribution", n_random=1, progress=False)
    assert scored["metrics"]["k"] == 4
    assert ref["ablation"] == c["ablation"] == as_reference["ablation"] == "mean"
    with pytest.raises(NnsightSaeError, match="reference.json is for task .* not 'ioi'"):
        run_circuit(model, "ioi", tmp_path / "other", reference=tmp_path / "ref", progress=False)
    with pytest.raises(NnsightSaeError, match="reference.json is for task .* not '.*' on 'gemma2"):
        run_circuit(tiny_models("gemma2"), task_file, tmp_path / "other", reference=tmp_path / "ref", progress=False)


def test_attribution_verifies_its_top_candidates_by_patching(tiny_models, task_file, tmp_path):
    from nnsight_sae.heads import ablation_effects
    from nnsight_sae_circuits.attribution import attribution_terms, verification_candidates

    model = tiny_models("gpt2")
    task = get_task(task_file)
    prompts = task.prompts(model.tokenizer, 16)
    estimate, magnitude = attribution_terms(model, task, prompts)
    assert (magnitude >= estimate.abs() - 1e-6).all()
    exact = ablation_effects(model, task, prompts, progress=False)
    candidates = verification_candidates(estimate, magnitude, 4).flatten()
    assert candidates.sum() == 4  # the top two of each ranking, then the next by the better rank
    assert candidates[estimate.abs().flatten().topk(2).indices].all()
    assert candidates[magnitude.flatten().topk(2).indices].all()
    top4 = candidates.nonzero().flatten()
    assert (exact.flatten()[top4] != estimate.flatten()[top4]).all()  # the estimate is not exact here
    c = run_circuit(model, task_file, tmp_path, n_prompts=16, options={"verify": 4, "steps": 0}, n_random=1,
                    progress=False)
    effect = torch.zeros(exact.shape)
    for h in c["heads"]:
        effect[h["layer"], h["head"]] = h["effect"]
    verified = torch.zeros(exact.numel(), dtype=torch.bool)
    verified[top4] = True
    torch.testing.assert_close(effect.flatten()[verified], exact.flatten()[verified], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(effect.flatten()[~verified], estimate.flatten()[~verified])
    assert c["options"] == {"steps": 0, "verify": 4} and c["seconds"]["verify"] > 0
    # a subset of heads measured alone gets the same effects as in the full sweep
    some = torch.zeros_like(verified).view(exact.shape)
    some[1, 2] = some[2, 0] = True
    torch.testing.assert_close(ablation_effects(model, task, prompts, heads=some, progress=False),
                               torch.where(some, exact, torch.zeros_like(exact)), rtol=1e-4, atol=1e-5)


def test_attribution_takes_a_linear_metrics_gradient_without_a_pass(tiny_models, task_file, log_p_task):
    """A logit difference is linear in the logits: attribution takes its gradient at zero logits
    instead of running the model to find them, and gets what the general path gets."""
    from nnsight_sae_circuits.attribution import attribution_terms

    model = tiny_models("llama")
    task = get_task(task_file)
    prompts = task.prompts(model.tokenizer, 16)
    assert task.metric_is_linear(prompts)

    class AnyMetric(type(task)):
        def metric_is_linear(self, prompts):
            return False

    general = AnyMetric(task_file)
    for steps in (0, 2):
        for ours, theirs in zip(attribution_terms(model, task, prompts, steps=steps),
                                attribution_terms(model, general, prompts, steps=steps)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    log_p = get_task(log_p_task)
    assert not log_p.metric_is_linear(log_p.prompts(model.tokenizer, 16))
    assert not get_task("greater-than").metric_is_linear(prompts)  # a probability difference


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_integrated_attribution_adds_up_to_ablating_every_head(tiny_models, task_file, tmp_path, ablation):
    """With ``steps`` N the estimates integrate the gradient between every head ablated and none: they
    add up to the metric's drop with all heads ablated (the midpoint rule's error falls as 1/N^2),
    which the plain gradient's do not."""
    from nnsight_sae.heads import keep_only_metric
    from nnsight_sae_circuits.attribution import attribution_effects

    model = tiny_models("llama")
    task = get_task(task_file)
    prompts = task.prompts(model.tokenizer, 20)
    plain = attribution_effects(model, task, prompts, ablation=ablation)
    L, H = plain.shape
    drop = float((keep_only_metric(model, task, prompts, torch.ones(L, H, dtype=torch.bool), ablation=ablation)
                  - keep_only_metric(model, task, prompts, torch.zeros(L, H, dtype=torch.bool),
                                     ablation=ablation)).mean())
    errors = [abs(float(attribution_effects(model, task, prompts, ablation=ablation, steps=n).sum()) - drop)
              for n in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 * abs(drop), (errors, drop)
    assert abs(float(plain.sum()) - drop) > 10 * errors[2]
    c = run_circuit(model, task_file, tmp_path, n_prompts=20, options={"steps": 8, "verify": 0}, ablation=ablation,
                    n_random=1, progress=False)
    assert c["options"] == {"steps": 8, "verify": 0}
    assert sum(h["effect"] for h in c["heads"]) == pytest.approx(drop, abs=0.1 * abs(drop))


def test_circuit_ablates_as_its_reference_does(tiny_models, task_file, tmp_path):
    from nnsight_sae.heads import ABLATIONS
    from nnsight_sae_circuits.attribution import STEPS_BY_ABLATION

    model = tiny_models("llama")
    ref = run_reference(model, task_file, tmp_path / "ref", n_prompts=12, top=4, ablation="zero", progress=False)
    assert ref["ablation"] == "zero" and ref["method"] == "zero-ablation"
    c = run_circuit(model, task_file, tmp_path / "c", n_prompts=12, reference=tmp_path / "ref", n_random=1,
                    progress=False)
    # under zero ablation attribution's gradient is taken at the clean run unless steps says otherwise
    assert set(STEPS_BY_ABLATION) == set(ABLATIONS)  # every ablation has a default
    assert c["ablation"] == "zero" and c["options"] == {"steps": 0, "verify": 40}
    runs = {name: run_circuit(model, task_file, tmp_path / name, n_prompts=12, reference=tmp_path / "ref",
                              options=options, n_random=1, progress=False)
            for name, options in {"auto": {"verify": 0}, "clean": {"steps": 0, "verify": 0},
                                  "integrated": {"steps": 2, "verify": 0}}.items()}
    assert runs["auto"]["heads"] == runs["clean"]["heads"] != runs["integrated"]["heads"]
    assert runs["integrated"]["options"] == {"steps": 2, "verify": 0}
    # attribution's estimate of zero ablation is not its estimate of mean ablation
    other = run_circuit(model, task_file, tmp_path / "m", n_prompts=12, reference=tmp_path / "ref", ablation="mean",
                        n_random=1, progress=False)
    assert other["ablation"] == "mean" and other["heads"] != c["heads"] and other["options"]["steps"] == 2
    assert c["faithfulness"]["metric_all_ablated"] != other["faithfulness"]["metric_all_ablated"]
    with pytest.raises(NnsightSaeError, match="unknown ablation 'half'; one of mean, position-mean"):
        run_reference(model, task_file, tmp_path / "bad", ablation="half", progress=False)
    assert not (tmp_path / "bad").exists()


def test_faithfulness_curve(tiny_models, task_file, tmp_path):
    model = tiny_models("llama")
    c = run_circuit(model, task_file, tmp_path, n_prompts=12, curve=[1, 4, 12, 50], n_random=1, progress=False)
    curve = c["faithfulness"]["curve"]
    assert [row["k"] for row in curve] == [1, 4, 12]  # capped at the 12 heads there are
    assert curve[-1]["top_k"] == pytest.approx(1.0) and curve[-1]["random_k"] == [pytest.approx(1.0)] * 2
    assert (tmp_path / "faithfulness.png").stat().st_size > 1000
    assert "reference_top_k" not in curve[0]
    run_reference(model, task_file, tmp_path / "ref", n_prompts=12, top=4, progress=False)
    c = run_circuit(model, task_file, tmp_path / "c", n_prompts=12, curve=[4, 12], reference=tmp_path / "ref",
                    options={"verify": 12}, n_random=1, progress=False)
    # every head verified: the method's ranking is the reference's, so are the heads kept alone
    for row in c["faithfulness"]["curve"]:
        assert row["reference_top_k"] == pytest.approx(row["top_k"], abs=1e-5)
        assert row["reference_top_k_positive"] == pytest.approx(row["top_k_positive"], abs=1e-5)
    assert c["faithfulness"]["curve"][-1]["reference_top_k"] == pytest.approx(1.0)
    with pytest.raises(NnsightSaeError, match="--curve takes positive head counts"):
        run_circuit(model, task_file, tmp_path, n_prompts=12, curve=[0, 4], progress=False)


def test_code_overlap_is_deterministic(tiny_models, task_file, tmp_path):
    model = tiny_models("llama")
    for method in ("code-overlap", "code-overlap-edges"):
        a = run_circuit(model, task_file, tmp_path / "a", method=method, n_prompts=20, n_train=5, seed=3,
                        options={"reduce": "last"}, n_random=1, progress=False)
        b = run_circuit(model, task_file, tmp_path / "b", method=method, n_prompts=20, n_train=5, seed=3,
                        options={"reduce": "last"}, n_random=1, progress=False)
        assert a["heads"] == b["heads"] and a["faithfulness"] == {**b["faithfulness"], "seconds": a[
            "faithfulness"]["seconds"]}


def test_circuit_cli_bad_input(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "nnsight_sae", *a], capture_output=True, text=True)  # noqa
    r = run("circuit", "--task", "nosuch", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown task 'nosuch'" in r.stderr and not (tmp_path / "o").exists()
    r = run("circuit", "--task", "ioi", "--method", "magic", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown circuit method 'magic'" in r.stderr
    r = run("circuit", "--task", "ioi", "--reference", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "reference.json" in r.stderr
    r = run("reference", "--task", "ioi", "--top", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--top must be positive" in r.stderr
    r = run("reference", "--task", "ioi", "--ablation", "half", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "invalid choice: 'half'" in r.stderr and not (tmp_path / "o").exists()
    r = run("circuit", "--task", "ioi", "--prompts", "other", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "invalid choice: 'other'" in r.stderr and not (tmp_path / "o").exists()


def test_file_task_has_no_heldout_split(tiny_models, task_file):
    with pytest.raises(NnsightSaeError, match="for held-out prompts pass another file"):
        get_task(task_file).prompts(tiny_models("llama").tokenizer, split="heldout")


def test_code_counts_by_hand():
    from nnsight_sae_circuits.code_overlap import code_edge_scores, code_overlap_scores, unique_to_positive

    pos = torch.tensor([[1, 5], [2, 5], [1, 6], [3, 7]])
    neg = torch.tensor([[3, 5], [4, 5]])
    # column 0: {1, 2, 3} on positives, 3 also on a negative -> 2; column 1: {5, 6, 7} minus 5 -> 2
    assert unique_to_positive(pos, neg).tolist() == [2, 2]
    assert unique_to_positive(pos, neg, chunk_cells=1).tolist() == [2, 2]  # chunked the same
    codes_pos = torch.tensor([[[0], [1]], [[0], [2]], [[1], [1]]])  # (n=3, L=2, H=1)
    codes_neg = torch.tensor([[[0], [1]], [[1], [0]]])
    assert code_overlap_scores(codes_pos, codes_neg).tolist() == [[0.0], [1.0]]
    # pairs (layer0, layer1): positives (0,1) (0,2) (1,1); negatives (0,1) (1,0) -> 2 unique pairs
    assert code_edge_scores(codes_pos, codes_neg, n_features=3).tolist() == [[2.0], [2.0]]


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_keep_only_matches_clean_and_single_head_ablation(tiny_models, task_file, ablation):
    from nnsight_sae.heads import ablation_effects, keep_only_metric, last_logits

    model = tiny_models("llama")
    task = get_task(task_file)
    prompts = task.prompts(model.tokenizer, 12)
    clean = task.metric(last_logits(model, prompts.positive), prompts)
    everything = torch.ones(3, 4, dtype=torch.bool)
    torch.testing.assert_close(keep_only_metric(model, task, prompts, everything, ablation=ablation), clean,
                               rtol=1e-5, atol=1e-5)
    effects = ablation_effects(model, task, prompts, ablation=ablation, progress=False)
    for layer, head in [(0, 1), (2, 3)]:
        keep = everything.clone()
        keep[layer, head] = False
        drop = clean.mean() - keep_only_metric(model, task, prompts, keep, ablation=ablation).mean()
        torch.testing.assert_close(drop, effects[layer, head], rtol=1e-4, atol=1e-5)


def test_circuit_benchmark_contract(tiny_models, task_file, tmp_path):
    from nnsight_sae import bench

    bench.bench_circuit(tiny_models("llama"), tmp_path, task=task_file, n_prompts=12)
    result = json.loads((tmp_path / "circuit-copy.json").read_text())
    assert set(result) == {"what", "ratio", "ours", "baseline", "unit", "setup"}
    assert result["ratio"] == pytest.approx(result["baseline"] / result["ours"], abs=0.01) and result["ratio"] > 0


def test_attribution_needs_no_weight_gradients(tiny_models, task_file, tmp_path):
    """NDIF runs models with gradients off for the weights; attribution starts its graph at the heads."""
    from nnsight_sae.testing import load_tiny_model
    from nnsight_sae_circuits.attribution import attribution_effects

    task = get_task(task_file)
    model = tiny_models("llama")
    frozen = load_tiny_model("llama", tmp_path, device_map={"": "cpu"})
    for p in frozen._module.parameters():
        p.requires_grad_(False)
    prompts = task.prompts(model.tokenizer, 12)
    torch.testing.assert_close(attribution_effects(frozen, task, prompts), attribution_effects(model, task, prompts))
