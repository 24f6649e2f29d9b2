"""Print pet_hooks' internal import graph and flag cycles, private names and upward imports.

    python tools/import_graph.py [PACKAGE_DIR]     # default: ./pet_hooks; exit 1 on any finding

Each line is ``module -> modules it imports`` (package-internal only), counting imports
anywhere in the file, also inside functions (marked ``*``). Then every cycle between
modules is listed (strongly connected components of more than one module), every use
of another module's private name (``from .x import _y`` or ``x._y``), and every import of a
layer above the importer's: the folders are layers, lowest first (``LAYERS``); a module may
import its own layer and those below, ``errors`` and ``_version`` are below every layer, and the
package's ``__init__`` / ``__main__`` above them all.
"""
from __future__ import annotations

import ast
import os
import sys


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _resolve(current: str, is_pkg: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    parts = current.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _nested(tree: ast.AST) -> set:
    """ids of Import/ImportFrom nodes inside a function body."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    ids.add(id(sub))
    return ids


def graph(root: str):
    package = os.path.basename(os.path.abspath(root))
    modules, edges, private = {}, {}, []
    for folder, _dirs, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[_module_name(os.path.abspath(root), path)] = path
    for mod, path in sorted(modules.items()):
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        nested = _nested(tree)
        out = edges.setdefault(mod, {})
        aliases = {}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:
                        targets.append((sub, None))
                        aliases[a.asname or a.name] = sub
                    else:
                        targets.append((base, a.name))
            for target, imported in targets:
                if not target.startswith(package):
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target == mod:
                    continue
                inside = id(node) in nested
                out[target] = out.get(target, True) and inside
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append(f"{mod}: from {target} import {imported}")
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases.get(node.value.id, "").startswith(package)
                    and aliases[node.value.id] != mod):
                private.append(f"{mod}: {aliases[node.value.id]}.{node.attr}")
    return edges, private


#: the package's folders, lowest layer first (docs/layout.md explains each)
LAYERS = ("utils", "config", "matching", "tuners", "surgery", "multi", "io", "training", "doors", "cli")
_BASE = ("errors", "_version")


def layer_of(mod: str) -> int:
    """The layer rank of a module: -1 for errors / _version, len(LAYERS) for the package's own entry points."""
    parts = mod.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return len(LAYERS)
    if parts[1] in _BASE:
        return -1
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS)


def upward(edges: dict) -> list:
    """``mod -> dep`` edges where dep's layer is above mod's."""
    return sorted(f"{mod} -> {dep}" for mod, deps in edges.items() for dep in deps if layer_of(dep) > layer_of(mod))


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = argv[0] if argv else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pet_hooks")
    edges, private = graph(root)
    for mod in sorted(edges):
        deps = ", ".join(f"{d}{'*' if inside else ''}" for d, inside in sorted(edges[mod].items()))
        print(f"{mod} -> {deps}")
    found = cycles(edges)
    print(f"\ncycles: {len(found)}  (* = imported inside a function)")
    for comp in found:
        print("  cycle: " + " <-> ".join(comp))
    # The same graph with each subpackage (doors/, tuners/, ...) seen as one node.
    package = next(iter(sorted(edges))).split(".")[0]
    top = lambda mod: ".".join(mod.split(".")[:2]) if mod != package else mod
    folded: dict = {}
    for mod, deps in edges.items():
        out = folded.setdefault(top(mod), {})
        for dep in deps:
            if top(dep) != top(mod):
                out[top(dep)] = True
    found_packages = cycles(folded)
    print(f"cycles between top-level modules and subpackages: {len(found_packages)}")
    for comp in found_packages:
        print("  cycle: " + " <-> ".join(comp))
    found = found + found_packages
    print(f"private names reached across modules: {len(private)}")
    for line in sorted(set(private)):
        print("  " + line)
    up = upward(edges)
    print(f"imports of a layer above the importer's ({' < '.join(LAYERS)}): {len(up)}")
    for line in up:
        print("  " + line)
    return 1 if found or private or up else 0


if __name__ == "__main__":
    sys.exit(main())
