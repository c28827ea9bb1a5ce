"""Running our traces on NDIF (``remote=True``) or through a checked local simulation
(``remote="local"``).

A model loaded with ``load_model(..., remote=...)`` carries the setting, and every trace
the library runs takes it through ``models.trace_options``. Before a request leaves (or,
simulated, before it runs here) it is checked: under our request size limit (a default of
ours; see ``DEFAULT_MAX_REQUEST_BYTES``), and every module its unpickling imports on the
import allow-list an earlier NDIF server enforced (``remote_check``). Neither nnsight 0.8.1's
client (``intervention/backends/remote.py``: it only compresses and posts) nor its
``remote="local"`` simulation checks anything.
"""

from __future__ import annotations

import importlib
import os
import pickletools
import sys

import cloudpickle

from .errors import ModelLoadError, RemoteError
from .hub import is_hub_id
from .remote_check import NDIF_ALLOWED, OURS, traced_modules

# Our default, not a limit of the current server: ndif 0.1.2 (PyPI; services/api/app.py) measures a
# request's size but enforces none ("TODO: ... add a configurable request-size cap"). An earlier
# ndif-team/ndif (src/services/api/src/config.py, NDIF_MAX_REQUEST_SIZE) refused uploads over 1 GiB,
# counting the compressed upload; we count the uncompressed request, which is stricter.
DEFAULT_MAX_REQUEST_BYTES = 1 << 30
# Importable while that server unpickled a request (protected_environment.py's deserialisation list,
# which names specific nnsight modules; we allow all of nnsight, and _codecs, which pickles of bytes use).
UNPICKLE_ALLOWED = NDIF_ALLOWED + ("pickle", "cloudpickle", "copyreg", "_codecs", "nnsight")
_ATTR = "_nnsight_sae_remote"
_LAST_REQUEST = "_nnsight_sae_last_request"


def max_request_bytes() -> int:
    """The largest request we send: $NNSIGHT_SAE_REMOTE_MAX_BYTES, else 1 GiB (our default)."""
    return int(os.environ.get("NNSIGHT_SAE_REMOTE_MAX_BYTES") or DEFAULT_MAX_REQUEST_BYTES)


def api_key() -> str | None:
    """The NDIF API key nnsight will send: $NDIF_API_KEY, else nnsight's saved config."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def check_remote_target(name, remote, device_map) -> None:
    """Raise ModelLoadError when ``remote`` cannot work for this model name."""
    if remote not in (False, None, True, "local"):
        raise ModelLoadError(f"remote must be False, True or 'local', not {remote!r}")
    if remote is not True:
        return
    if device_map is not None:
        raise ModelLoadError("device_map does not apply to a remote model: NDIF places it on its own GPUs")
    if not is_hub_id(name):
        what = "the embedded model" if name is None else f"{str(name)!r}, a local file or folder,"
        raise ModelLoadError(f"remote=True runs on NDIF, which loads models by Hugging Face id; {what} cannot be "
                             "sent: pass a Hub id NDIF hosts (e.g. meta-llama/Llama-3.1-8B), or "
                             "remote='local' to simulate the round trip here")
    if not api_key():
        raise ModelLoadError("remote=True needs an NDIF API key: set NDIF_API_KEY, or run "
                             "nnsight.CONFIG.set_default_api_key('KEY') once (keys: https://login.ndif.us)")


def set_remote(model, remote) -> None:
    """Record the setting on the model. For NDIF, our modules' in-trace code travels by
    value (a pip-installed package is not on the server)."""
    setattr(model, _ATTR, remote or False)
    if remote is True:
        _register_ours()


def _our_modules() -> list:
    names = set(traced_modules()) | {n for n in list(sys.modules) if n.split(".")[0].startswith(OURS)}
    return [importlib.import_module(n) for n in sorted(names)]


def _register_ours(register: bool = True) -> None:
    for module in _our_modules():
        if register:
            cloudpickle.register_pickle_by_value(module)
        elif module.__name__ in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.unregister_pickle_by_value(module)


def remote_of(model):
    """False, True or "local": how this model's traces run."""
    return getattr(model, _ATTR, False)


def imported_modules(blob: bytes) -> set[str]:
    """Every module unpickling ``blob`` would import: the modules of the globals it names,
    and those cloudpickle's by-value code imports through ``subimport``. Read from the
    opcodes; nothing is unpickled."""
    strings = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
    found, memo, pushed = set(), [], []
    top, want_name = None, False  # the last value pushed (if a string); the next one names a module
    for op, arg, _ in pickletools.genops(blob):
        if op.name in strings or op.name in ("BINGET", "LONG_BINGET", "GET"):
            top = arg if op.name in strings else (memo[int(arg)] if int(arg) < len(memo) else None)
            pushed.append(top)
            if want_name and isinstance(top, str):
                found.add(top)
            want_name = False
        elif op.name == "MEMOIZE":
            memo.append(top)
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo.extend([None] * (int(arg) + 1 - len(memo)))
            memo[int(arg)] = top
        elif op.name in ("GLOBAL", "STACK_GLOBAL", "INST"):
            module, name = arg.split(" ", 1) if op.name != "STACK_GLOBAL" else pushed[-2:]
            found.add(module)
            want_name = name in ("subimport", "dynamic_subimport") and str(module).startswith("cloudpickle")
            top = None
        else:
            top = None
    return {m for m in found if isinstance(m, str)}


def check_request(blob: bytes) -> None:
    """Raise RemoteError when a serialised request is over NDIF's size limit or would
    import, while the server unpickles it, a module outside its allow-list."""
    limit = max_request_bytes()
    if len(blob) > limit:
        raise RemoteError(f"this trace's request is {len(blob) / 2**20:,.1f} MiB, over our limit of "
                          f"{limit / 2**20:,.1f} MiB; the dictionaries' weights travel with every request: "
                          "use fewer or narrower dictionaries per trace, or bfloat16 weights")
    bad = sorted(m for m in imported_modules(blob) if not any(m == a or m.startswith(a + ".") for a in UNPICKLE_ALLOWED))
    if bad:
        raise RemoteError(f"this trace would import {', '.join(bad)} on NDIF, which allows only "
                          f"{', '.join(NDIF_ALLOWED)}: keep in-trace code to torch and nnsight_sae.traced")


def last_request_bytes(model) -> int | None:
    """The size of the last request this model's traces sent (None before the first)."""
    return getattr(model, _LAST_REQUEST, None)


def _checked(model, blob: bytes) -> None:
    check_request(blob)
    setattr(model, _LAST_REQUEST, len(blob))


def backend(model):
    """The nnsight backend for one trace of a remote model (a new one per trace)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.backends.remote import RemoteBackend

    class CheckedRemote(RemoteBackend):
        def _serialize(self, tracer):
            blob = super()._serialize(tracer)
            _checked(model, blob if not self.compress else _decompress(blob))
            return blob

    class CheckedSimulation(LocalSimulationBackend):
        def __call__(self, tracer):
            from nnsight.ndif import pull_env
            from nnsight.schema.request import RequestModel

            pull_env()
            # Check the request as NDIF would get it (our code by value), then run the
            # simulation with our code by reference: unpickling by-value classes in the
            # process that defined them overwrites the live classes (cloudpickle tracks them).
            _register_ours()
            try:
                _checked(model, RequestModel.serialize(tracer, compress=False))
            finally:
                _register_ours(False)
            super().__call__(tracer)

    if remote_of(model) == "local":
        return CheckedSimulation(model)
    return CheckedRemote(model.to_model_key(), env=model._remoteable_get_env())


def _decompress(blob: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(blob)
