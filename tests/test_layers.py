"""Imports only go down: the bundle's packages in layers, read from the source (ast, nothing is imported).

A module of ``scripts/`` may import

- a module of its own package (``scripts.runtime.qc`` -> ``scripts.runtime.outputs``),
- a module of a package in a lower layer (``scripts.data.synthetic`` -> ``scripts.runtime.tissues``),
- the root package ``scripts`` itself (``from scripts import BUNDLE_ROOT``), from anywhere;

nothing else: not a higher layer, not another package of its own layer (the three apps and commands on top know
nothing of each other), and the root package imports nothing of the bundle. Every import counts, at module level or
inside a function (a lazy import runs too); relative imports are resolved against the importing module's package.

A call of ``importlib.import_module``, ``import_module`` (under any name it was imported as), ``__import__`` or
MONAI's ``optional_import`` is an import too. One that names a bundle module is a failure, whichever way it goes:
write an import statement, which readers and the rules can follow (its name, a string literal resolved with
``package=`` when relative, is also checked by the rules above and joins the cycle search). The one dynamic form
allowed is a package loading its own submodules by name, ``import_module(f"{__name__}.{name}")``
(scripts/runtime/__init__.py's PEP 562 lazy loading): it cannot leave its package. Any other dynamic name is a
failure, because the rules could not be checked. Imports of other libraries by string are fine.

And no module reaches itself again through its imports (no cycle, lazy imports included).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scripts"

# the layer table, top to bottom: a package may import its own modules and those of a larger layer number only
LAYERS = {
    "label_app": 1, "deploy_app": 1, "evaluation": 1,  # the apps and the study/evaluation commands
    "data": 2,  # data preparation: synthetic cohort, dHCP datalists, preprocessing command
    "runtime": 3,  # what the configs import at run time
    "lrp": 4,  # the LRP engine (pure torch)
}
IMPORT_FUNCTIONS = {"import_module", "__import__", "optional_import"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a module or package of scripts, or a deeper name that is not one)
    line: int
    how: str  # the statement or call, for the message


# -- reading the sources ------------------------------------------------------------------------------------------
def package_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """{module name: (source, is a package)} for every .py file under scripts/."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path.read_text(), is_package)
    return modules


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _resolve_relative(name: str, level: int, package: str) -> str:
    base = package.split(".")
    if level - 1 >= len(base):
        raise ValueError(f"relative import beyond the top-level package: {'.' * level}{name} in {package}")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _relative_string(name: str, package: str) -> str:
    level = len(name) - len(name.lstrip("."))
    return _resolve_relative(name[level:], level, package)


def _import_aliases(tree: ast.AST) -> set[str]:
    """The names an import function is called by in this module (``from importlib import import_module as load``)."""
    names = set(IMPORT_FUNCTIONS)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("importlib", "monai.utils"):
            names |= {alias.asname or alias.name for alias in node.names if alias.name in IMPORT_FUNCTIONS}
    return names


def _called_name(call: ast.Call) -> str:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return ""


def _own_submodule(arg: ast.AST) -> bool:
    """``f"{__name__}.{...}"``: the calling package's own submodule."""
    if not isinstance(arg, ast.JoinedStr) or len(arg.values) < 2:
        return False
    first, second = arg.values[0], arg.values[1]
    return (isinstance(first, ast.FormattedValue) and isinstance(first.value, ast.Name)
            and first.value.id in ("__name__", "__package__") and isinstance(second, ast.Constant)
            and isinstance(second.value, str) and second.value.startswith("."))


def imports_of(module: str, source: str, is_package: bool = False) -> tuple[list[Import], list[str]]:
    """The bundle modules ``module`` imports (statements at any depth and import calls with a literal name), and the
    import calls whose module name cannot be read (problems)."""
    tree = ast.parse(source, filename=module)
    package = _package_of(module, is_package)
    found, problems = [], []

    def add(target: str, node: ast.AST, how: str) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            found.append(Import(module, target, node.lineno, how))

    aliases = _import_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module or "", node.level, package) if node.level else node.module
            text = f"from {'.' * node.level}{node.module or ''} import"
            for alias in node.names:  # ``from scripts.runtime import qc`` imports scripts.runtime.qc
                add(f"{base}.{alias.name}" if alias.name != "*" else base, node, f"{text} {alias.name}")
        elif isinstance(node, ast.Call) and _called_name(node) in aliases and node.args:
            arg, how = node.args[0], ast.unparse(node)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith("."):
                    anchor = node.args[1] if len(node.args) > 1 else next(
                        (k.value for k in node.keywords if k.arg == "package"), None)
                    if not (isinstance(anchor, ast.Name) and anchor.id in ("__name__", "__package__")):
                        problems.append(f"{module}:{node.lineno}: {how}: a relative name needs package=__name__")
                        continue
                    name = _relative_string(name, package)
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    problems.append(f"{module}:{node.lineno}: {how}: a bundle module imported by a string; write an "
                                    "import statement, which the layer rules (and readers) can follow")
                add(name, node, how)
            elif not (_own_submodule(arg) and is_package):
                problems.append(f"{module}:{node.lineno}: {how}: the module name is not a string literal, so the "
                                "layer rules cannot be checked; write the name out")
    return found, problems


