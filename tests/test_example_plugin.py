"""The out-of-tree example plugin, installed into a scratch folder on sys.path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "third_party_plugin"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    return {**os.environ, "PYTHONPATH": str(target)}


def run(env, *args, check=True):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=check)


def test_info_lists_the_plugins_type_and_analysis(plugin_env):
    info = json.loads(run(plugin_env, "-m", "nnsight_sae", "info").stdout)
    assert info["plugins"]["example"] == "nnsight-sae-example"
    assert info["dictionary_types"]["relu6"]["plugin"] == "example"
    assert info["analyses"]["top-features"]["plugin"] == "example"


def test_disable_autoload_hides_it(plugin_env):
    env = {**plugin_env, "NNSIGHT_SAE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    info = json.loads(run(env, "-m", "nnsight_sae", "info").stdout)
    assert "relu6" not in info["dictionary_types"] and "topk" in info["dictionary_types"]


SCRIPT = """
import sys, torch, nnsight_sae
from nnsight_sae.testing import load_tiny_model
model = load_tiny_model("llama", sys.argv[1])
d = nnsight_sae.create_dictionary("relu6", d_in=32, d_sae=64, site="resid_post.1", cap=0.5)
assert d.encode(torch.randn(10, 32) * 10).max() <= 0.5
nnsight_sae.save_dictionary(d, sys.argv[1] + "/dict")
back = nnsight_sae.load_dictionary(sys.argv[1] + "/dict")
assert type(back).__name__ == "Relu6SAE" and back.cfg.cap == 0.5
result = nnsight_sae.run_analysis("top-features", model=model, dictionary=back, out_dir=sys.argv[1] + "/out",
                                  prompt="w5 w6 w7 w8", n=3)
assert len(result["features"]) == 3
print("ok")
"""


def test_both_work_through_the_public_api(plugin_env, tmp_path):
    script = tmp_path / "use_plugin.py"  # nnsight reads trace bodies from source files
    script.write_text(SCRIPT)
    out = run(plugin_env, str(script), str(tmp_path), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "out" / "top-features.json").exists()


def test_analysis_runs_from_the_cli(plugin_env, tmp_path):
    script = tmp_path / "make.py"
    script.write_text("import sys, nnsight_sae\nfrom nnsight_sae.testing import make_tiny_model\n"
                      "make_tiny_model('gpt2', sys.argv[1] + '/m')\n"
                      "d = nnsight_sae.create_dictionary('relu6', d_in=32, d_sae=64, site='resid_post.0')\n"
                      "nnsight_sae.save_dictionary(d, sys.argv[1] + '/d')\n")
    run(plugin_env, str(script), str(tmp_path))
    out = run(plugin_env, "-m", "nnsight_sae", "analyze", "top-features", "--dict", str(tmp_path / "d"),
              "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--prompt", "w9 w10", "--n", "2",
              check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "o" / "top-features.json").read_text())
    assert [f["index"] for f in result["features"]] and len(result["features"]) == 2


def test_the_plugins_own_option_trains_from_the_cli(plugin_env, tmp_path):
    """A plugin's hyper-parameter is a flag of `train` with no code of ours naming it."""
    run(plugin_env, "-c", "import sys\nfrom nnsight_sae.testing import make_tiny_model\n"
                          "make_tiny_model('llama', sys.argv[1])", str(tmp_path / "m"))
    help_text = run(plugin_env, "-m", "nnsight_sae", "train", "--help").stdout
    assert "--cap CAP" in help_text and "(relu6: 6.0)" in " ".join(help_text.split())
    out = run(plugin_env, "-m", "nnsight_sae", "train", "--type", "relu6", "--cap", "4", "--site", "resid_post.1",
              "--model", str(tmp_path / "m"), "--tokens", "3000", "--ctx-len", "16", "--d-sae", "64",
              "--eval-tokens", "256", "--out", str(tmp_path / "d"), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["metadata"]["nnsight_sae"]["type"] == "relu6" and cfg["metadata"]["nnsight_sae"]["cap"] == 4.0
    check = run(plugin_env, "-c", "import sys, torch, nnsight_sae\nd = nnsight_sae.load_dictionary(sys.argv[1])\n"
                                  "x = torch.randn(500, 32) * 100\nprint(float(d.encode(x).max()))",
                str(tmp_path / "d"))
    assert float(check.stdout) == 4.0  # the cap holds after training (the folded input scale leaves it be)
    wrong = run(plugin_env, "-m", "nnsight_sae", "train", "--type", "topk", "--cap", "4", "--site", "resid_post.1",
                "--out", str(tmp_path / "x"), check=False)
    assert wrong.returncode == 2 and "--cap is not an option of --type topk (it is one of relu6)" in wrong.stderr
    assert not (tmp_path / "x").exists()


def test_the_analysis_help_shows_its_options_with_defaults(plugin_env):
    text = run(plugin_env, "-m", "nnsight_sae", "analyze", "top-features", "-h").stdout
    assert "--n N" in text and "features listed (default: 5)" in text and "--prompt" in text
