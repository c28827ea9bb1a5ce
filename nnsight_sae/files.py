"""Dictionary files: our own layout (SAELens' v6: ``cfg.json`` + ``sae_weights.safetensors``),
the published layouts other libraries write (registered ``Format`` readers, from plugins), and
fetching them from the Hugging Face Hub.

In our layout, our settings (type, site, options) ride in ``metadata.nnsight_sae`` so that
SAELens reads our files as its matching architecture with the TransformerLens hook of the
site, and we read SAELens files (v6 nested or pre-6 flat configs) by mapping their
architecture (each dictionary type's ``from_saelens``) and hook names. Nothing is ever
unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
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
# SAELens 6.54.12, saes/sae.py: normalize_activations values that are the identity when a file is
# read with SAE.load_from_disk (the others rescale each token at run time, which we do not do)
_IDENTITY_NORMALIZATIONS = ("none", None, False, "expected_average_only_in", "covariance_whitening")


class Format:
    """A published dictionary layout: how to recognise it, read it and, where ``writes``,
    write it. ``hub_files`` are the file patterns a Hub download of one dictionary needs
    (relative to its folder); ``library`` names the maker's code it was checked against."""

    name = ""
    help = ""
    library = ""
    hub_files: tuple[str, ...] = ()
    writes = False

    def detect(self, path: Path) -> bool:
        """True when ``path`` (a folder or a file) holds a dictionary in this layout."""
        raise NotImplementedError

    def read(self, path: Path) -> Dictionary:
        raise NotImplementedError

    def write(self, dictionary: Dictionary, path: Path) -> Path:
        raise NotImplementedError(f"nnsight-sae does not write the {self.name} layout")


# ---- reading helpers every format uses -----------------------------------------------------

def read_json(path: Path) -> dict:
    """A JSON object from a file, or a DictionaryError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DictionaryError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DictionaryError(f"{path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(data, dict):
        raise DictionaryError(f"{path} must hold a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a DictionaryError naming the file (a pickle, a
    truncated file or any other content is refused without being run)."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise DictionaryError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise DictionaryError(f"{path} is not a valid safetensors file: {e}") from None


def check_tensors(weights: dict, expected: dict, where: Path) -> None:
    """A file's tensor names and shapes, in the file's own names (before they are mapped to ours),
    so that an error names what the file holds."""
    if set(weights) != set(expected):
        raise DictionaryError(f"{where}: holds {sorted(weights)}, expected {sorted(expected)}")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise DictionaryError(f"{where}: {key} has shape {tuple(weights[key].shape)}, the config implies {shape}")


def build(type_name: str, options: dict, weights: dict[str, torch.Tensor], where: Path, *,
          config_where: Path | None = None) -> Dictionary:
    """A dictionary of a registered type from its options and weights (our names and
    shapes), every option and weight checked: unknown or bad options, missing, extra or
    misshaped weights, NaN or inf. Errors are DictionaryError naming ``where`` (the weights'
    file; ``config_where`` for the options, when they come from another file)."""
    types = registry().dictionary_types
    config_where = config_where or where
    if type_name not in types:
        raise DictionaryError(f"{config_where}: dictionary type {type_name!r} is not registered (registered: "
                              f"{', '.join(sorted(types))}); is the plugin that provides it installed?")
    try:
        d = types[type_name].obj(options)
    except NnsightSaeError as e:
        raise DictionaryError(f"{config_where}: {e}") from None
    for key, value in weights.items():
        if not torch.isfinite(value).all():
            raise DictionaryError(f"{where}: {key} contains NaN or inf")
    expected = d.state_dict()
    for key, value in weights.items():
        if key in expected and value.shape != expected[key].shape:
            raise DictionaryError(f"{where}: {key} has shape {tuple(value.shape)}, the config implies "
                                  f"{tuple(expected[key].shape)}")
    try:
        d.load_state_dict({k: v.to(d.W_enc.dtype) for k, v in weights.items()}, strict=True)
    except RuntimeError as e:
        problems = "; ".join(line.strip() for line in str(e).splitlines()[1:])
        raise DictionaryError(f"{where}: weights do not match a {type_name} dictionary: {problems}") from None
    return d


# ---- TransformerLens hook names (SAELens' hook_name) <-> our sites ----------------------------

# TransformerLens 3.9 (what sae-lens 6.54.12 installs), components/transformer_block.py and layer_norm.py:
# hook_mlp_in is the residual before ln2 (our resid_mid); ln2.hook_normalized is the normed residual
# *before* the norm's weight (and bias), which no module of a Hugging Face model outputs, so it has no
# site; mlp.hook_in is the MLP's input, our mlp_in. Hooks equal the Hugging Face model's activations when
# TransformerLens loads the model without folding or centring weights (from_pretrained_no_processing).
_TL_TO_SITE = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
               "hook_mlp_out": "mlp_out", "hook_resid_mid": "resid_mid", "hook_mlp_in": "resid_mid",
               "mlp.hook_in": "mlp_in", "attn.hook_z": "attn_z", "mlp.hook_post": "mlp_post",
               "mlp.hook_out": "mlp_out"}
_SITE_TO_TL = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in",
               "attn_z": "attn.hook_z", "mlp_post": "mlp.hook_post"}
_NO_SITE = {"ln2.hook_normalized": "the residual normed before ln2's weight, which no module of a Hugging Face "
                                   "model outputs (nnsight-sae's mlp_in is after the weight)",
            "hook_embed": "the token embedding alone (use a module:PATH site)"}


def site_of_hook(hook: str) -> str:
    """Our site for a TransformerLens hook name (one of ours, or a raw module site, passes as is);
    DictionaryError naming a hook with no site here."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if m and m[2] in _TL_TO_SITE:
        return f"{_TL_TO_SITE[m[2]]}.{m[1]}"
    why = _NO_SITE.get(m[2] if m else hook)
    if why:
        raise DictionaryError(f"TransformerLens hook {hook!r} has no nnsight-sae site: it is {why}")
    if m or hook.startswith("hook_"):
        raise DictionaryError(f"TransformerLens hook {hook!r} has no nnsight-sae site (mapped: "
                              f"{', '.join(sorted(_TL_TO_SITE))}); give the dictionary a site such as "
                              f"'module:PATH' by hand")
    return hook


