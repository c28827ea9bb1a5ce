"""Checks that code meant to run inside a trace imports only what NDIF allows.

NDIF's server replaces ``__import__`` with an allow-list; nnsight's
``remote="local"`` simulation does not enforce it, so we do. A module passes
when every import in it (at any depth, lazy ones included) names an allowed
top-level package, or another module of ours that itself passes (it would be
shipped by value with ``nnsight.register``).
"""

from __future__ import annotations

import ast
import importlib
import inspect

# From ndif-team/ndif's protected_environment.py (Feb 2026).
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
