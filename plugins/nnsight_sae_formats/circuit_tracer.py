"""circuit-tracer's per-layer transcoders: ``layer_{L}.safetensors`` beside the set's ``config.yaml``.

Facts from circuit-tracer 0.5.0 unless noted. transcoder/single_layer_transcoder.py
(SingleLayerTranscoder.to_safetensors, load_relu_transcoder): W_enc (F, d) used as x @ W_enc.T + b_enc;
W_dec (F, d); b_enc; b_dec; ``activation_function.threshold`` (F,) for a JumpReLU, absent for a ReLU;
W_skip (d, d) used as x @ W_skip.T. utils/hf_utils.py: config.yaml has model_kind (transcoder_set or
cross_layer_transcoder), feature_input_hook and feature_output_hook (TransformerLens names relative to
blocks.L) and optionally model_name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from nnsight_sae.atomic import atomic_file, write_text
from nnsight_sae.errors import DictionaryError
from nnsight_sae.files import Format, build, hook_of_site, read_safetensors, site_of_hook
from nnsight_sae.sites import site_layer

CONFIG = "config.yaml"
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
_HOOKS = ("feature_input_hook", "feature_output_hook")


def read_config(file: Path) -> dict:
    """A transcoder set's config.yaml, checked; DictionaryError naming the file."""
    try:
        config = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise DictionaryError(f"{file} is missing") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None)
        why = f"{problem} at line {mark.line + 1}" if mark and problem else " ".join(str(e).split())
        raise DictionaryError(f"{file} is not valid YAML: {why}") from None
    if not isinstance(config, dict):
        raise DictionaryError(f"{file} must hold a YAML mapping")
    for key in ("model_kind", *_HOOKS):
        if not isinstance(config.get(key), str):
            raise DictionaryError(f"{file}: missing field {key!r} (or not a string)")
    if config["model_kind"] == "cross_layer_transcoder":
        raise DictionaryError(f"{file}: a cross-layer transcoder (its features write to every later layer); "
                              f"nnsight-sae reads circuit-tracer's per-layer transcoders (transcoder_set) only")
    if config["model_kind"] != "transcoder_set":
        raise DictionaryError(f"{file}: model_kind {config['model_kind']!r}, expected transcoder_set")
    return config


def _site(hook: str, layer: int, model: str | None, where: Path) -> str:
    """Our site for a circuit-tracer hook in layer L. Its utils/tl_nnsight_mapping.py puts
    ln2.hook_normalized before the norm's gain, and hook_mlp_out, in Gemma 2/3, after
    post_feedforward_layernorm; elsewhere the TransformerLens names mean what site_of_hook says."""
    if hook == "ln2.hook_normalized":
        raise DictionaryError(f"{where}: the set reads ln2.hook_normalized, the residual divided by its RMS before "
                              f"the norm's gain (circuit-tracer 0.5.0 utils/tl_nnsight_mapping.py, TransformerLens' "
                              f"RMSNorm); nnsight-sae's mlp_in.{layer} is the norm's output after the gain, and no "
                              f"module outputs the value before it")
    if hook == "hook_mlp_out" and "gemma" in (model or "").lower():
        return f"module:model.layers.{layer}.post_feedforward_layernorm"
    try:
        return site_of_hook(f"blocks.{layer}.{hook}")
    except DictionaryError as e:
        raise DictionaryError(f"{where}: {e}") from None


def _hook(site: str, layer: int) -> str:
    """circuit-tracer's hook (relative to blocks.L) for one of our sites in layer L: mlp_out is
    mlp.hook_out, which its utils/tl_nnsight_mapping.py maps to the MLP's own output in every family
    (hook_of_site's hook_mlp_out is after Gemma's post-MLP norm there)."""
    if site_layer(site) != layer:
        raise DictionaryError(f"circuit-tracer hooks are relative to one layer's block; {site} is not in layer "
                              f"{layer}")
    if site.startswith("mlp_out."):
        return "mlp.hook_out"
    return hook_of_site(site).removeprefix(f"blocks.{layer}.")