def hook_of_site(site: str) -> str | None:
    """The TransformerLens hook name of a site, None where TransformerLens has none."""
    m = re.fullmatch(r"([a-z_]+)\.(\d+)", site)
    return f"blocks.{m[2]}.{_SITE_TO_TL[m[1]]}" if m and m[1] in _SITE_TO_TL else None


# ---- our layout: SAELens v6 ---------------------------------------------------------------

def dictionary_config(d: Dictionary, model_name: str | None = None) -> dict:
    """The cfg.json contents for a dictionary: SAELens' common fields, the type's own
    (``to_saelens``), the TransformerLens hook of its sites, and all our options under
    ``metadata.nnsight_sae``."""
    own = dict(d.to_saelens())
    metadata = {"sae_lens_version": SAELENS_VERSION, "hook_name": hook_of_site(d.site) or d.site,
                "model_name": model_name or d.cfg.model, "nnsight_sae_version": __version__,
                "nnsight_sae": {"type": d.type_name, **d.cfg.as_dict()}}
    cfg = {"d_in": d.d_in, "d_sae": d.d_sae, "dtype": str(d.W_enc.dtype).replace("torch.", ""), "device": "cpu",
           "apply_b_dec_to_input": d.cfg.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "hook_z" if d.site.startswith("attn_z.") else "none"}
    if d.out_site:
        cfg["d_out"] = d.d_out
        metadata["hook_name_out"] = hook_of_site(d.out_site) or d.out_site
    return {**cfg, **own, "metadata": {**metadata, **own.get("metadata", {})}}


