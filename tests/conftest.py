import os
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
# tests of that run, subprocesses included). NNSIGHT_SAE_TEST_CACHE=DIR reuses one while iterating.
os.environ["NNSIGHT_SAE_CACHE"] = os.environ.get("NNSIGHT_SAE_TEST_CACHE") or tempfile.mkdtemp(prefix="nnsight-sae-")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from nnsight_sae.testing import FAMILIES, load_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> a loaded tiny random model, built once per session."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_tiny_model(family, tmp_path_factory.mktemp(family))
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


@pytest.fixture(scope="session")
def train_cli():
    return _train_cli


@pytest.fixture(scope="session")
def smol_resid6(tmp_path_factory):
    """TopK (k 32) and ReLU SAEs, d_sae 4608, on SmolLM2's resid_post.6 over 300k tokens x 3 epochs
    (several minutes), shared by the quality bars and the feature analyses. One run, two dictionaries
    in lockstep; each dictionary's data order and initialisation depend only on the seed, so the topk
    one is what `nnsight-sae train --type topk --site resid_post.6 --tokens 300000 --epochs 3
    --d-sae 4608` gives. Returns the run folder (NNSIGHT_SAE_TEST_RESID6=DIR reuses one while iterating)."""
    if os.environ.get("NNSIGHT_SAE_TEST_RESID6"):
        from pathlib import Path

        return Path(os.environ["NNSIGHT_SAE_TEST_RESID6"])
    out = tmp_path_factory.mktemp("resid6")
    _train_cli(out, "--type", "topk,relu", "--site", "resid_post.6", "--tokens", 300_000, "--epochs", 3,
              "--d-sae", 4608)
    return out
