"""The layout shows the architecture: the core imports nothing above it, models sit on
the core and the library (the text encoders read their folders with ``weights``, as
convert does), convert on the models, the jobs on everything; a model knows no sampler
and no guider; no two modules import each other (or close a longer circle); no library
module reaches for another's private names; no file runs past 500 lines."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = {"energy", "attention_kernels", "fused", "splash", "control", "guidance", "rules",
        "schedules", "targets", "emag", "samplers", "predictions", "sag", "grids", "branches",
        "context_parallel", "multistep", "solvers"}  # fmt: skip
# The Pipeline's room: settings, loaders and the Pipeline, above models and convert,
# below the jobs (the job is the Pipeline plus files, resume, hosts and reports).
PIPELINE = {"settings", "loading", "vae_loading", "pipeline"}


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
    if len(parts) > 1 and parts[1] in PIPELINE:
        return "pipeline"
    if len(parts) > 1 and parts[1] == "metrics":
        return "metrics"
    return "core" if len(parts) > 1 and parts[1] in CORE else "library"


def test_imports_only_run_downward():
    modules = _modules()
    allowed = {
        "core": {"core"},
        "library": {"core", "library"},
        "models": {"core", "library", "models"},
        "convert": {"core", "library", "models", "convert"},
        "pipeline": {"core", "library", "models", "convert", "pipeline"},
        # The feature networks (Inception, DINOv2, CLIP) and the metrics on their features.
        "metrics": {"core", "library", "models", "metrics"},
        "jobs": {"core", "library", "models", "convert", "pipeline", "metrics", "jobs"},
    }
    bad = []
    for mod, path in modules.items():
        if mod == "erg_jax":  # the package's lazy public names
            continue
        for dep in _imports(path, modules):
            if dep != "erg_jax" and _layer(dep) not in allowed[_layer(mod)]:
                bad.append(f"{mod} ({_layer(mod)}) imports {dep} ({_layer(dep)})")
    assert not bad, bad


def test_the_library_imports_no_config_and_no_launcher():
    """Configs and launchers sit on the library: nothing under erg_jax/ imports them (the
    Pipeline takes settings, and each model kind's recipes live with its model)."""
    bad = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            top = {n.split(".")[0] for n in names}
            bad += [f"{mod} imports {t}" for t in top & {"configs", "erg_jax_configs",
                                                           "launch", "erg_jax_launch"}]  # fmt: skip
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith(("configs.", "erg_jax_configs.")):
                    bad.append(f"{mod} names the module {node.value!r}")
    assert not bad, bad


def test_models_know_no_sampler_and_no_guider():
    """A denoiser takes an attention control and returns its output: how branches are
    chosen and combined (the guider) and how steps are taken (the sampler) sit above."""
    modules = _modules()
    above = ("erg_jax.samplers", "erg_jax.guidance")  # the guidance package holds the guider
    bad = [
        f"{mod} imports {dep}"
        for mod, path in modules.items()
        if _layer(mod) == "models"
        for dep in _imports(path, modules)
        if any(dep == a or dep.startswith(a + ".") for a in above)
    ]
    assert not bad, bad


def _private_uses(path: str, modules: dict) -> list[str]:
    """``from erg_jax.x import _y`` and ``x._y`` on an imported erg_jax module x (dunder
    names aside), as "line: erg_jax.x._y"."""
    tree = ast.parse(open(path).read())
    private = lambda n: n.startswith("_") and not (n.startswith("__") and n.endswith("__"))  # noqa: E731
    bound, found = {}, []  # local name -> the erg_jax module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("erg_jax"):
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else "erg_jax"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("erg_jax"):
                continue
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in modules:
                    bound[a.asname or a.name] = full
                elif private(a.name):
                    found.append(f"{node.lineno}: {full}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and private(node.attr)):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in bound:
            owner = ".".join([bound[value.id]] + chain)
            if owner in modules:
                found.append(f"{node.lineno}: {owner}.{node.attr}")
    return found


def test_no_library_module_uses_another_modules_private_names():
    """A name starting with "_" is its module's own; a second user means it is public
    (rename it) or sits in the wrong module (move it)."""
    modules = _modules()
    bad = [f"{mod} {use}" for mod, path in modules.items() for use in _private_uses(path, modules)]
    assert not bad, bad


def test_the_layout_rules_see_what_they_forbid(tmp_path):
    """The checkers on made-up files: each forbidden form is found, allowed ones are not."""
    modules = {"erg_jax.samplers": "", "erg_jax.models.dit": "", "erg_jax.models": ""}
    source = tmp_path / "m.py"
    source.write_text(
        "import erg_jax.models.dit\n"
        "from erg_jax import samplers as S\n"
        "from erg_jax.models import dit\n"
        "from erg_jax.samplers import _Point, make_step\n"
        "def f():\n"
        "    from erg_jax.models.dit import _lazy\n"
        "    return S._flow_point, dit._qkv, erg_jax.models.dit._x, S.__name__, S.public\n"
    )
    got = _private_uses(str(source), modules)
    assert got == [
        "4: erg_jax.samplers._Point",
        "6: erg_jax.models.dit._lazy",
        "7: erg_jax.samplers._flow_point",
        "7: erg_jax.models.dit._qkv",
        "7: erg_jax.models.dit._x",
    ]
    assert _imports(str(source), modules) == {
        "erg_jax.models.dit",
        "erg_jax.samplers",
        "erg_jax.models",
    }
    assert _layer("erg_jax.models.dit") == "models" and _layer("erg_jax.branches") == "core"


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


KIND_LITERALS = {"dit", "mmdit", "flux", "wan"}
# Files that may name a model kind by its string, and why (the registry itself aside).
KIND_EXEMPT = {
    "erg_jax/conditioning.py": "text layouts ('single', 'sd3', 'flux', 'wan'), not model kinds",
    "erg_jax/models/dit.py": "make_denoiser refuses a config of another kind than its own",
    "erg_jax/models/wan_config.py": "check_config refuses a config of another kind",
    "erg_jax/jobs/benchmark.py": "section names ('wan' times the video model), not model kinds",
}


def _kind_literal(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in KIND_LITERALS
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(_kind_literal, node.elts))


def _names_layout(node) -> bool:
    """A side of a comparison that names a text layout (t.layout, (layout, i))."""
    names = [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
             if isinstance(n, (ast.Name, ast.Attribute))]  # fmt: skip
    return any("layout" in n for n in names)


def _kind_comparisons(path: str) -> list[str]:
    """Comparisons against "dit", "mmdit" or "flux" (==, !=, in a tuple) and dict keys of
    them, as "line: source"; a comparison whose other side names a layout is a layout's."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(map(_kind_literal, sides)) and not any(map(_names_layout, sides)):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and any(_kind_literal(k) for k in node.keys if k):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_model_kinds_are_looked_up_in_the_registry_not_compared():
    """A model kind's properties live in its erg_jax/models/registry.py entry; a job or
    library module asks the entry (registry.get(kind).text), never compares the kind's name."""
    bad = []
    for mod, path in _modules().items():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if mod != "erg_jax.models.registry" and rel not in KIND_EXEMPT:
            bad += [f"{rel}:{found}" for found in _kind_comparisons(path)]
    assert not bad, bad


def test_the_kind_rule_sees_what_it_forbids(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "a = kind == 'dit'\n"
        "b = mc.kind in ('mmdit', 'flux')\n"
        "c = {'dit': 1}[kind]\n"
        "d = 'flux' != cfg['kind']\n"
        "e = t.layout == 'flux'\n"  # a text layout
        "f = (t.layout, i) in (('sd3', 2), ('flux', 1))\n"
        "g = src.kind == 'dit-pt' or kind == 'sd3'\n"  # not model kinds
        "h = registry.get(kind).text\n"
    )
    got = sorted(int(line.split(":")[0]) for line in _kind_comparisons(str(source)))
    assert got == [1, 2, 3, 4]