class SAELensFormat(Format):
    """SAELens 6: ``cfg.json`` + ``sae_weights.safetensors`` (also its pre-6 flat configs).
    Our own files are in this layout, our settings under ``metadata.nnsight_sae``."""

    name = "saelens"
    help = "SAELens v6 folder (cfg.json + sae_weights.safetensors; pre-6 flat configs read too); ours"
    library = "sae-lens 6.54.12"
    hub_files = (CFG_FILE, WEIGHTS_FILE)
    writes = True

    def detect(self, path):
        return path.is_dir() and (path / CFG_FILE).is_file()

    def read(self, path):
        cfg = read_json(path / CFG_FILE)
        type_name, options, transform = self._options(cfg, path / CFG_FILE)
        if not (path / WEIGHTS_FILE).exists():
            raise DictionaryError(f"{path} has no {WEIGHTS_FILE}")
        return build(type_name, options, transform(read_safetensors(path / WEIGHTS_FILE)), path / WEIGHTS_FILE,
                     config_where=path / CFG_FILE)

    def _options(self, cfg: dict, where: Path):
        """(type name, options, weights transform) for a cfg.json: ours, SAELens v6 or pre-6."""
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        if isinstance(meta.get("nnsight_sae"), dict):
            ours = dict(meta["nnsight_sae"])
            name = ours.pop("type", None) or ours.pop("architecture", None)  # "architecture": files before 0.2
            ours.pop("architecture", None)
            return name, ours, lambda w: w
        for entry in registry().dictionary_types.values():
            try:
                own = entry.obj.from_saelens(cfg)
            except NnsightSaeError as e:
                raise DictionaryError(f"{where}: {e}") from None
            if own is not None:
                break
        else:
            raise DictionaryError(f"{where}: unknown architecture {cfg.get('architecture', 'standard')!r}; no "
                                  f"registered dictionary type reads it")
        hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
        if not hook:
            raise DictionaryError(f"{where}: no hook_name, so no site to attach to")
        normalization = cfg.get("normalize_activations", "none")
        if normalization not in _IDENTITY_NORMALIZATIONS:
            raise DictionaryError(f"{where}: normalize_activations={normalization!r} rescales every token at run "
                                  f"time, which nnsight-sae does not do")
        try:
            site, out_site = site_of_hook(hook), site_of_hook(hook_out) if hook_out else None
        except DictionaryError as e:
            raise DictionaryError(f"{where}: {e}") from None
        if cfg.get("reshape_activations", "none") not in ("none", None) and not site.startswith("attn_z."):
            raise DictionaryError(f"{where}: reshape_activations={cfg['reshape_activations']!r} is for "
                                  f"attn.hook_z; the hook is {hook!r}")
        try:
            common = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "site": site, "out_site": out_site,
                      "model": meta.get("model_name") or cfg.get("model_name"),
                      "dtype": str(cfg.get("dtype", "float32")).replace("torch.", ""),
                      "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True)}
        except KeyError as e:
            raise DictionaryError(f"{where}: missing field {e}") from None
        if out_site is not None:
            common["d_out"] = cfg.get("d_out", cfg["d_in"])
        return entry.name, {**common, **own}, lambda w: entry.obj.saelens_weights(cfg, w)

    def write(self, dictionary, path, *, model_name=None):
        for site in filter(None, (dictionary.site, dictionary.out_site)):
            if hook_of_site(site) is None:
                warnings.warn(f"{site} has no TransformerLens hook: SAELens' HookedSAETransformer will not splice "
                              f"this file (nnsight-sae reads it as usual)", stacklevel=3)
        with atomic_folder(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in dictionary.file_state().items()},
                      tmp / WEIGHTS_FILE)
            (tmp / CFG_FILE).write_text(json.dumps(dictionary_config(dictionary, model_name), indent=2))
        return Path(path)


SAELENS = SAELensFormat()


def formats() -> list[Format]:
    """Every layout we read, in the order they are tried: the registered ones, then ours
    (SAELens: any folder with a cfg.json that no other layout claims)."""
    return [*(e.obj for e in registry().formats.values()), SAELENS]


def save_dictionary(d: Dictionary, folder: str | os.PathLike, *, model_name: str | None = None) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` atomically
    (a new folder is renamed into place; an existing one is replaced only once the
    new one is complete)."""
    return SAELENS.write(d, Path(folder), model_name=model_name)


def hub_patterns(path: str | None = None) -> list[str]:
    """The files of a Hub repo that one dictionary needs: at ``path`` (its folder, or its
    file, inside the repo), the files some format reads; beside a file, its folder's
    config files."""
    names = sorted({pattern for f in formats() for pattern in f.hub_files})
    if path and Path(path).suffix:  # a file: it and its folder's config files
        folder = Path(path).parent
        return [path] + [str(folder / n) if str(folder) != "." else n for n in names if "*" not in n]
    return [f"{path}/{n}" if path else n for n in names]


def fetch(repo_id: str, path: str | None = None) -> Path:
    """Download one dictionary's files from a Hub repo (``hub_patterns``) through
    huggingface_hub, and return the local path of the dictionary's folder or file."""
    from huggingface_hub import snapshot_download

    patterns = hub_patterns(path)
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise DictionaryError(f"cannot fetch {repo_id}{'/' + path if path else ''} from the Hub: {e}") from e
    local = root / path if path else root
    if not local.exists():
        raise DictionaryError(f"{repo_id} has no {path} (fetched {root})")
    return local


def resolve(source: str | os.PathLike, subfolder: str | None = None) -> Path:
    """The local path of a dictionary: a folder or file here, or fetched from a Hub repo."""
    path = Path(source) / subfolder if subfolder else Path(source)
    if path.exists():
        return path
    if not is_hub_id(source):
        raise DictionaryError(f"no dictionary at {path}")
    return fetch(str(source), subfolder)


def format_of(path: Path) -> Format:
    """The layout a folder or file holds."""
    for fmt in formats():
        if fmt.detect(path):
            return fmt
    known = "; ".join(f"{f.name}: {f.help}" for f in formats())
    raise DictionaryError(f"{path} is not a dictionary in any layout nnsight-sae reads ({known})")


def load_dictionary(source: str | os.PathLike, subfolder: str | None = None, *, device=None) -> Dictionary:
    """Load a dictionary from a local folder or file, or a Hub repo id (+ the path inside it),
    in any registered layout (``nnsight-sae info`` lists them), picked by what the folder or
    file holds.

    The config is checked (each type's options) and the weights against it (keys,
    shapes, finite values) before anything is returned; errors are :class:`DictionaryError`.
    """
    path = resolve(source, subfolder)
    d = format_of(path).read(path)
    return d.to(device) if device is not None else d
