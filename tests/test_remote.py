"""remote= through load_model and every analysis that traces, on nnsight's local simulation
of the NDIF round trip; each request is checked against our size limit and the import
allow-list (which the simulation itself does not enforce); remote bad input."""

import os
import subprocess
import sys

import pytest
import torch

import nnsight_sae.remote as remote
from nnsight_sae import ModelLoadError, RemoteError, attach, load_model, run_analysis, save_dictionary
from nnsight_sae.circuits import run_circuit, run_reference
from nnsight_sae.evaluate import evaluate, replacement_ce
from nnsight_sae.harvest import harvest
from nnsight_sae.testing import load_tiny_model, random_dictionary, tiny_prompts


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny Llama loaded twice: locally, and with remote="local"."""
    folder = tmp_path_factory.mktemp("llama")
    return load_tiny_model("llama", folder), load_tiny_model("llama", folder, remote="local")


@pytest.fixture
def requests(monkeypatch):
    """Counts the requests checked (each simulated remote trace sends one)."""
    seen = []

    def counting(blob):
        seen.append(len(blob))
        return check(blob)

    check = remote.check_request
    monkeypatch.setattr(remote, "check_request", counting)
    return seen


def _same(a, b, path=""):
    """Results equal to float tolerance, timings aside."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in ("seconds", "time"):
                _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), path
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:
        assert a == b, path


def _modules(model):
    return sorted(name for name, _ in model._module.named_modules())


def _analyses(tmp_path, corpus, counterfactual_task, task_file, log_p_task):
    """name -> a function of (model, out folder) running one analysis end to end."""
    up = save_dictionary(random_dictionary("resid_post.0", seed=1), tmp_path / "up")
    data = dict(data=corpus, tokens=2000, ctx_len=40)
    tc = random_dictionary("mlp_in.1", type_name="transcoder", d_out=32, out_site="mlp_out.1")
    prompts = tiny_prompts(4, 12)
    return {
        "harvest": lambda m, out: [r for r in harvest(m, ["resid_post.0", "head_out.1"],
                                                      m.tokenizer(prompts, return_tensors="pt").input_ids,
                                                      progress=False)],
        "evaluate": lambda m, out: evaluate(m, [random_dictionary("resid_post.1"), tc],
                                            m.tokenizer(prompts, return_tensors="pt").input_ids, progress=False),
        "replacement": lambda m, out: replacement_ce(m, [tc], m.tokenizer(prompts, return_tensors="pt").input_ids,
                                                     progress=False),
        "reference": lambda m, out: run_reference(m, task_file, out, n_prompts=12, top=4, progress=False),
        "attribution": lambda m, out: run_circuit(m, task_file, out, method="attribution", n_prompts=12),
        "integrated-attribution": lambda m, out: run_circuit(m, log_p_task, out, options={"steps": 2, "verify": 0},
                                                             n_prompts=12),
        "code-overlap": lambda m, out: run_circuit(m, task_file, out, method="code-overlap", n_prompts=12),
        "feature-patching": lambda m, out: run_analysis(
            "feature-patching", model=m, dictionary=random_dictionary("resid_post.1"), out_dir=out,
            task=counterfactual_task, n_prompts=8, candidates=4, **data),
        "causal-tree": lambda m, out: run_analysis(
            "causal-tree", model=m, dictionary=random_dictionary("resid_post.1"), out_dir=out, feature=5,
            upstream=[str(up)], contexts=4, candidates=8, **data),
        "feature-report": lambda m, out: run_analysis(
            "feature-report", model=m, dictionary=random_dictionary("resid_post.1"), out_dir=out,
            features=[3], contexts=3, **data),
        "feature-circuit": lambda m, out: run_analysis(
            "feature-circuit", model=m, dictionary=[random_dictionary("resid_post.0"), tc], out_dir=out,
            task=counterfactual_task, n_prompts=8, steps=2, check_nodes=4, random_sets=1, **data),
    }


ANALYSES = ["harvest", "evaluate", "replacement", "reference", "attribution", "integrated-attribution", "code-overlap",
            "feature-patching", "causal-tree", "feature-report", "feature-circuit"]


@pytest.mark.parametrize("name", ANALYSES)
def test_analysis_runs_remotely_with_the_same_results(name, pair, requests, tmp_path, corpus,
                                                     counterfactual_task, task_file, log_p_task):
    local, simulated = pair
    run = _analyses(tmp_path, corpus, counterfactual_task, task_file, log_p_task)[name]
    expected = run(local, tmp_path / "local")
    assert not requests  # a local model sends nothing
    modules = _modules(simulated)
    got = run(simulated, tmp_path / "remote")
    assert requests, "no trace went through the remote backend"
    _same(expected, got)
    assert _modules(simulated) == modules  # nothing attached to the model tree


