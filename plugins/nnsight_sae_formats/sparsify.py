"""EleutherAI sparsify's layout: one folder per hook point, ``cfg.json`` + ``sae.safetensors``.

Facts below are from eai-sparsify 1.3.3 (``sparsify/sparse_coder.py``, ``config.py``,
``fused_encoder.py``, ``trainer.py``). Its TopK coders (SAEs and transcoders, with or without a
skip connection) read as our ``topk`` type; our ``topk`` dictionaries write back to it.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from safetensors.torch import save_file

from nnsight_sae.atomic import atomic_folder
from nnsight_sae.errors import DictionaryError
from nnsight_sae.files import Format, build, check_tensors, read_json, read_safetensors

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
# config.py, SparseCoderConfig: the fields and defaults save_to_disk writes (plus "d_in")
DEFAULTS = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": 0, "k": 32,
            "multi_topk": False, "skip_connection": False, "transcode": False}

# Hook points are module paths relative to the model's base_model (trainer.py: base_model.named_modules()):
# the layer list is "layers" (Llama, Gemma, GPT-NeoX) or "h" (GPT-2); a longer prefix such as
# "gpt_neox." or "model." is accepted too.
_HOOK = re.compile(r"(?:.+\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?")
UNDERSTOOD = "layers.L, layers.L.mlp, layers.L.self_attn (or .attn / .attention), h.L[.mlp|.attn]"


def hook_point(path: Path) -> str:
    """The hook point a folder is named after (trainer.py names several seeds' coders <hook>/seed<N>)."""
    return path.parent.name if re.fullmatch(r"seed\d+", path.name) else path.name


def sites(hook: str, transcode: bool, where: Path) -> tuple[str, str | None]:
    """(site, out_site) of a hook point. trainer.py's hook: an SAE encodes the module's output; a
    transcoder encodes its input and predicts its output."""
    m = _HOOK.fullmatch(hook)
    if not m:
        raise DictionaryError(f"{where}: hook point {hook!r} has no nnsight-sae site (understood: {UNDERSTOOD})")
    layer, part = m[1], m[2]
    if part is None:
        return ("resid_pre." + layer, "resid_post." + layer) if transcode else ("resid_post." + layer, None)
    if part == "mlp":
        return ("mlp_in." + layer, "mlp_out." + layer) if transcode else ("mlp_out." + layer, None)
    if transcode:
        raise DictionaryError(f"{where}: a transcoder at {hook!r} reads the attention's input, which has no "
                              f"nnsight-sae site (understood transcoders: layers.L, layers.L.mlp)")
    return "attn_out." + layer, None


def run_model(path: Path) -> str | None:
    """The model named in the run folder's config.json (the trainer's RunConfig, __main__.py), if there."""
    root = path.parent.parent if re.fullmatch(r"seed\d+", path.name) else path.parent
    try:  # optional: a folder fetched alone has no run config, and a bad one is not the coder's file
        model = json.loads((root / "config.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


class SparsifyFormat(Format):
    """EleutherAI sparsify: a hook-point folder with cfg.json + sae.safetensors."""

    name = "sparsify"
    help = "EleutherAI sparsify hook-point folder (cfg.json + sae.safetensors): TopK SAEs and transcoders"
    library = "eai-sparsify 1.3.3"
    hub_files = (CFG_FILE, WEIGHTS_FILE)
    writes = True

    def detect(self, path):
        # "sae.safetensors" is sparsify's name; SAELens (ours) writes sae_weights.safetensors
        return path.is_dir() and (path / WEIGHTS_FILE).is_file() and not (path / "sae_weights.safetensors").exists()

    def read(self, path):
        where = path / CFG_FILE
        cfg = {**DEFAULTS, **read_json(where)}
        if cfg["activation"] != "topk":
            raise DictionaryError(f"{where}: activation {cfg['activation']!r} is not supported (only 'topk'; "
                                  f"'groupmax' keeps the largest latent of each of k groups, no nnsight-sae type does)")
        if not isinstance(cfg.get("d_in"), int):
            raise DictionaryError(f"{where}: missing or non-integer d_in")
        d_in, transcode, skip = cfg["d_in"], bool(cfg["transcode"]), bool(cfg["skip_connection"])
        d_sae = cfg["num_latents"] or d_in * cfg["expansion_factor"]  # sparse_coder.py, SparseCoder.__init__
        if not isinstance(d_sae, int) or d_sae < 1:
            raise DictionaryError(f"{where}: num_latents / expansion_factor give no positive width ({d_sae!r})")
        if not isinstance(cfg["k"], int) or not 1 <= cfg["k"] <= d_sae:
            raise DictionaryError(f"{where}: k={cfg['k']!r} is out of range for {d_sae} latents")
        if skip and not transcode:
            raise DictionaryError(f"{where}: an SAE with a skip connection (not a transcoder) is not supported: "
                                  f"nnsight-sae's skip term belongs to dictionaries that predict another site")
        site, out_site = sites(hook_point(path), transcode, where)

        file = path / WEIGHTS_FILE
        w = read_safetensors(file)
        expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                    "b_dec": (d_in,), **({"W_skip": (d_in, d_in)} if skip else {})}
        check_tensors(w, expected, file)
        # nn.Linear stores (F, d) and computes x @ W.T; W_dec (F, d) and W_skip (d_out, d_in) are ours as they are
        weights = {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
                   **({"W_skip": w["W_skip"]} if skip else {})}
        # encode (sparse_coder.py): x - b_dec only when not a transcoder, then ReLU, then top-k. Ours takes the
        # top k, then ReLU: the same features (fewer than k positive: both keep zeros past the positive ones).
        options = {"d_in": d_in, "d_sae": d_sae, "site": site, "out_site": out_site, "k": cfg["k"], "skip": skip,
                   "apply_b_dec_to_input": not transcode, "model": run_model(path),
                   "dtype": str(w["encoder.weight"].dtype).replace("torch.", "")}
        return build("topk", options, weights, file)

    def write(self, dictionary, path):
        """Write ``path``/cfg.json + sae.safetensors atomically. sparsify knows a coder's site only by its
        folder's name (the hook point, e.g. layers.6.mlp): a name that reads back as other sites warns."""
        d, path = dictionary, Path(path)
        if d.type_name != "topk":
            raise DictionaryError(f"the sparsify layout holds TopK coders only; this dictionary is {d.type_name!r}")
        if d.d_out != d.d_in:
            raise DictionaryError(f"the sparsify layout has one width (d_in); this dictionary maps {d.d_in} to "
                                  f"{d.d_out}")
        transcode = d.out_site is not None
        try:
            named = sites(hook_point(path), transcode, path)
        except DictionaryError:
            named = None
        if named != (d.site, d.out_site):
            warnings.warn(f"{path.name!r} reads back as site(s) {named or 'none'}, not {(d.site, d.out_site)}: "
                          f"sparsify names a coder's folder after its hook point ({UNDERSTOOD})", stacklevel=2)
        b_enc = d.b_enc.detach()
        if not transcode and not d.cfg.apply_b_dec_to_input:
            # sparsify subtracts b_dec from an SAE's input: fold it into the encoder bias to cancel
            b_enc = b_enc + d.b_dec.detach() @ d.W_enc.detach()
        tensors = {"encoder.weight": d.W_enc.detach().T, "encoder.bias": b_enc, "W_dec": d.W_dec.detach(),
                   "b_dec": d.b_dec.detach(), **({"W_skip": d.W_skip.detach()} if d.cfg.skip else {})}
        # num_latents sets the width; expansion_factor (then unused) kept consistent where it can be
        expansion = d.d_sae // d.d_in if d.d_sae % d.d_in == 0 else DEFAULTS["expansion_factor"]
        cfg = {**DEFAULTS, "expansion_factor": expansion, "num_latents": d.d_sae, "k": d.cfg.k,
               "skip_connection": d.cfg.skip, "transcode": transcode, "d_in": d.d_in}
        with atomic_folder(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS_FILE)
            (tmp / CFG_FILE).write_text(json.dumps(cfg))  # json.dump's defaults, as save_to_disk writes it
        return path