class CircuitTracerFormat(Format):
    name = "circuit_tracer"
    help = "circuit-tracer per-layer transcoder: layer_L.safetensors beside the set's config.yaml"
    library = "circuit-tracer 0.5.0 (TranscoderSet.to_safetensors, load_relu_transcoder)"
    hub_files = (CONFIG, "layer_*.safetensors")
    writes = True

    def detect(self, path):
        return path.is_file() and _LAYER_FILE.fullmatch(path.name) is not None and (path.parent / CONFIG).is_file()

    def read(self, path):
        if not (m := _LAYER_FILE.fullmatch(path.name)):
            raise DictionaryError(f"{path}: give the set's layer_<L>.safetensors file")
        layer = int(m[1])
        config = read_config(path.parent / CONFIG)
        model = config["model_name"] if isinstance(config.get("model_name"), str) else None
        site, out_site = (_site(config[key], layer, model, path.parent / CONFIG) for key in _HOOKS)
        weights = read_safetensors(path)
        if "log_thresholds" in weights:  # load_relu_transcoder asserts it absent too
            raise DictionaryError(f"{path}: log_thresholds is not a circuit-tracer transcoder key")
        threshold = weights.pop("activation_function.threshold", None)
        for key in ("W_enc", "W_dec"):
            if key not in weights or weights[key].dim() != 2:
                raise DictionaryError(f"{path}: no 2-D {key} (keys: {', '.join(sorted(weights))})")
        weights["W_enc"] = weights["W_enc"].T.contiguous()
        if threshold is not None:
            # circuit-tracer's JumpReLU is x * (x > threshold), without ours' ReLU: equal when threshold >= 0
            if (threshold < 0).any():
                raise DictionaryError(f"{path}: {int((threshold < 0).sum())} negative JumpReLU thresholds; "
                                      f"circuit-tracer lets those features output negative values, which "
                                      f"nnsight-sae's JumpReLU (ReLU first) cannot")
            weights["threshold"] = threshold
        d_in, d_sae = weights["W_enc"].shape
        options = {"d_in": d_in, "d_sae": d_sae, "site": site, "out_site": out_site, "model": model,
                   "d_out": weights["W_dec"].shape[1], "skip": "W_skip" in weights, "apply_b_dec_to_input": False,
                   "dtype": str(weights["W_enc"].dtype).removeprefix("torch.")}
        return build("jumprelu" if threshold is not None else "transcoder", options, weights, path)

    def write(self, dictionary, path):
        """Write ``path/layer_{L}.safetensors`` and (or check) ``path/config.yaml``; returns the layer file.
        Several layers of one set go into one folder."""
        d, folder = dictionary, Path(path)
        if d.out_site is None or d.type_name not in ("transcoder", "jumprelu"):
            raise DictionaryError(f"circuit-tracer holds transcoders (ReLU or JumpReLU, with an out_site); this is "
                                  f"a {d.type_name} reading and writing {d.site}")
        if d.d_in != d.d_out:
            raise DictionaryError(f"circuit-tracer transcoders have one width (d_model); this reads {d.d_in} and "
                                  f"writes {d.d_out}")
        layer = site_layer(d.site)
        if layer is None or hook_of_site(d.site) is None or hook_of_site(d.out_site) is None:
            raise DictionaryError(f"{d.site} -> {d.out_site}: circuit-tracer names sites by TransformerLens hooks, "
                                  f"and one of these has none")
        config = {"model_kind": "transcoder_set", "feature_input_hook": _hook(d.site, layer),
                  "feature_output_hook": _hook(d.out_site, layer)}
        if d.cfg.model:
            config["model_name"] = d.cfg.model
        if (folder / CONFIG).exists():  # a set's layers share one config
            old = read_config(folder / CONFIG)
            clash = [k for k, v in config.items() if old.get(k, v) != v]
            if clash:
                raise DictionaryError(f"{folder / CONFIG} belongs to a set with another {', '.join(clash)} "
                                      f"({', '.join(f'{old[k]!r}' for k in clash)}); write this one elsewhere")
            config = {**old, **config}
        weights = {"W_enc": d.W_enc.T, "W_dec": d.W_dec, "b_enc": d.b_enc, "b_dec": d.b_dec}
        if d.type_name == "jumprelu":
            # relu(x) * (x > t) == x * (x > max(t, 0)): negative thresholds are written as 0
            weights["activation_function.threshold"] = d.threshold.clamp_min(0)
        if d.cfg.skip:
            weights["W_skip"] = d.W_skip
        file = folder / f"layer_{layer}.safetensors"
        with atomic_file(file) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp)
        write_text(folder / CONFIG, yaml.safe_dump(config, sort_keys=False))
        return file
