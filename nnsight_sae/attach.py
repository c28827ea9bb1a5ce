"""Binding a dictionary to its site(s) in a model, with the checks done up front."""

from __future__ import annotations

import warnings
from pathlib import Path

from .dictionary import Dictionary
from .errors import DictionaryError
from .models import model_id
from .sites import architecture_of, envoy_at, join_path, resolve_site, site_layer
from .traced import Attached


def site_device(model, site) -> "torch.device":
    """Where the site's activations live: its module's device (a device_map may split the
    layers across devices). A module accelerate offloads to the CPU (its weights on the meta
    device) runs on the model's main GPU, so that is where its activations are."""
    import torch

    first = next(site.envoy._module.parameters(), None)
    if first is not None and first.device.type != "meta":
        return first.device
    placed = set((getattr(model._module, "hf_device_map", None) or {}).values()) - {"cpu", "disk"}
    if first is not None and placed:  # offloaded
        main = min(placed, key=str)
        return torch.device(f"cuda:{main}" if isinstance(main, int) else main)
    # A remote model is all meta here: its dictionaries stay on the CPU (moved on the server).
    return next((p.device for p in model._module.parameters() if p.device.type != "meta"), torch.device("cpu"))


def attach(model, dictionary: Dictionary) -> Attached:
    """Bind ``dictionary`` to the site it was trained on in ``model``.

    Checks the site exists in this model and that its width matches the
    dictionary's ``d_in`` (and ``d_out`` for a transcoder's output site), then
    moves the dictionary to the site's device and dtype. Nothing is attached to
    the model's module tree.
    """
    made_for, this = dictionary.cfg.model, model_id(model)
    site = resolve_site(model, dictionary.site)
    if site.d_in is not None and site.d_in != dictionary.d_in:
        raise DictionaryError(f"dictionary d_in={dictionary.d_in} does not match site {site.name!r} of this model "
                              f"({this}: width {site.d_in}); it was made for {made_for or 'a model it does not name'}")
    out_site = mlp = None
    out_name = dictionary.out_site
    if out_name:
        out_site = resolve_site(model, out_name)
        if out_site.d_in is not None and out_site.d_in != dictionary.d_out:
            raise DictionaryError(f"dictionary d_out={dictionary.d_out} does not match site {out_name!r} of this "
                                  f"model ({this}: width {out_site.d_in}); it was made for "
                                  f"{made_for or 'a model it does not name'}")
        layer = site_layer(dictionary.site)
        if (layer is not None and dictionary.site.startswith("mlp_in.") and out_name == f"mlp_out.{layer}"):
            arch = architecture_of(model)
            if arch.mlp is not None:
                mlp = envoy_at(model, join_path(arch.layers, str(layer), arch.mlp))
    if made_for and Path(str(made_for)).name != Path(this).name:
        warnings.warn(f"the dictionary was made for {made_for!r}, not {this!r}; the widths agree, so it is "
                      f"attached, but its features may mean nothing here", stacklevel=2)
    dtype = next(model._module.parameters()).dtype
    dictionary.to(device=site_device(model, site), dtype=dtype)
    return Attached(dictionary, site, out_site, mlp)
