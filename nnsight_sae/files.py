"""Dictionary folders: ``cfg.json`` + ``sae_weights.safetensors`` in SAELens' v6 layout.

Our own settings (type, site, hyper-parameters) ride in ``metadata.nnsight_sae``
so that SAELens reads our files as its matching architecture, and we read
SAELens files (v6 nested or pre-6 flat configs) by mapping their architecture
and TransformerLens hook names. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .dictionary import Dictionary
from .errors import DictionaryError, UnknownNameError
from .plugins import registry

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the format version we write; SAELens reads metadata only from >= 6

# our type -> SAELens architecture (batchtopk is saved as a JumpReLU, as SAELens does)
TO_SAELENS = {"relu": "standard", "discrete": "standard", "topk": "topk", "batchtopk": "jumprelu",
              "jumprelu": "jumprelu", "gated": "gated", "transcoder": "transcoder"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                "transcoder": "transcoder", "skip_transcoder": "transcoder"}
# TransformerLens hook names (SAELens' hook_name) -> our sites
_TL_HOOKS = {r"blocks\.(\d+)\.hook_resid_pre": "resid_pre.{}", r"blocks\.(\d+)\.hook_resid_post": "resid_post.{}",
             r"blocks\.(\d+)\.hook_attn_out": "attn_out.{}", r"blocks\.(\d+)\.hook_mlp_out": "mlp_out.{}",
             r"blocks\.(\d+)\.ln2\.hook_normalized": "mlp_in.{}", r"blocks\.(\d+)\.hook_mlp_in": "mlp_in.{}"}


def _site_from_hook(hook: str) -> str:
    for pattern, site in _TL_HOOKS.items():
        m = re.fullmatch(pattern, hook)
        if m:
            return site.format(m[1])
    return hook  # already one of ours, or a raw module:PATH site


def _state(d: Dictionary) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in d.state_dict().items()}


def dictionary_config(d: Dictionary, model_name: str | None = None) -> dict:
    """The cfg.json contents for a dictionary."""
    ours = dict(d.cfg)
    cfg = {
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": str(d.W_enc.dtype).replace("torch.", ""),
        "device": "cpu",
        "apply_b_dec_to_input": bool(d.cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "hook_name": d.site,
            "model_name": model_name or d.cfg.get("model"),
            "nnsight_sae_version": __version__,
            "nnsight_sae": ours,
        },
        "architecture": TO_SAELENS.get(d.type_name, d.type_name),
    }
    if d.type_name == "topk":
        cfg.update(k=d.cfg["k"], rescale_acts_by_decoder_norm=False)
    if d.type_name == "transcoder":
        cfg["d_out"] = d.d_out
        cfg["metadata"]["hook_name_out"] = d.cfg["out_site"]
        if d.cfg.get("skip"):
            cfg["architecture"] = "skip_transcoder"
    return cfg


def save_dictionary(d: Dictionary, folder: str | os.PathLike, *, model_name: str | None = None) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` atomically
    (a new folder is renamed into place; an existing one is replaced only once the
    new one is complete)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(_state(d), tmp / WEIGHTS_FILE)
        (tmp / CFG_FILE).write_text(json.dumps(dictionary_config(d, model_name), indent=2))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _read_cfg(folder: Path) -> dict:
    path = folder / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise DictionaryError(f"{folder} is not a dictionary folder: no {CFG_FILE}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DictionaryError(f"{path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(cfg, dict):
        raise DictionaryError(f"{path} must hold a JSON object")
    return cfg


def _our_config(cfg: dict, folder: Path) -> dict:
    """Translate a cfg.json (ours, SAELens v6, or SAELens pre-6 flat) into our config dict."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if isinstance(meta.get("nnsight_sae"), dict):
        return dict(meta["nnsight_sae"])
    arch = cfg.get("architecture", "standard")
    if arch not in FROM_SAELENS:
        raise DictionaryError(f"{folder / CFG_FILE}: unknown architecture {arch!r}; "
                              f"readable: {', '.join(sorted(FROM_SAELENS))}")
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    try:
        ours = {"architecture": FROM_SAELENS[arch], "d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]),
                "site": _site_from_hook(hook) if hook else None,
                "model": meta.get("model_name") or cfg.get("model_name"),
                "dtype": str(cfg.get("dtype", "float32")).replace("torch.", ""),
                "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    except (KeyError, TypeError, ValueError) as e:
        raise DictionaryError(f"{folder / CFG_FILE}: missing or bad field {e}") from None
    if ours["site"] is None:
        raise DictionaryError(f"{folder / CFG_FILE}: no hook_name, so no site to attach to")
    if arch == "topk":
        ours["k"] = int(cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k", 100)))
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise DictionaryError(f"{folder / CFG_FILE}: rescale_acts_by_decoder_norm=true is not supported")
    if "transcoder" in arch:
        hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
        ours.update(d_out=int(cfg.get("d_out", cfg["d_in"])), skip=arch == "skip_transcoder",
                    out_site=_site_from_hook(hook_out) if hook_out else None)
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise DictionaryError(f"{folder / CFG_FILE}: normalize_activations="
                              f"{cfg['normalize_activations']!r} is not supported; fold it into the weights")
    return ours


def _check_weights(d: Dictionary, weights: dict, folder: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise DictionaryError(f"{folder / WEIGHTS_FILE}: weights do not match a {d.type_name} "
                              f"dictionary (missing {missing}, unexpected {extra})")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise DictionaryError(f"{folder / WEIGHTS_FILE}: {key} has shape {tuple(weights[key].shape)}, "
                                  f"cfg.json implies {shape}")
        if not torch.isfinite(weights[key]).all():
            raise DictionaryError(f"{folder / WEIGHTS_FILE}: {key} contains NaN or inf")


def _local_folder(source: str | os.PathLike, subfolder: str | None) -> Path:
    path = Path(source)
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise DictionaryError(f"no dictionary folder at {source}")
    try:  # a Hub repo id
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        root = snapshot_download(str(source), allow_patterns=[pattern])
    except Exception as e:
        raise DictionaryError(f"cannot fetch {source}{'/' + subfolder if subfolder else ''} from the Hub: {e}") from e
    return Path(root) / subfolder if subfolder else Path(root)


def load_dictionary(source: str | os.PathLike, subfolder: str | None = None, *, device=None) -> Dictionary:
    """Load a dictionary from a local folder, or a Hub repo id (+ subfolder) when online.

    The config is checked against the weights (keys, shapes, finite values)
    before anything is returned; errors are :class:`DictionaryError`.
    """
    folder = _local_folder(source, subfolder)
    ours = _our_config(_read_cfg(folder), folder)
    try:
        cls = registry().get("dictionary_types", ours.get("architecture", ""))
    except UnknownNameError as e:
        raise DictionaryError(f"{folder / CFG_FILE}: {e}") from None
    for key in ("d_in", "d_sae"):
        if not isinstance(ours.get(key), int) or ours[key] <= 0:
            raise DictionaryError(f"{folder / CFG_FILE}: {key} must be a positive integer, got {ours.get(key)!r}")
    try:
        d = cls(ours)
    except (ValueError, TypeError, AttributeError) as e:
        raise DictionaryError(f"{folder / CFG_FILE}: {e}") from None
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except FileNotFoundError:
        raise DictionaryError(f"{folder} has no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise DictionaryError(f"{folder / WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    _check_weights(d, weights, folder)
    dtype = getattr(torch, d.cfg.get("dtype", "float32"))
    with torch.no_grad():
        for key, param in d.state_dict(keep_vars=True).items():
            param.copy_(weights[key].to(dtype))
    return d.to(device) if device is not None else d
