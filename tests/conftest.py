import os
import tempfile
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
