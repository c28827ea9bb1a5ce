import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

# Tests never reach the Hub; plugins come only from this distribution unless a test says otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A fresh cache per test run, so each run converts the model and harvests for itself (shared by the
# tests of that run, subprocesses included), removed when the run ends: a full run harvests several
# GB. NNSIGHT_SAE_TEST_CACHE=DIR reuses (and keeps) one while iterating.
if os.environ.get("NNSIGHT_SAE_TEST_CACHE"):
    os.environ["NNSIGHT_SAE_CACHE"] = os.environ["NNSIGHT_SAE_TEST_CACHE"]
else:
    os.environ["NNSIGHT_SAE_CACHE"] = tempfile.mkdtemp(prefix="nnsight-sae-")
    atexit.register(shutil.rmtree, os.environ["NNSIGHT_SAE_CACHE"], ignore_errors=True)
warnings.filterwarnings("ignore", category=DeprecationWarning)

from nnsight_sae.testing import FAMILIES, load_tiny_model, tiny_prompts  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> a loaded tiny random model on the CPU (also on a GPU machine, where loading
    would pick the GPU: tests/test_gpu.py covers that), built once per session."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_tiny_model(family, tmp_path_factory.mktemp(family), device_map={"": "cpu"})
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_models):
    return tiny_models(request.param)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (converted to the cache on first use)."""
    from nnsight_sae import load_model

    return load_model()


def _train_cli(out, *args):
    """`nnsight-sae train ... --out OUT` in a subprocess; fails the test with its stderr."""
    t = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "nnsight_sae", "train", *map(str, args), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\ntrain {' '.join(map(str, args))}: {time.perf_counter() - t:.0f}s")


def _shared_run(tmp_path_factory, reuse_env: str, *args):
    """The folder of a training run shared by several tests: the one named by the environment
    variable ``reuse_env`` (to reuse a run while iterating), else a fresh `nnsight-sae train ARGS`."""
    if os.environ.get(reuse_env):
        from pathlib import Path

        return Path(os.environ[reuse_env])
    out = tmp_path_factory.mktemp("run")
    _train_cli(out, *args)
    return out


# The code fixtures (the TopK SAE on resid_post.6, the transcoders, the tc-vs-sae sweep and the
# causal tree's upstream SAE on resid_post.5) all read one harvest of CODE_TOKENS code-corpus tokens:
# a store of more sites on the same tokens serves any of its sites, so `code_harvest` runs the model
# once, through layer 6, for all of them. The budgets are small so that `make test` fits on slow CI
# machines; the README's tables come from the documented commands with the full budgets.
CODE_TOKENS = 100_000
TRANSCODER_LAYERS = (0, 6)
CODE_SITES = ["resid_post.5", "resid_post.6",
              *(f"mlp_{io}.{layer}" for layer in TRANSCODER_LAYERS for io in ("in", "out"))]


@pytest.fixture(scope="session")
def code_harvest(smol):
    """The shared harvest of the code corpus at CODE_SITES (about 3 minutes on a slow 2-core machine)."""
    from nnsight_sae.pipeline import DataSpec, activation_store

    return activation_store(smol, CODE_SITES, DataSpec(corpus="code", tokens=CODE_TOKENS), progress=False)


@pytest.fixture(scope="session")
def smol_resid6(tmp_path_factory, code_harvest):
    """A TopK SAE (k 32, d_sae 4608) on SmolLM2's resid_post.6 over the code harvest x 3 epochs,
    shared by the quality bar and the feature analyses: `nnsight-sae train --type topk --site
    resid_post.6 --tokens 100000 --epochs 3 --d-sae 4608 --corpus code --eval-tokens 2048` (the
    README's quality and feature tables use 300k tokens). Returns the run folder
    (NNSIGHT_SAE_TEST_RESID6=DIR reuses one while iterating)."""
    return _shared_run(tmp_path_factory, "NNSIGHT_SAE_TEST_RESID6", "--type", "topk", "--site", "resid_post.6",
                       "--tokens", CODE_TOKENS, "--epochs", 3, "--d-sae", 4608, "--corpus", "code",
                       "--eval-tokens", 2048)


@pytest.fixture(scope="session")
def transcoders(tmp_path_factory, code_harvest):
    """Transcoders on SmolLM2's MLPs 0 and 6 (d_sae 4608, L1 5e-4), trained in lockstep on the code
    harvest x 2 epochs: `nnsight-sae train --type transcoder --site mlp_in.0,mlp_in.6 --tokens 100000
    --epochs 2 --d-sae 4608 --eval-tokens 2048 --corpus code`. Returns layer -> folder
    (NNSIGHT_SAE_TEST_TRANSCODERS=DIR reuses a run while iterating)."""
    run = _shared_run(tmp_path_factory, "NNSIGHT_SAE_TEST_TRANSCODERS", "--type", "transcoder", "--site",
                      ",".join(f"mlp_in.{layer}" for layer in TRANSCODER_LAYERS), "--tokens", CODE_TOKENS,
                      "--epochs", 2, "--d-sae", 4608, "--eval-tokens", 2048, "--corpus", "code")
    return {layer: run / f"transcoder-mlp_in.{layer}-4608" for layer in TRANSCODER_LAYERS}


PROSE_LAYERS = (6, 12, 18)


@pytest.fixture(scope="session")
def smol_prose_saes(tmp_path_factory):
    """TopK SAEs like ``smol_resid6``'s (d_sae 4608, k 32) on SmolLM2's resid_post.6, .12 and .18,
    trained in lockstep on 60k tokens of the embedded prose corpus x 3 epochs (one harvest; a
    1,024-token evaluation, as the tests need none): `nnsight-sae train --type topk --site
    resid_post.6,resid_post.12,resid_post.18 --tokens 60000 --epochs 3 --d-sae 4608 --corpus prose
    --eval-tokens 1024` (the README's tables use 300k tokens). Each dictionary's data order and
    initialisation depend only on the seed, so the resid_post.6 one is what training it alone gives.
    Returns layer -> folder (NNSIGHT_SAE_TEST_PROSE=DIR reuses a run while iterating)."""
    run = _shared_run(tmp_path_factory, "NNSIGHT_SAE_TEST_PROSE", "--type", "topk", "--site",
                      ",".join(f"resid_post.{layer}" for layer in PROSE_LAYERS), "--tokens", 60_000, "--epochs", 3,
                      "--d-sae", 4608, "--corpus", "prose", "--eval-tokens", 1024)
    return {layer: run / f"topk-resid_post.{layer}-4608" for layer in PROSE_LAYERS}


@pytest.fixture
def corpus(tmp_path):
    """Word-level text the tiny tokenizer reads one token per word."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(tiny_prompts(n=200, length=40, seed=1)))
    return str(path)


@pytest.fixture
def counterfactual_task(tmp_path):
    """The answer is the word before the repeated one; the counterfactual changes that word."""
    rows = []
    for i in range(5, 29):
        rows.append({"prompt": f"w{i} w{i + 1} w{i + 2} w{i + 1}", "answer": f" w{i}",
                     "negative": f"w{i} w{i + 1} w{i + 2} w{i + 3}", "wrong": f" w{i + 2}",
                     "counterfactual": f"w{i + 40} w{i + 1} w{i + 2} w{i + 1}"})
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture
def task_file(tmp_path):
    """A copy task: the answer repeats the word after the repeated one."""
    rows = [{"prompt": f"w{i} w{i + 1} w{i + 2} w{i}", "answer": f" w{i + 1}",
             "negative": f"w{i} w{i + 1} w{i + 2} w{i + 3}", "negative_answer": f" w{i + 4}",
             "wrong": f" w{i + 2}"} for i in range(5, 45)]
    rows.append({"prompt": "w5 w6", "answer": " w7 w8", "negative": "w9 w10"})  # two-token answer: skipped
    rows.append({"prompt": "w5 w6", "answer": " w7", "negative": "w9 w10 w11"})  # lengths differ: skipped
    path = tmp_path / "copy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture
def log_p_task(task_file, tmp_path):
    """``task_file`` without its wrong tokens: the metric is log p(answer), not linear in the logits."""
    with open(task_file) as f:
        rows = [json.loads(line) for line in f]
    path = tmp_path / "log-p.jsonl"
    path.write_text("\n".join(json.dumps({k: v for k, v in row.items() if k != "wrong"}) for row in rows))
    return str(path)
