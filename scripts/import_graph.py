"""Measure the import structure of retina_core (issue #25, "One clear house").

    python scripts/import_graph.py            # summary
    python scripts/import_graph.py --verbose  # also list circles, upward imports, private names, function-level imports
    python scripts/import_graph.py --check    # exit 1 if there is any circle or upward import

Reads the source with `ast` (nothing is imported). An import counts as module-level when it is not inside a function
body (imports in module-level `if`/`try` and class bodies count; `if TYPE_CHECKING:` blocks are skipped). Edges go
from the importing module to the imported module; `from pkg import name` adds an edge to `pkg.name` as well when that
is a submodule. Implicit parent-package imports (importing `a.b.c` runs `a/__init__` and `a/b/__init__`) are not
counted as edges, so a package `__init__` is only in a circle when it imports its way back round itself.

Circles are the strongly connected components (more than one module, or a module importing itself) of the graph of
module-level imports. Upward imports follow LAYERS below: a module may import its own layer or lower ones; an import
into a higher layer is upward, whether at module level or inside a function. Private names: `from retina_core.x
import _name` in a different module than the one defining it (within retina_core, tests excluded).
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "retina_core"

# Lower number = lower layer. The first matching prefix (longest first) decides a module's layer.
LAYERS = {
    "retina_core.errors": 0, "retina_core.labels": 0, "retina_core.runtime": 0, "retina_core.audit_log": 0,
    "retina_core.about": 0, "retina_core.modality": 0,
    "retina_core.io": 1, "retina_core.phantoms": 1, "retina_core.landmarks": 1,
    "retina_core.models": 2,
    "retina_core.quality": 3,
    "retina_core.explain": 3,
    "retina_core.evaluate": 4,
    "retina_core.train": 5,
    "retina_core.evaluate.run": 6,  # the `evaluate` command's runner: scores trained models with train's predictors
    "retina_core.evaluate.ensemble_cli": 6,  # the `ensemble` command, which runs `evaluate.run`
    "retina_core.audit": 6,
    "retina_core.attention_zones": 7,
    "retina_core.analysis": 8, "retina_core.batch": 8, "retina_core.compare_modalities": 8,
    "retina_core.report": 8, "retina_core.figures": 8, "retina_core.testing": 8, "retina_core.volume": 8,
    "retina_core.serving": 9, "retina_core.browser": 9,
    "retina_core.clinic": 9,
    "retina_core.webapp": 10,  # the Streamlit glue of app.py and app_pages/: nothing below it imports it
    "retina_core.cli": 10, "retina_core.__main__": 10, "retina_core.bench": 10,
    "retina_core.bench_app": 10,  # benchmarks the running app (a browser, the pages' sample cache)
    "retina_core": 10,  # the package __init__ re-exports the public API from every layer
}


def layer_of(mod: str) -> int | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(mod: str, pkg_flag: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".") if pkg_flag else mod.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _scan(node, mod, pkg_flag, in_func, imports):
    """Append (src, dst, names, lineno, in_function) for every retina_core import below `node`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for c in child.orelse:
                _scan(ast.Module(body=[c], type_ignores=[]), mod, pkg_flag, in_func, imports)
            continue
        if isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name.split(".")[0] == PKG:
                    imports.append((mod, alias.name, [], child.lineno, in_func))
        elif isinstance(child, ast.ImportFrom):
            dst = resolve(mod, pkg_flag, child.level, child.module)
            if dst.split(".")[0] == PKG:
                imports.append((mod, dst, [a.name for a in child.names], child.lineno, in_func))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            _scan(child, mod, pkg_flag, True, imports)
        else:
            _scan(child, mod, pkg_flag, in_func, imports)


def collect(paths):
    modules = {module_name(p): p for p in paths}
    imports = []  # (src, dst, names, lineno, in_function)
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _scan(tree, mod, is_package(path), False, imports)
    return modules, imports


def edges_of(modules, imports, module_level_only=True):
    graph = defaultdict(set)
    for src, dst, names, _line, in_func in imports:
        if module_level_only and in_func:
            continue
        targets = []
        if dst in modules:
            targets.append(dst)
        for n in names:
            if f"{dst}.{n}" in modules:
                targets.append(f"{dst}.{n}")
        for t in targets:
            if t != src:
                graph[src].add(t)
    return graph


def sccs(nodes, graph):
    """Tarjan's algorithm (iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", "-v", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 on any circle or upward import")
    args = ap.parse_args(argv)

    paths = sorted((ROOT / PKG).rglob("*.py"))
    paths = [p for p in paths if "migrations" not in p.parts]  # alembic scripts, not imported as modules
    modules, imports = collect(paths)

    lines = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules.items()}

    def pkg_stats(name):
        mods = [m for m in modules if m == name or m.startswith(name + ".")]
        return len(mods), sum(lines[m] for m in mods)

    module_graph = edges_of(modules, imports, True)
    circles = sccs(sorted(modules), module_graph)
    all_circles = sccs(sorted(modules), edges_of(modules, imports, False))

    upward = []
    for src, dst, names, line, in_func in imports:
        targets = [t for t in [dst] + [f"{dst}.{n}" for n in names] if t in modules]
        target = targets[-1] if targets else dst
        ls, ld = layer_of(src), layer_of(target)
        if ls is not None and ld is not None and ld > ls:
            upward.append((src, target, line, "function" if in_func else "module"))
    unknown = sorted({m for m in modules if layer_of(m) is None})

    func_imports = [(s, d, line) for s, d, _n, line, f in imports if f]
    private = []
    for src, dst, names, line, _f in imports:
        for n in names:
            if n.startswith("_") and not n.startswith("__") and f"{dst}.{n}" not in modules and dst != src:
                private.append((src, dst, n, line))

    n_files, n_lines = pkg_stats(PKG)
    print(f"files: {n_files}, lines: {n_lines}")
    for sub in ("explain", "audit", "evaluate", "io", "models", "train"):
        f, li = pkg_stats(f"{PKG}.{sub}")
        if f:
            print(f"  {sub}/: {f} files, {li} lines")
    print(f"imports of retina_core modules: {len(imports)} "
          f"({len(imports) - len(func_imports)} module-level, {len(func_imports)} inside functions)")
    print(f"circles (module-level SCCs): {len(circles)}" +
          (f" of sizes {[len(c) for c in circles]}" if circles else ""))
    print(f"circles counting imports inside functions too: {len(all_circles)}" +
          (f" of sizes {[len(c) for c in all_circles]}" if all_circles else ""))
    print(f"upward imports: {len(upward)} ({sum(u[3] == 'module' for u in upward)} module-level)")
    print(f"private names imported across modules: {len(private)}")
    if unknown:
        print(f"modules without a layer: {unknown}")
    if args.verbose:
        for c in circles:
            print("circle:", ", ".join(c))
        for c in all_circles:
            print("circle (any import):", ", ".join(c))
        for u in upward:
            print(f"upward: {u[0]} -> {u[1]} (line {u[2]}, {u[3]}; layers {layer_of(u[0])} -> {layer_of(u[1])})")
        for p in private:
            print(f"private: {p[0]}:{p[3]} imports {p[2]} from {p[1]}")
        for s, d, line in func_imports:
            print(f"function-level: {s}:{line} -> {d}")
    return 1 if args.check and (circles or all_circles or upward) else 0


if __name__ == "__main__":
    sys.exit(main())
