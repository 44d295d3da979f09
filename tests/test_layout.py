"""The layout shows the architecture: the core imports nothing above it, models and
convert sit on the core (side by side: text encoders read their folders with convert's
readers), the jobs on everything; no two modules import each other (or
close a longer circle); no file runs past 500 lines."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = {"energy", "fused", "splash", "control", "guidance", "guider", "rules", "schedules",
        "samplers", "predictions", "sag", "grids"}  # fmt: skip


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "erg_jax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules: dict) -> set[str]:
    """erg_jax modules a file imports, at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules and n.startswith("erg_jax.")}
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("models", "convert", "jobs"):
        return parts[1]
    return "core" if len(parts) > 1 and parts[1] in CORE else "library"


def test_imports_only_run_downward():
    modules = _modules()
    allowed = {
        "core": {"core"},
        "library": {"core", "library"},
        "models": {"core", "library", "models", "convert"},
        "convert": {"core", "library", "models", "convert"},
        "jobs": {"core", "library", "models", "convert", "jobs"},
    }
    bad = []
    for mod, path in modules.items():
        if mod == "erg_jax":  # the package's lazy public names
            continue
        for dep in _imports(path, modules):
            if dep != "erg_jax" and _layer(dep) not in allowed[_layer(mod)]:
                bad.append(f"{mod} ({_layer(mod)}) imports {dep} ({_layer(dep)})")
    assert not bad, bad


def test_no_import_circles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m, "erg_jax"} for m, p in modules.items()}
    state, circles = {}, []

    def visit(m, trail):
        state[m] = "open"
        for d in graph.get(m, ()):
            if d.startswith(m + "."):  # a package importing its own submodule
                continue
            if state.get(d) == "open":
                circles.append(trail[trail.index(d) :] + [d])
            elif d not in state:
                visit(d, trail + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    circles = [
        c for c in circles if not any(a.startswith(b + ".") for a, b in zip(c, c[1:], strict=False))
    ]
    assert not circles, circles


def test_no_file_over_500_lines():
    long = []
    for top in ("erg_jax", "launch", "configs", "scripts", "tests"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    n = sum(1 for _ in open(path))
                    if n > 500:
                        long.append((os.path.relpath(path, ROOT), n))
    assert not long, long
