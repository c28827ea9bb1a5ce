"""Gemma Scope (Google DeepMind): JumpReLU SAEs and transcoders for Gemma 2 and Gemma 3. Read-only.

- Gemma Scope 1 (Gemma 2): ``<repo>/layer_L/width_W/average_l0_N/params.npz`` with keys W_enc (d_in, F),
  b_enc, W_dec (F, d_out), b_dec, threshold, and no config: the site comes from the repo's name
  (google/gemma-scope-2b-pt-res, -mlp, -att), which survives in the Hub cache's
  ``models--google--<repo>`` folder or a folder named after the repo.
- Gemma Scope 2 (Gemma 3): ``<repo>/<kind>/layer_L_width_W_l0_S[_affine]/params.safetensors`` (+ an
  optional ``config.json``), lower-case keys; ``_affine`` transcoders add affine_skip_connection.

Encode is ``relu(pre) * (pre > threshold)``, pre = x @ W_enc + b_enc, b_dec never subtracted from the input:
our "jumprelu" type with apply_b_dec_to_input false. Unless noted, facts are from sae-lens 6.54.12,
sae_lens/loading/pretrained_sae_loaders.py (get_gemma_2_config_from_hf, gemma_2_sae_huggingface_loader,
_infer_gemma_3_raw_cfg_dict, get_gemma_3_config_from_hf, gemma_3_sae_huggingface_loader).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from nnsight_sae.errors import DictionaryError
from nnsight_sae.files import Format, build, read_json, read_safetensors

GS1_FILE = "params.npz"
GS2_FILE = "params.safetensors"
GS2_CONFIG = "config.json"
_GS1_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-([a-z]+)")  # gemma-scope-2b-pt-res
_GS2_REPO = re.compile(r"gemma-scope-2-(\d+[mb])-(pt|it)")  # gemma-scope-2-1b-pt
_LAYER = re.compile(r"layer_(\d+)")

# HF module paths inside a Gemma decoder layer -> our named sites, as the "gemma" architecture map
# (plugins/nnsight_sae_archs) places them; any other hook point becomes a raw module site.
_LAYER_SITES = {"input": "resid_pre", "output": "resid_post", "self_attn.o_proj.input": "attn_z",
                "self_attn.output": "attn_out", "pre_feedforward_layernorm.input": "resid_mid",
                "pre_feedforward_layernorm.output": "mlp_in", "mlp.input": "mlp_in", "mlp.output": "mlp_out",
                "mlp.down_proj.input": "mlp_post"}


def site_of_hf_hook(point: str, where: Path) -> str:
    """Our site for a Gemma Scope 2 hook point (an HF module path + ``.input`` / ``.output``)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", point)
    if m and m[2] in _LAYER_SITES:
        return f"{_LAYER_SITES[m[2]]}.{m[1]}"
    path, _, io = point.rpartition(".")
    if path and io in ("input", "output"):
        return f"module:{path}" + (":input" if io == "input" else "")
    raise DictionaryError(f"{where}: hook point {point!r} is not a module path ending in .input or .output")


def _post_mlp_norm(layer: int) -> str:
    """post_feedforward_layernorm's output: TransformerLens' hook_mlp_out in Gemma 2/3 (after the norm),
    not our mlp_out.L (the MLP module's output, before it)."""
    return f"module:model.layers.{layer}.post_feedforward_layernorm"


def _repo(path: Path) -> tuple[str | None, tuple[str, ...]]:
    """The Gemma Scope repo named on a path (a folder named after it, or the Hub cache's
    ``models--google--<repo>``) and the path's parts below it (all parts when none is)."""
    for i in range(len(path.parts) - 1, -1, -1):
        name = path.parts[i].rsplit("--", 1)[-1]
        if name.startswith("gemma-scope-"):
            return name, path.parts[i + 1:]
    return None, path.parts


def _layer(parts, where: Path) -> int:
    for part in reversed(parts):
        if m := _LAYER.match(part):
            return int(m[1])
    raise DictionaryError(f"{where}: no layer_<L> folder on the path, so no layer to attach to (keep the "
                          f"published folder names)")


