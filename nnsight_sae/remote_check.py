"""Checks that code meant to run inside a trace imports only what NDIF allows.

NDIF's server as of ndif-team/ndif main at 028db44 (February 2026) replaced ``__import__``
with an allow-list while it unpickled and ran a request. ndif 0.1.2 (PyPI) no longer does
(untrusted code runs in a separate runner process instead), but a deployment of the earlier
server still would, and nnsight's ``remote="local"`` simulation never checked it, so we keep
in-trace code within it. A module passes
when every import in it (at any depth, lazy ones included) names an allowed
top-level package, or another module of ours that itself passes (it would be
shipped by value with ``nnsight.register``).
"""

from __future__ import annotations

import ast
import importlib
import inspect

# ndif-team/ndif at 028db44, src/services/ray/src/ray/nn/security/protected_environment.py, WHITELISTED_MODULES
# (plus __future__, a compile-time directive that imports nothing when the code runs).
NDIF_ALLOWED = ("torch", "collections", "time", "numpy", "sympy", "nnterp", "math", "einops",
                "urllib3", "typing", "_operator", "operator", "pandas", "enum", "builtins",
                "__future__", "nnsight.intervention.envoy")
OURS = ("nnsight_sae", "nnsight_sae_")


def _allowed(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in NDIF_ALLOWED)


def _imports(module) -> list[tuple[str, int]]:
    tree = ast.parse(inspect.getsource(module))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = module.__name__.rsplit(".", node.level)[0]
                found.append((f"{base}.{node.module}" if node.module else base, node.lineno))
            else:
                found.append((node.module, node.lineno))
    return found


def check_remote_safe(*modules) -> list[str]:
    """Violations (``module:line imports name``) in the given modules and the
    modules of ours they import; an empty list means remote-safe."""
    problems, seen = [], set()
    todo = [importlib.import_module(m) if isinstance(m, str) else m for m in modules]
    while todo:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        for name, line in _imports(module):
            if _allowed(name):
                continue
            if name.startswith(OURS):
                todo.append(importlib.import_module(name))
                continue
            problems.append(f"{module.__name__}:{line} imports {name}")
    return problems


def traced_modules() -> list[str]:
    """The modules whose code runs inside traces: the in-trace helpers, the
    Dictionary base and every registered dictionary type."""
    from .plugins import registry

    types = {e.obj.__module__ for e in registry().dictionary_types.values()}
    return ["nnsight_sae.traced", "nnsight_sae.dictionary", *sorted(types)]


def trace_block_problems(*modules) -> list[str]:
    """Comment lines inside ``with ....trace(...)`` blocks of the given modules. nnsight's
    remote path ships a block re-parsed without its comments, so a comment line shifts the
    line numbers it later uses to find nested blocks (``with metric.backward():``), which then
    silently do not run. An empty list means none."""
    problems = []
    for module in modules:
        module = importlib.import_module(module) if isinstance(module, str) else module
        source = inspect.getsource(module)
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.With) and any(".trace(" in ast.unparse(item.context_expr)
                                                  for item in node.items):
                problems += [f"{module.__name__}:{n} comment line inside a trace block"
                             for n in range(node.lineno, node.end_lineno + 1) if lines[n - 1].strip().startswith("#")]
    return problems