def test_user_trace_with_splice_goes_through_the_checked_backend(pair, requests):
    from nnsight_sae.models import trace_options

    local, simulated = pair
    d = random_dictionary("resid_post.1", d_sae=4096)
    prompts = tiny_prompts(2)
    outs = []
    for model in pair:
        a = attach(model, d)
        with model.trace(prompts, **trace_options(model)):
            a.splice(ablate=[1, 2])
            logits = model.output.logits.save()
        outs.append(logits)
    torch.testing.assert_close(outs[0], outs[1])
    weights = 2 * 32 * 4096 * 4  # W_enc + W_dec in float32: they travel with the request
    assert len(requests) == 1 and weights < requests[0] < weights + 200_000


def test_request_over_the_size_limit_is_refused(pair, monkeypatch):
    from nnsight_sae.models import trace_options

    simulated = pair[1]
    a = attach(simulated, random_dictionary("resid_post.1", d_sae=4096))
    monkeypatch.setenv("NNSIGHT_SAE_REMOTE_MAX_BYTES", str(500_000))
    with pytest.raises(RemoteError, match=r"request is 1\.\d MiB, over our limit of 0\.5 MiB"):
        with simulated.trace(tiny_prompts(2), **trace_options(simulated)):
            a.splice()
            simulated.output.logits.save()


def test_in_trace_code_outside_the_allow_list_is_refused(pair, tmp_path, monkeypatch):
    import importlib

    import nnsight

    from nnsight_sae.models import trace_options

    (tmp_path / "badtrace_helpers.py").write_text(
        "import json\n\ndef scale(x):\n    return x * len(json.dumps([1]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = importlib.import_module("badtrace_helpers")
    nnsight.register(bad)
    simulated = pair[1]
    with pytest.raises(RemoteError, match=r"would import .*\bjson\b.* on NDIF"):
        with simulated.trace(tiny_prompts(2), **trace_options(simulated)):
            x = bad.scale(simulated.model.layers[0].output)
            x.save()


def test_remote_bad_input(tmp_path, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(ModelLoadError, match="needs an NDIF API key: set NDIF_API_KEY"):
        load_model("meta-llama/Llama-3.1-8B", remote=True)
    monkeypatch.setenv("NDIF_API_KEY", "k")
    with pytest.raises(ModelLoadError, match="the embedded model cannot be sent: pass a Hub id"):
        load_model(None, remote=True)
    with pytest.raises(ModelLoadError, match="a local file or folder"):
        load_model(tmp_path, remote=True)
    with pytest.raises(ModelLoadError, match="a local file or folder"):
        load_model("model.gguf", remote=True)
    with pytest.raises(ModelLoadError, match="device_map does not apply to a remote model"):
        load_model("meta-llama/Llama-3.1-8B", remote=True, device_map="auto")
    with pytest.raises(ModelLoadError, match="remote must be False, True or 'local'"):
        load_model(tmp_path, remote="yes")


def test_cli_remote_without_a_key_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
    env["XDG_CONFIG_HOME"] = env["NNSIGHT_CONFIG"] = str(tmp_path)  # no saved key either
    folder = save_dictionary(random_dictionary("resid_post.1"), tmp_path / "d")
    r = subprocess.run([sys.executable, "-m", "nnsight_sae", "analyze", "feature-report", "--dict", str(folder),
                        "--features", "1", "--model", "HuggingFaceTB/SmolLM2-135M", "--remote", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "nnsight-sae analyze: error: remote=True needs an NDIF API key: set NDIF_API_KEY, or run "
        "nnsight.CONFIG.set_default_api_key('KEY') once (keys: https://login.ndif.us)"]
    assert not (tmp_path / "o").exists()


def test_no_comment_lines_inside_our_trace_blocks(tmp_path, monkeypatch):
    import pkgutil

    import nnsight_sae_circuits
    import nnsight_sae_features

    from nnsight_sae.remote_check import trace_block_problems

    packages = [__import__("nnsight_sae"), nnsight_sae_circuits, nnsight_sae_features]
    modules = [m.name for p in packages for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")
               if not m.name.endswith("__main__")]
    assert "nnsight_sae.harvest" in modules and "nnsight_sae.heads" in modules
    assert trace_block_problems(*modules) == []
    (tmp_path / "commented_trace.py").write_text(
        "def f(model):\n    with model.trace('x'):\n        # a comment\n        y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert trace_block_problems("commented_trace") == ["commented_trace:3 comment line inside a trace block"]