def _read_npz(file: Path) -> dict[str, torch.Tensor]:
    """The arrays of an .npz file; object arrays (pickles) are refused without being unpickled."""
    try:
        data = np.load(file, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except FileNotFoundError:
        raise DictionaryError(f"{file} is missing") from None
    except (ValueError, TypeError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DictionaryError(f"{file} is not a valid .npz of numeric arrays (truncated? object arrays, which "
                              f"hold pickles, are refused): {e}") from None


def _jumprelu(weights: dict, site: str, out_site: str | None, model: str | None, where: Path):
    """Our jumprelu dictionary from weights in our names and shapes (W_enc (d_in, F), W_dec (F, d_out))."""
    for key in ("W_enc", "W_dec"):
        if key not in weights or weights[key].dim() != 2:
            raise DictionaryError(f"{where}: no 2-D {key.lower()} (keys: {', '.join(sorted(weights))})")
    d_in, d_sae = weights["W_enc"].shape
    options = {"d_in": d_in, "d_sae": d_sae, "site": site, "model": model, "apply_b_dec_to_input": False,
               "dtype": str(weights["W_enc"].dtype).removeprefix("torch.")}
    if out_site is not None:
        options.update(out_site=out_site, d_out=weights["W_dec"].shape[1], skip="W_skip" in weights)
    return build("jumprelu", options, weights, where)


class GemmaScopeFormat(Format):
    name = "gemma_scope"
    help = "Gemma Scope 1 params.npz / Gemma Scope 2 params.safetensors (+ config.json) JumpReLU dictionaries"
    library = "sae-lens 6.54.12 Gemma Scope loaders (gemma_2 / gemma_3)"
    hub_files = (GS1_FILE, GS2_FILE, GS2_CONFIG)
    writes = False

    def detect(self, path):
        if path.is_dir():
            return (path / GS1_FILE).is_file() or (path / GS2_FILE).is_file()
        if path.name in (GS1_FILE, GS2_FILE):
            return True
        # a Gemma Scope 2 cross-layer transcoder (<repo>/clt/<name>.safetensors): claimed to refuse it clearly
        repo, below = _repo(path)
        return (path.suffix == ".safetensors" and bool(repo) and _GS2_REPO.match(repo) is not None
                and any(part.startswith("clt") for part in below))

    def read(self, path):
        if path.is_dir():
            path = path / GS2_FILE if (path / GS2_FILE).is_file() else path / GS1_FILE
        return self._read_gs1(path) if path.suffix == ".npz" else self._read_gs2(path)

    def _read_gs1(self, file: Path):
        repo, below = _repo(file)
        m = _GS1_REPO.match(repo or "")
        if not m:
            raise DictionaryError(
                f"{file}: a Gemma Scope 1 params.npz has no config; its site comes from the repo it was published "
                f"in (google/gemma-scope-2b-pt-res, -mlp, -att), and no folder on its path is named after one: "
                f"keep it under a folder named like its repo (the Hub cache's models--google--<repo> is)")
        size, variant, kind = m.groups()
        if kind == "res" and "embedding" in below:
            raise DictionaryError(f"{file}: a Gemma Scope embedding SAE; SAELens rescales its W_enc and W_dec by "
                                  f"sqrt(d_in) on load (\"because of how they trained it\"), a scale nnsight-sae has "
                                  f"not checked against the model, so it does not read these")
        layer = _layer(below, file)
        if kind == "transcoders":
            raise DictionaryError(
                f"{file}: Gemma Scope 1 transcoders read TransformerLens' blocks.{layer}.ln2.hook_normalized, "
                f"which in Gemma 2 is the residual divided by its RMS *before* pre_feedforward_layernorm's "
                f"(1 + weight) gain (sae-lens 6.54.12 get_gemma_2_transcoder_config_from_hf; circuit-tracer 0.5.0 "
                f"utils/tl_nnsight_mapping.py). nnsight-sae's mlp_in.{layer} is that norm's output after the gain, "
                f"and no module outputs the value before it, so this transcoder cannot be attached exactly")
        # the hook SAELens names: res -> hook_resid_post, mlp -> hook_mlp_out (after Gemma 2's
        # post_feedforward_layernorm), att -> attn.hook_z (flattened: o_proj's input)
        sites = {"res": f"resid_post.{layer}", "mlp": _post_mlp_norm(layer), "att": f"attn_z.{layer}"}
        if kind not in sites:
            raise DictionaryError(f"{file}: unknown Gemma Scope 1 repo {repo!r} (expected -res, -mlp or -att)")
        weights = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in _read_npz(file).items()}
        scale = weights.pop("scaling_factor", None)
        if scale is not None and not torch.equal(scale, torch.ones_like(scale)):
            raise DictionaryError(f"{file}: a scaling_factor other than 1 (SAELens refuses it too)")
        model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
        return _jumprelu(weights, sites[kind], None, model, file)

    def _read_gs2(self, file: Path):
        folder = file.parent
        repo, below = _repo(file)
        config = read_json(folder / GS2_CONFIG) if (folder / GS2_CONFIG).is_file() else {}
        if config.get("architecture", "jump_relu") != "jump_relu":
            raise DictionaryError(f"{folder / GS2_CONFIG}: architecture {config['architecture']!r}; Gemma Scope 2 "
                                  f"files are jump_relu")
        raw = read_safetensors(file)
        if any(part.startswith("clt") for part in below) or raw.get("w_dec", torch.empty(0, 0)).dim() == 3:
            raise DictionaryError(f"{file}: a Gemma Scope 2 cross-layer transcoder (CLT): its features write to "
                                  f"every later layer, and an nnsight-sae dictionary writes one site (SAELens sums "
                                  f"the decoder over layers, which is not the same function)")
        site, out_site = self._gs2_sites(folder, config, file)
        keys = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
                "affine_skip_connection": "W_skip"}
        weights = {keys.get(k, k): v for k, v in raw.items()}
        if "W_skip" in weights:  # stored (d_in, d_out), used as x @ A (google-deepmind/gemma_penzai
            # notebooks/mech_interp/gemma_scope2.ipynb); ours is (d_out, d_in)
            weights["W_skip"] = weights["W_skip"].T.contiguous()
        model = config["model_name"] if isinstance(config.get("model_name"), str) else None
        if model:  # normalised as get_gemma_3_config_from_hf does
            model = (model if "google" in model else "google/" + model).replace("-v3", "-3")
        elif repo and _GS2_REPO.match(repo):
            model = "google/" + repo.replace("gemma-scope-2", "gemma-3")
        if model and "270m" in model:  # the 270m model's Hub id has no -pt suffix
            model = model.replace("-pt", "")
        return _jumprelu(weights, site, out_site, model, file)

    def _gs2_sites(self, folder: Path, config: dict, where: Path) -> tuple[str, str | None]:
        """(site, out_site): config.json's hook points where it has them, else what the folder names imply."""
        kind = folder.parent.name.removesuffix("_all")  # resid_post_all/... holds the same kinds
        point_in = config.get("hf_hook_point_in")
        point_out = config.get("hf_hook_point_out")
        if not point_in:
            layer = _layer((folder.name,), where)
            inferred = {"resid_post": f"model.layers.{layer}.output",
                        "attn_out": f"model.layers.{layer}.self_attn.o_proj.input",
                        "mlp_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
                        "transcoder": f"model.layers.{layer}.pre_feedforward_layernorm.output"}
            if kind not in inferred:
                raise DictionaryError(f"{where}: no {GS2_CONFIG} with hf_hook_point_in, and the folder {kind!r} is "
                                      f"not one of {', '.join(inferred)}, so no site to attach to")
            point_in = inferred[kind]
            if kind == "transcoder" and not point_out:
                point_out = f"model.layers.{layer}.post_feedforward_layernorm.output"
        for key, point in (("hf_hook_point_in", point_in), ("hf_hook_point_out", point_out)):
            if point is not None and not isinstance(point, str):
                raise DictionaryError(f"{folder / GS2_CONFIG}: {key} must be a string, not {point!r}")
        site = site_of_hf_hook(point_in, where)
        # an SAE's config repeats its input hook point as the output one
        out_site = site_of_hf_hook(point_out, where) if point_out and point_out != point_in else None
        return site, out_site