# -- the rules ------------------------------------------------------------------------------------------------------
def known_target(target: str, modules: set[str]) -> str:
    """The module an imported name belongs to: ``scripts.runtime.qc.QCHandler`` -> ``scripts.runtime.qc``."""
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target


def top_package(name: str, packages: set[str]) -> str | None:
    """``runtime`` for ``scripts.runtime.qc`` (or a name in it); None for the root package ``scripts`` and the names
    it defines (``scripts.BUNDLE_ROOT``)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in packages else None


def layer_violations(imports: list[Import], modules: set[str], layers: dict[str, int] = LAYERS) -> list[str]:
    """One line per import the layer table forbids; ``modules`` are the bundle's modules (their first names below
    ``scripts`` are its packages, with those of the table)."""
    packages = set(layers) | {m.split(".")[1] for m in modules if "." in m}
    out = []
    for imp in imports:
        source, target = top_package(imp.source, packages), top_package(imp.target, packages)
        where = f"{imp.source}:{imp.line}: {imp.how}"
        if target is None:
            if source is None:
                out.append(f"{where}: the root package imports nothing of the bundle")
            continue  # the root package (BUNDLE_ROOT) may be imported from anywhere
        if source is None:
            out.append(f"{where}: the root package imports nothing of the bundle")
            continue
        unknown = [p for p in (source, target) if p not in layers]
        if unknown:
            out.append(f"{where}: package {', '.join(unknown)} is not in the layer table (tests/test_layers.py)")
        elif source == target:
            continue
        elif layers[target] == layers[source]:
            out.append(f"{where}: {source} and {target} are both in layer {layers[source]}: neither imports the other")
        elif layers[target] < layers[source]:
            out.append(f"{where}: {source} (layer {layers[source]}) imports up into {target} (layer {layers[target]})")
    return out


def cycles(imports: list[Import], modules: set[str]) -> list[list[str]]:
    """The import cycles (strongly connected groups of more than one module, or a module importing itself), each
    sorted, found by Tarjan's algorithm on the graph of module -> imported module."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        target = known_target(imp.target, modules)
        if target in graph:
            graph[imp.source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                out.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def check(sources: dict[str, tuple[str, bool]], layers: dict[str, int] = LAYERS) -> list[str]:
    """Every problem of a set of modules ({name: (source, is a package)}): layer violations, unreadable dynamic
    imports and cycles, one line each."""
    imports, problems = [], []
    for module, (source, is_package) in sources.items():
        found, unreadable = imports_of(module, source, is_package)
        imports += found
        problems += unreadable
    problems += layer_violations(imports, set(sources), layers)
    problems += [f"import cycle: {' -> '.join(group)}" for group in cycles(imports, set(sources))]
    return problems


# -- the bundle -----------------------------------------------------------------------------------------------------
def test_imports_only_go_down():
    """No module of scripts/ imports a higher layer, another package of its own layer, or itself in a circle."""
    sources = package_sources()
    assert len(sources) > 40 and "scripts.runtime.qc" in sources and "scripts.data.synthetic" in sources
    problems = check(sources)
    assert not problems, "imports that do not go down (layers in tests/test_layers.py):\n" + "\n".join(problems)


def test_the_layer_table_names_every_package():
    """A new package under scripts/ must be given a layer before it can import anything."""
    packages = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert packages == set(LAYERS)


def test_the_walk_sees_every_kind_of_import():
    """The walk is not vacuous: on the bundle itself it finds module-level and lazy imports, cross-package ones and
    the runtime package's own dynamic loading."""
    sources = package_sources()
    imports = [imp for module, (source, pkg) in sources.items() for imp in imports_of(module, source, pkg)[0]]
    pairs = {(top_package(i.source, set(LAYERS)), top_package(i.target, set(LAYERS))) for i in imports}
    assert {("evaluation", "runtime"), ("data", "runtime"), ("runtime", "lrp"), ("evaluation", "data")} <= pairs
    assert any(i.source == "scripts.runtime.report" and i.target.startswith("scripts.runtime.localisation")
               for i in imports)
    lazy = [i for i in imports if i.source == "scripts.data.preprocess" and "reference" in i.target]
    assert lazy, "the lazy import of scripts.runtime.reference in preprocess.write_template was not seen"
    assert imports_of("scripts.runtime", *sources["scripts.runtime"]) == ([], [])  # f"{__name__}.{name}": allowed


# -- the checker catches what it must (hand-made modules) -------------------------------------------------------------
def _problems(**modules: str) -> list[str]:
    """check() on hand-made sources; a key ``scripts__runtime__init`` is the package scripts.runtime."""
    sources = {}
    for key, source in modules.items():
        is_package = key.endswith("__init")
        name = key.removesuffix("__init").rstrip("_").replace("__", ".")
        sources[name] = (source, is_package)
    return check(sources)


def test_an_upward_import_fails():
    problems = _problems(scripts__runtime__report="from scripts.data.synthetic_anatomy import DRAWEM9\n",
                         scripts__data__synthetic_anatomy="")
    assert len(problems) == 1 and "runtime (layer 3) imports up into data (layer 2)" in problems[0]
    assert "scripts.runtime.report:1" in problems[0]


def test_a_lazy_import_inside_a_function_counts():
    problems = _problems(scripts__lrp__rules="def f():\n    if True:\n        from scripts.runtime import qc\n",
                         scripts__runtime__qc="")
    assert len(problems) == 1 and "lrp (layer 4) imports up into runtime (layer 3)" in problems[0]


def test_an_import_between_two_top_layer_packages_fails():
    problems = _problems(scripts__deploy_app__dicom="import scripts.label_app.evidence as e\n",
                         scripts__label_app__evidence="")
    assert len(problems) == 1 and "deploy_app and label_app are both in layer 1" in problems[0]


def test_relative_imports_are_resolved():
    ok = _problems(scripts__runtime__qc="from .outputs import save_nifti\nfrom . import visual\n",
                   scripts__runtime__outputs="", scripts__runtime__visual="",
                   scripts__data__synthetic="from ..runtime.outputs import save_nifti\n")
    assert ok == []
    problems = _problems(scripts__runtime__datalist="from ..data.synthetic import generate_cohort\n",
                         scripts__data__synthetic="",
                         scripts__runtime__init="from ..evaluation import study\n")
    assert sorted(p.split(":")[0] for p in problems) == ["scripts.runtime", "scripts.runtime.datalist"]
    assert all("imports up" in p for p in problems)


def test_a_cycle_fails_even_through_lazy_imports():
    problems = _problems(
        scripts__runtime__transforms="def f():\n    from scripts.runtime.qc import REDUCTION\n",
        scripts__runtime__qc="def g():\n    from scripts.runtime.transforms import TEMPLATE_IMAGE\n",
        scripts__runtime__outputs="")
    assert problems == ["import cycle: scripts.runtime.qc -> scripts.runtime.transforms"]
    three = _problems(scripts__lrp__a="from scripts.lrp import b\n", scripts__lrp__b="import scripts.lrp.c\n",
                      scripts__lrp__c="from .a import x\n")
    assert three == ["import cycle: scripts.lrp.a -> scripts.lrp.b -> scripts.lrp.c"]


def test_a_dynamic_import_of_a_bundle_module_fails_and_is_checked_like_an_import():
    upward = _problems(scripts__runtime__datalist=("from importlib import import_module as load\n"
                                                   "def f():\n    return load('scripts.data.synthetic')\n"),
                       scripts__data__synthetic="")
    assert len(upward) == 2 and all("load('scripts.data.synthetic')" in p for p in upward)
    assert any("imports up into data" in p for p in upward)
    for call in ("importlib.import_module('scripts.evaluation.study')", "__import__('scripts.evaluation.study')",
                 "optional_import('scripts.evaluation.study')",
                 "importlib.import_module('..evaluation.study', package=__name__)"):
        problems = _problems(scripts__data__preprocess=f"import importlib\nx = {call}\n",
                             scripts__evaluation__study="")
        assert len(problems) == 2, (call, problems)
        assert any("data (layer 2) imports up into evaluation (layer 1)" in p for p in problems), call
        assert any("a bundle module imported by a string" in p for p in problems), call
    down = _problems(scripts__evaluation__study="import importlib\nimportlib.import_module('scripts.data.splits')\n",
                     scripts__data__splits="")
    assert len(down) == 1 and "a bundle module imported by a string" in down[0]  # even downwards: write an import
    assert _problems(scripts__runtime__qc="import importlib\nimportlib.import_module('numpy')\n") == []


def test_a_dynamic_import_whose_name_cannot_be_read_fails_unless_it_is_the_package_own():
    own = ("from importlib import import_module\n"
           "def __getattr__(name):\n    return import_module(f'{__name__}.{name}')\n")
    assert _problems(scripts__runtime__init=own) == []
    assert _problems(scripts__runtime__qc=own)  # a module's __name__ is not a package: its "submodules" are not its own
    problems = _problems(scripts__runtime__qc="import importlib\nname = 'scripts.x'\nimportlib.import_module(name)\n")
    assert len(problems) == 1 and "not a string literal" in problems[0]
    problems = _problems(scripts__runtime__qc="import importlib\nimportlib.import_module(f'scripts.{x}')\n")
    assert len(problems) == 1 and "not a string literal" in problems[0]


def test_the_root_package_and_unknown_packages():
    assert _problems(scripts__evaluation__study="from scripts import BUNDLE_ROOT\n",
                     scripts__init="from pathlib import Path\n") == []
    problems = _problems(scripts__init="from scripts.runtime import qc\n", scripts__runtime__qc="")
    assert len(problems) == 1 and "the root package imports nothing of the bundle" in problems[0]
    problems = _problems(scripts__tools__x="from scripts.runtime import qc\n", scripts__runtime__qc="")
    assert len(problems) == 1 and "package tools is not in the layer table" in problems[0]
