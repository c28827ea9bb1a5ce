import json
import subprocess
import sys

import pytest

import nnsight_sae
from nnsight_sae import PluginError, UnknownNameError, hookimpl
from nnsight_sae.plugins import build_plugin_manager, collect, registry

FIRST_PARTY = {"archs", "saes", "circuits", "features", "formats"}


def test_first_party_plugins_load_through_entry_points():
    reg = collect(build_plugin_manager(autoload=False))
    assert FIRST_PARTY <= set(reg.plugins)
    assert all(reg.plugins[p] == "nnsight-sae" for p in FIRST_PARTY)
    assert {"llama", "gpt2", "gpt_neox", "gemma", "bert"} <= set(reg.architectures)
    assert reg.architectures["llama"].plugin == "archs"
    assert reg.dictionary_types["topk"].plugin == "saes"


def test_blocking_a_plugin_leaves_the_rest_working():
    reg = collect(build_plugin_manager(autoload=False, blocked=["saes"]))
    assert reg.dictionary_types == {}
    assert "llama" in reg.architectures  # the other plugin still works


class _Clash:
    name = "clash-plugin"

    @hookimpl
    def nnsight_sae_architectures(self):
        return [registry().architectures["llama"].obj]


def test_conflict_names_both_plugins():
    pm = build_plugin_manager(autoload=False, extra=[_Clash()])
    with pytest.raises(PluginError) as e:
        collect(pm)
    msg = str(e.value)
    assert "'llama'" in msg and "'archs'" in msg and "'clash-plugin'" in msg


def test_unknown_name_is_typed_and_lists_what_exists():
    with pytest.raises(UnknownNameError, match="unknown dictionary type 'nosuch'.*topk"):
        registry().get("dictionary_types", "nosuch")


def test_env_var_disables_third_party_autoload(monkeypatch):
    monkeypatch.setenv("NNSIGHT_SAE_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("NNSIGHT_SAE_BLOCK_PLUGINS", "saes")
    reg = collect(build_plugin_manager())
    assert set(reg.plugins) == FIRST_PARTY - {"saes"}  # first-party only, minus the blocked one


def test_info_prints_json_with_owners():
    out = subprocess.run([sys.executable, "-m", "nnsight_sae", "info"], capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out)
    assert info["architectures"]["llama"]["plugin"] == "archs"
    assert "qwen2" in info["architectures"]["llama"]["model_types"]
    assert info["dictionary_types"]["topk"]["plugin"] == "saes"
    assert set(info) == {"plugins", "dictionary_types", "analyses", "circuit_methods", "tasks", "architectures",
                         "formats"}
    assert info["formats"]["saelens"]["plugin"] == "core" and info["formats"]["sparsify"]["plugin"] == "formats"
    assert info["formats"]["sparsify"]["library"] == "eai-sparsify 1.3.3" and info["formats"]["sparsify"]["writes"]
    assert info["circuit_methods"]["attribution"]["plugin"] == "circuits"


def test_hookimpl_is_public():
    assert nnsight_sae.hookimpl is hookimpl
