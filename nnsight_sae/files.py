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
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_folder
from .dictionary import Dictionary
from .errors import DictionaryError, NnsightSaeError
from .hub import is_hub_id
from .plugins import registry

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the format version we write; SAELens reads metadata only from >= 6
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
    """The cfg.json contents for a dictionary: SAELens' common fields, the type's own
    (``to_saelens``), and all our options under ``metadata.nnsight_sae``."""
    own = dict(d.to_saelens())
    cfg = {
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": str(d.W_enc.dtype).replace("torch.", ""),
        "device": "cpu",
        "apply_b_dec_to_input": d.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "hook_name": d.site,
            "model_name": model_name or d.cfg.model,
            "nnsight_sae_version": __version__,
            "nnsight_sae": {"type": d.type_name, **d.cfg.as_dict()},
            **own.pop("metadata", {}),
        },
        **own,
    }
    return cfg


def save_dictionary(d: Dictionary, folder: str | os.PathLike, *, model_name: str | None = None) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` atomically
    (a new folder is renamed into place; an existing one is replaced only once the
    new one is complete)."""
    with atomic_folder(folder) as tmp:
        save_file(_state(d), tmp / WEIGHTS_FILE)
        (tmp / CFG_FILE).write_text(json.dumps(dictionary_config(d, model_name), indent=2))
    return Path(folder)


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


def _our_config(cfg: dict, folder: Path) -> tuple[type, dict]:
    """The dictionary type and its options for a cfg.json: ours (``metadata.nnsight_sae``),
    SAELens v6 or SAELens pre-6 flat. A SAELens architecture is read by the registered type
    whose ``from_saelens`` answers."""
    where = folder / CFG_FILE
    types = registry().dictionary_types
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if isinstance(meta.get("nnsight_sae"), dict):
        ours = dict(meta["nnsight_sae"])
        name = ours.pop("type", None) or ours.pop("architecture", None)  # "architecture": files before 0.2
        ours.pop("architecture", None)
        if name not in types:
            raise DictionaryError(f"{where}: dictionary type {name!r} is not registered (registered: "
                                  f"{', '.join(sorted(types))}); is the plugin that provides it installed?")
        return types[name].obj, ours
    for entry in types.values():
        try:
            own = entry.obj.from_saelens(cfg, _site_from_hook)
        except NnsightSaeError as e:
            raise DictionaryError(f"{where}: {e}") from None
        if own is not None:
            break
    else:
        raise DictionaryError(f"{where}: unknown architecture {cfg.get('architecture', 'standard')!r}; no "
                              f"registered dictionary type reads it")
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not hook:
        raise DictionaryError(f"{where}: no hook_name, so no site to attach to")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise DictionaryError(f"{where}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                              f"fold it into the weights")
    try:
        common = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "site": _site_from_hook(hook),
                  "model": meta.get("model_name") or cfg.get("model_name"),
                  "dtype": str(cfg.get("dtype", "float32")).replace("torch.", ""),
                  "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    except KeyError as e:
        raise DictionaryError(f"{where}: missing field {e}") from None
    return entry.obj, {**common, **own}


def _check_weights(d: Dictionary, weights: dict, folder: Path) -> None:
    """Finite values, and the keys and shapes the config implies (strict loading)."""
    for key, value in weights.items():
        if not torch.isfinite(value).all():
            raise DictionaryError(f"{folder / WEIGHTS_FILE}: {key} contains NaN or inf")
    expected = d.state_dict()
    for key, value in weights.items():
        if key in expected and value.shape != expected[key].shape:
            raise DictionaryError(f"{folder / WEIGHTS_FILE}: {key} has shape {tuple(value.shape)}, "
                                  f"cfg.json implies {tuple(expected[key].shape)}")
    try:
        d.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        problems = "; ".join(line.strip() for line in str(e).splitlines()[1:])
        raise DictionaryError(f"{folder / WEIGHTS_FILE}: weights do not match a {d.type_name} dictionary: "
                              f"{problems}") from None


def _local_folder(source: str | os.PathLike, subfolder: str | None) -> Path:
    path = Path(source)
    if path.is_dir():
        return path / subfolder if subfolder else path
    if not is_hub_id(source):
        raise DictionaryError(f"no dictionary folder at {source}")
    try:
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        root = snapshot_download(str(source), allow_patterns=[pattern])
    except Exception as e:
        raise DictionaryError(f"cannot fetch {source}{'/' + subfolder if subfolder else ''} from the Hub: {e}") from e
    return Path(root) / subfolder if subfolder else Path(root)


def load_dictionary(source: str | os.PathLike, subfolder: str | None = None, *, device=None) -> Dictionary:
    """Load a dictionary from a local folder, or a Hub repo id (+ subfolder) when online.

    The config is checked (each type's options) and the weights against it (keys,
    shapes, finite values) before anything is returned; errors are :class:`DictionaryError`.
    """
    folder = _local_folder(source, subfolder)
    cls, options = _our_config(_read_cfg(folder), folder)
    try:
        d = cls(options)
    except NnsightSaeError as e:
        raise DictionaryError(f"{folder / CFG_FILE}: {e}") from None
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except FileNotFoundError:
        raise DictionaryError(f"{folder} has no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise DictionaryError(f"{folder / WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    dtype = d.W_enc.dtype
    _check_weights(d, {k: v.to(dtype) for k, v in weights.items()}, folder)
    return d.to(device) if device is not None else d
