"""The architecture's rules, checked on the source: no import cycles, no core module that
names a dictionary type or a plugin, plugins that register only in their __init__.py."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
CORE = ROOT / "nnsight_sae"
PLUGINS = ROOT / "plugins"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for base, strip in ((CORE, 0), (PLUGINS, 1)):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base.parent).with_suffix("").parts)[strip:]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict) -> set[str]:
    """Our modules that ``name`` imports (at any depth in the file, lazy imports included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            # a submodule reading its own package's __init__ (e.g. __version__) is not a dependency
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
    assert "nnsight_sae.remote" in graph["nnsight_sae.models"]  # the walk sees real edges


def _source(folder):
    return {p: p.read_text() for p in folder.rglob("*.py")}


def test_core_names_no_type_and_no_plugin():
    mods = _modules()
    for name, path in mods.items():
        if name.startswith("nnsight_sae."):
            text = path.read_text()
            assert "type_name ==" not in text and "_actions" not in text, path
            assert not [m for m in _imports(name, path, mods) if m.startswith("nnsight_sae_")], path
            # fetching a registered thing by a literal name means the core depends on that plugin
            kinds = "dictionary_types|analyses|circuit_methods|tasks|architectures"
            assert not re.search(rf'\.get\("({kinds})",\s*"', text), path


def test_plugins_do_not_reach_into_the_cli():
    for path, text in _source(PLUGINS).items():
        assert "nnsight_sae.cli" not in text, path


def test_a_plugins_init_only_registers():
    """Each first-party plugin's __init__.py imports what it registers and holds hook
    implementations only: no classes, no other functions."""
    for init in PLUGINS.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                raise AssertionError(f"{init}: class {node.name} belongs in a module of its own")
            if isinstance(node, ast.FunctionDef):
                hookimpl = any(ast.unparse(d).startswith("hookimpl") for d in node.decorator_list)
                assert hookimpl and node.name.startswith("nnsight_sae_"), f"{init}: {node.name}"
