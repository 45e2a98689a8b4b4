"""The import rules that keep the layers apart (issues 15 and 23), checked on the source with `ast`.

The layers, from the bottom: services (every core module in src/dlopt that is not below: data sources,
metrics and evaluators, graph facts, model sources, the checkpoint format, sessions, the bench harness,
the stage registry), targets and reference models; stages (dlopt.optimize.*, the package stage and the
bundle format it writes and verify checks); verbs (dlopt.api, the recipe runner dlopt.recipe, the
search dlopt.search); the CLI. A module imports only from its own layer or the ones below, by import
statements: a "module" or "module:attr" string (an importlib or lazy-import spec) counts as an import,
so hiding one in a string does not get past the rules. Rules:

(a) a CLI module (src/dlopt/cli/) imports only the standard library, click, dlopt.api, dlopt.errors,
    dlopt.console, other dlopt.cli modules and the pure text-formatting modules in CLI_TEXT_MODULES: the CLI
    parses and prints, the library does the work;
(b) no stage (optimize/), target (targets/) or reference model (models/) imports dlopt.cli;
(c) no service imports a stage, a verb or the CLI; no stage imports a verb. The registry's own table of
    where each stage kind registers itself (dlopt.stage.STAGE_MODULES) is the one place a service names
    stage modules: that is how `get_stage(kind)` finds them without importing every stage;
(d) no import cycle among the core modules (src/dlopt outside cli/), counting imports inside functions;
    elsewhere only the cycles listed below, inside one package (a package __init__ and its modules);
(e) one class per name across the package, and no alias names (`ExportConfig = Export`): one name per
    concept;
(f) no module reaches another module's `_private` names (`from .checks import _checks`, `int4._name_nodes`):
    a name another module uses is its module's API, named without the underscore. A private submodule
    (`cli/_common.py`) is private to its package;
(g) the recipe runner (dlopt.recipe) and the API verbs (dlopt.api) never compare a stage kind with a literal
    kind: what differs by kind is declared on the Stage where it registers.

Modules that still break a rule are listed below with the reason; each entry must still be needed (a
stale entry fails), so the lists only shrink.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"dlopt": ROOT / "src" / "dlopt", "dlopt.optimize": ROOT / "optimize", "dlopt.targets": ROOT / "targets",
                "dlopt.models": ROOT / "models"}

CLI_ALLOWED = ("dlopt.api", "dlopt.errors", "dlopt.console", "dlopt.cli")
CLI_ALLOWED_EXACT = ("dlopt", "dlopt.__version__")  # the version string, for --version
# Text rendering lives with the CLI (dlopt.cli.results; issue 23: api.py holds verbs only), so the CLI may import
# the modules that only format text: they import nothing beyond the standard library (checked below), so they
# bring no work into the CLI. dlopt.tables: format_table, the fixed-width tables every command prints.
CLI_TEXT_MODULES = ("dlopt.tables",)
STAGE_PACKAGES = ("dlopt.optimize", "dlopt.package", "dlopt.bundle_stage", "dlopt.verify")
VERB_MODULES = ("dlopt.api", "dlopt.recipe", "dlopt.search")
STAGE_REGISTRY = "dlopt.stage"

# (a) CLI verbs that still call a stage module directly: none (quantize, prune and distill call dlopt.api's
# stage verbs since h-stages).
CLI_EXCEPTIONS: dict[str, str] = {}

# (c) modules that still import a layer above their own (a module name covers its submodules): none.
CORE_EXCEPTIONS: dict[str, str] = {}

# (d) import cycles outside the core, each inside one package (sorted module names -> why it is still there).
KNOWN_CYCLES: dict[tuple[str, ...], str] = {
    ("dlopt.targets", "dlopt.targets.arm64", "dlopt.targets.base", "dlopt.targets.cpu", "dlopt.targets.cuda",
     "dlopt.targets.mobile", "dlopt.targets.xnnpack"):
        "the targets package's __init__ registers each target module, which reads the registry back",
}


# --------------------------------------------------------------------------------------------- the checker

def module_name(path: Path) -> str:
    """src/dlopt/cli/bench.py -> dlopt.cli.bench; optimize/__init__.py -> dlopt.optimize."""
    for package, folder in PACKAGE_DIRS.items():
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise ValueError(f"{path} is not in a dlopt package folder")


def imported_names(source: str, module: str, *, is_package: bool = False) -> Iterator[tuple[str, int, str | None]]:
    """(full dotted name, line, enclosing top-level function or None) of every import in `source`.
    `from a.b import c` yields a.b.c (c may be a module or an attribute: both are what it imports from
    a.b); relative imports are resolved against `module`."""
    tree = ast.parse(source)
    enclosing: dict[int, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                enclosing[id(inner)] = node.name
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, enclosing.get(id(node))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno, enclosing.get(id(node))


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cli_violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Rule (a): what a CLI module imports beyond stdlib, click and the allowed dlopt modules."""
    found = []
    for name, line, _ in imported_names(source, module, is_package=is_package):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__" or top == "click":
            continue
        if name in CLI_ALLOWED_EXACT or _under(name, CLI_ALLOWED + CLI_TEXT_MODULES):
            continue
        found.append(f"{module}:{line} imports {name}")
    return found


def stage_violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Rule (b): a stage or target module that imports the CLI."""
    return [f"{module}:{line} imports {name}" for name, line, _ in imported_names(source, module, is_package=is_package)
            if _under(name, ("dlopt.cli",))]


def module_specs(source: str) -> Iterator[tuple[str, int]]:
    """(module, line) of every string constant that is a module spec, "a.b.c" or "a.b.c:attr" (what
    importlib.import_module or a lazy-import table takes); prose (docstrings, messages) has spaces."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SPEC.fullmatch(node.value):
            yield node.value.partition(":")[0], node.lineno


SPEC = re.compile(r"[A-Za-z_]\w*(\.\w+)+(:\w+)?")


def layer(module: str) -> str:
    """Which layer a module is in: cli, verbs, stages or services (targets and reference models included)."""
    if _under(module, ("dlopt.cli", "dlopt.__main__")):
        return "cli"
    if _under(module, VERB_MODULES):
        return "verbs"
    if _under(module, STAGE_PACKAGES):
        return "stages"
    return "services"


ABOVE = {"services": ("stages", "verbs", "cli"), "stages": ("verbs", "cli"), "verbs": ("cli",), "cli": ()}


def _registry_table_lines(source: str) -> set[int]:
    """The lines of dlopt.stage's STAGE_MODULES table (kind -> module that registers it)."""
    for node in ast.parse(source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                       else None)
        if isinstance(target, ast.Name) and target.id == "STAGE_MODULES":
            return set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return set()


def core_violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Rule (c): an import, by statement or by a module spec string, of a layer above the module's own."""
    above = ABOVE[layer(module)]
    found = [f"{module}:{line} imports {name}" for name, line, _ in imported_names(source, module, is_package=is_package)
             if name.startswith("dlopt.") and layer(name) in above]
    table = _registry_table_lines(source) if module == STAGE_REGISTRY else set()
    # a spec names a module under a package; a bare package name is also a label (a schema's)
    found += [f"{module}:{line} names {name}" for name, line in module_specs(source)
              if name.startswith("dlopt.") and name != "dlopt.optimize" and layer(name) in above
              and line not in table]
    return found


def sources(folder: Path, *, skip: tuple[Path, ...] = ()) -> list[tuple[str, str, bool]]:
    """(module name, source, is a package) of every .py file under `folder`, outside `skip`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        if any(path.is_relative_to(s) for s in skip):
            continue
        found.append((module_name(path), path.read_text(), path.name == "__init__.py"))
    return found


def _matches(module: str, exceptions: dict[str, str]) -> str | None:
    return next((e for e in exceptions if module == e or module.startswith(e + ".")), None)


# --------------------------------------------------------------------------------------------- the rules

CLI_DIR = ROOT / "src" / "dlopt" / "cli"


def test_cli_imports_only_the_api_errors_and_console():
    modules = sources(CLI_DIR)
    assert {"dlopt.cli", "dlopt.cli.bench", "dlopt.cli.gate", "dlopt.cli.models"} <= {m for m, _, _ in modules}
    broken = [v for module, text, pkg in modules if not _matches(module, CLI_EXCEPTIONS)
              for v in cli_violations(text, module, is_package=pkg)]
    allowed = ", ".join(CLI_ALLOWED + CLI_TEXT_MODULES)
    assert not broken, f"CLI modules must import only {allowed}:\n" + "\n".join(broken)


def test_the_text_modules_the_cli_may_import_import_only_the_standard_library():
    modules = {m: (text, pkg) for m, text, pkg in sources(ROOT / "src" / "dlopt")}
    for module in CLI_TEXT_MODULES:
        text, pkg = modules[module]
        imports = [(name, line) for name, line, _ in imported_names(text, module, is_package=pkg)]
        assert imports, f"{module} has no imports: the check reads nothing"
        beyond = [f"{module}:{line} imports {name}" for name, line in imports
                  if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "__future__"]
        assert not beyond, "a module the CLI may import must only format text:\n" + "\n".join(beyond)


def test_cli_exceptions_are_still_needed():
    modules = {m: (text, pkg) for m, text, pkg in sources(CLI_DIR)}
    for module, reason in CLI_EXCEPTIONS.items():
        assert reason
        assert module in modules, f"{module} is gone: remove it from CLI_EXCEPTIONS"
        text, pkg = modules[module]
        assert cli_violations(text, module, is_package=pkg), f"{module} keeps the rule now: remove it from CLI_EXCEPTIONS"


def test_no_stage_target_or_reference_model_imports_the_cli():
    modules = sources(ROOT / "optimize") + sources(ROOT / "targets") + sources(ROOT / "models")
    assert any(m.startswith("dlopt.optimize.") for m, _, _ in modules)
    assert any(m.startswith("dlopt.targets.") for m, _, _ in modules)
    broken = [v for module, text, pkg in modules for v in stage_violations(text, module, is_package=pkg)]
    assert not broken, "stages, targets and models must not import the CLI:\n" + "\n".join(broken)


def core_modules() -> list[tuple[str, str, bool]]:
    return sources(ROOT / "src" / "dlopt", skip=(CLI_DIR,))


def all_modules() -> list[tuple[str, str, bool]]:
    return core_modules() + sources(ROOT / "optimize") + sources(ROOT / "targets") + sources(ROOT / "models")


def test_no_module_imports_a_layer_above_its_own():
    modules = all_modules()
    assert {"dlopt.api", "dlopt.stage", "dlopt.optimize.export", "dlopt.targets.cpu"} <= {m for m, _, _ in modules}
    broken = [v for module, text, pkg in modules if not _matches(module, CORE_EXCEPTIONS)
              for v in core_violations(text, module, is_package=pkg)]
    assert not broken, ("services import no stage, verb or CLI; stages no verb (tests/test_architecture.py):\n"
                        + "\n".join(broken))


def test_core_exceptions_are_still_needed():
    modules = all_modules()
    for entry, reason in CORE_EXCEPTIONS.items():
        assert reason
        covered = [(m, text, pkg) for m, text, pkg in modules if m == entry or m.startswith(entry + ".")]
        assert covered, f"{entry} is gone: remove it from CORE_EXCEPTIONS"
        assert any(core_violations(text, m, is_package=pkg) for m, text, pkg in covered), (
            f"{entry} keeps the rule now: remove it from CORE_EXCEPTIONS")


# --------------------------------------------------------------------------------------------- (d) cycles

def import_graph(modules: list[tuple[str, str, bool]]) -> dict[str, set[str]]:
    """module -> the modules among `modules` it imports (module level or inside a function: both run).
    `from a.b import c` is an edge to a.b.c when that is one of the modules, else to a.b."""
    names = {m for m, _, _ in modules}
    graph: dict[str, set[str]] = {m: set() for m in names}
    for module, text, pkg in modules:
        for name, _, _ in imported_names(text, module, is_package=pkg):
            parts = name.split(".")
            target = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in names),
                          None)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycle_among_the_core_modules():
    graph = import_graph(core_modules())
    assert {"dlopt.api", "dlopt.recipe", "dlopt.search.driver"} <= set(graph)
    assert "dlopt.recipe" in graph["dlopt.api"]  # the graph holds the imports inside functions too
    cycles = import_cycles(graph)
    assert not cycles, "import cycles among the core modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycles_outside_the_core_are_the_known_ones_inside_one_package():
    cycles = import_cycles(import_graph(all_modules()))
    assert set(cycles) <= set(KNOWN_CYCLES), "new import cycles:\n" + "\n".join(
        " <-> ".join(c) for c in cycles if c not in KNOWN_CYCLES)
    stale = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not stale, f"these cycles are gone: remove them from KNOWN_CYCLES: {stale}"


def test_the_cycle_finder_finds_cycles():
    modules = [("dlopt.a", "from dlopt.b import x", False),
               ("dlopt.b", "def f():\n    import dlopt.c", False),
               ("dlopt.c", "from dlopt import a", False),
               ("dlopt.d", "from dlopt.a import y", False),
               ("dlopt.e", "from . import f", True), ("dlopt.e.f", "from dlopt.e import g", False)]
    assert import_cycles(import_graph(modules)) == [("dlopt.a", "dlopt.b", "dlopt.c"), ("dlopt.e", "dlopt.e.f")]
    assert import_cycles(import_graph(modules[:2] + modules[3:4])) == []


# ------------------------------------------------------------------------------- (e) one name per concept

def class_definitions(modules: list[tuple[str, str, bool]]) -> dict[str, list[str]]:
    """class name -> the modules that define a class of that name (module level or nested)."""
    found: dict[str, list[str]] = {}
    for module, text, _ in modules:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(module)
    return found


def alias_names(source: str, module: str) -> list[str]:
    """Module-level `Name = Other` where Other is a class of this module or one imported by name: a second
    name for one class. (ALL_CAPS constants bound to a class are not aliases a reader meets as a type.)"""
    tree = ast.parse(source)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    classes |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names
                if (a.asname or a.name)[:1].isupper() and not (a.asname or a.name).isupper()}
    return [f"{module}:{n.lineno} {n.targets[0].id} = {n.value.id}" for n in tree.body
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
            and isinstance(n.value, ast.Name) and n.value.id in classes and not n.targets[0].id.isupper()]


# names defined twice that are still to be renamed (name -> why it is still there); the list only shrinks.
KNOWN_DUPLICATE_CLASSES: dict[str, str] = {}
KNOWN_ALIASES: dict[str, str] = {}


def test_one_class_per_name_across_the_package():
    found = class_definitions(all_modules())
    assert "Stage" in found
    twice = {name: where for name, where in found.items() if len(where) > 1 and name not in KNOWN_DUPLICATE_CLASSES}
    assert not twice, f"one class per name: {twice}"
    stale = [n for n in KNOWN_DUPLICATE_CLASSES if len(found.get(n, ())) < 2]
    assert not stale, f"defined once now: remove from KNOWN_DUPLICATE_CLASSES: {stale}"


def test_no_alias_names():
    found = [a for module, text, _ in all_modules() for a in alias_names(text, module)]
    new = [a for a in found if a.split(" ", 1)[1].split(" =")[0] not in KNOWN_ALIASES]
    assert not new, "a class has one name (use the class's own):\n" + "\n".join(new)
    stale = [n for n in KNOWN_ALIASES if not any(a.split(" ", 1)[1].startswith(n + " =") for a in found)]
    assert not stale, f"gone: remove from KNOWN_ALIASES: {stale}"


def test_the_name_checks_find_duplicates_and_aliases():
    modules = [("dlopt.a", "class Recipe:\n    pass\nRecipeAlias = Recipe\nLIMIT = 3", False),
               ("dlopt.b", "from dlopt.a import Recipe\nOld = Recipe\ndef f():\n    class Recipe: ...\n", False)]
    assert class_definitions(modules)["Recipe"] == ["dlopt.a", "dlopt.b"]
    assert alias_names(modules[0][1], "dlopt.a") == ["dlopt.a:3 RecipeAlias = Recipe"]
    assert alias_names(modules[1][1], "dlopt.b") == ["dlopt.b:2 Old = Recipe"]


# ------------------------------------------------------------------------------ the checker catches breaks

@pytest.mark.parametrize("source, module, expected", [
    ("from dlopt.bench import benchmark", "dlopt.cli.bench", ["dlopt.cli.bench:1 imports dlopt.bench.benchmark"]),
    ("import numpy as np", "dlopt.cli.eval", ["dlopt.cli.eval:1 imports numpy"]),
    ("def command():\n    from dlopt.optimize.export import Export", "dlopt.cli.export",
     ["dlopt.cli.export:2 imports dlopt.optimize.export.Export"]),
    ("from dlopt import bench", "dlopt.cli.x", ["dlopt.cli.x:1 imports dlopt.bench"]),
    ("from .. import fileio", "dlopt.cli.x", ["dlopt.cli.x:1 imports dlopt.fileio"]),
    ("import rich.progress", "dlopt.cli.x", ["dlopt.cli.x:1 imports rich.progress"]),
    ("from dlopt.reporting import x\nfrom dlopt.package.report import y", "dlopt.cli.x",
     ["dlopt.cli.x:1 imports dlopt.reporting.x", "dlopt.cli.x:2 imports dlopt.package.report.y"]),
    # allowed
    ("import os, re\nimport click\nfrom dlopt.api import bench\nfrom dlopt.errors import InputError\n"
     "from dlopt.console import progress_bar\nfrom ._common import echo_err\nimport dlopt\n"
     "from dlopt.cli.run import command\nfrom dlopt.tables import format_table", "dlopt.cli.x", []),
])
def test_cli_rule_on_synthetic_sources(source, module, expected):
    assert cli_violations(source, module) == expected


@pytest.mark.parametrize("source, module, expected", [
    ("from dlopt.cli.bench import progress_bar", "dlopt.optimize.quantize",
     ["dlopt.optimize.quantize:1 imports dlopt.cli.bench.progress_bar"]),
    ("def f():\n    import dlopt.cli", "dlopt.targets.cpu", ["dlopt.targets.cpu:2 imports dlopt.cli"]),
    ("from dlopt import cli", "dlopt.targets.cpu", ["dlopt.targets.cpu:1 imports dlopt.cli"]),
    ("from dlopt.console import progress_bar\nfrom dlopt.client import x", "dlopt.optimize.prune", []),
])
def test_stage_rule_on_synthetic_sources(source, module, expected):
    assert stage_violations(source, module) == expected


@pytest.mark.parametrize("source, module, expected", [
    # a service imports no stage, verb or CLI
    ("def f():\n    from dlopt.optimize.quantize import cpu_features", "dlopt.bench",
     ["dlopt.bench:2 imports dlopt.optimize.quantize.cpu_features"]),
    ("from dlopt import optimize", "dlopt.gate", ["dlopt.gate:1 imports dlopt.optimize"]),
    ("from dlopt.api import report_path_for", "dlopt.data", ["dlopt.data:1 imports dlopt.api.report_path_for"]),
    ("def f():\n    from dlopt.recipe import run_recipe", "dlopt.stagecache",
     ["dlopt.stagecache:2 imports dlopt.recipe.run_recipe"]),
    ("from dlopt.package import package", "dlopt.targets.mobile", ["dlopt.targets.mobile:1 imports dlopt.package.package"]),
    # a stage imports no verb
    ("def f():\n    from dlopt.api import report_path_for", "dlopt.optimize.quantize.files",
     ["dlopt.optimize.quantize.files:2 imports dlopt.api.report_path_for"]),
    ("from ..search import optimize", "dlopt.package.build", ["dlopt.package.build:1 imports dlopt.search.optimize"]),
    # module spec strings: importlib and lazy tables count; prose and the schema label do not
    ("import importlib\nm = importlib.import_module('dlopt.optimize.prune')", "dlopt.stagecache",
     ["dlopt.stagecache:2 names dlopt.optimize.prune"]),
    ("_LAZY = {\n  'Prune': 'dlopt.optimize.prune',\n  'x': 'dlopt.api:summary_text'}", "dlopt.package",
     ["dlopt.package:3 names dlopt.api"]),
    ('"""Uses dlopt.optimize.pt2e for lowering."""\nx = "dlopt.bench:format_result"\nSCHEMA = "dlopt.optimize"',
     "dlopt.data", []),
    # allowed: a verb imports stages and services; a stage imports services and other stages
    ("from dlopt.optimize.export import Export\nfrom dlopt.recipe import run_recipe\nfrom dlopt.data import load_data",
     "dlopt.api", []),
    ("from dlopt.optimize.pt2e import lower_to_pte\nfrom dlopt.sources import load_source", "dlopt.package.pte", []),
    # the registry's table of where each kind registers, and nothing else of it
    ("STAGE_MODULES: dict[str, str] = {\n    'export': 'dlopt.optimize.export',\n}\nX = 'dlopt.optimize.prune'",
     "dlopt.stage", ["dlopt.stage:4 names dlopt.optimize.prune"]),
    ("from dlopt.optimize.quantize import Int8Static", "dlopt.stage",
     ["dlopt.stage:1 imports dlopt.optimize.quantize.Int8Static"]),
])
def test_core_rule_on_synthetic_sources(source, module, expected):
    assert core_violations(source, module) == expected


def test_relative_imports_resolve_in_packages():
    assert [n for n, _, _ in imported_names("from . import harness", "dlopt.bench", is_package=True)] == [
        "dlopt.bench.harness"]
    assert [n for n, _, _ in imported_names("from .harness import run", "dlopt.bench.summary")] == [
        "dlopt.bench.harness.run"]


# ------------------------------------------------------------------- (f) no private names across modules

def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str, module: str, modules: set[str], *, is_package: bool = False) -> list[str]:
    """Rule (f): the `_private` names of another dlopt module (another file) that `source` reaches, by
    `from M import _name` or by `M._name` on a module it imported. A private submodule (`cli/_common.py`) is
    private to its package: the package's own modules may import it, others may not."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []

    def foreign(owner: str, name: str) -> bool:
        """`owner._name` is another module's private name (or a private submodule outside its package)."""
        if owner not in modules or owner == module or not _is_private(name):
            return False
        return not (f"{owner}.{name}" in modules and _under(module, (owner,)))

    def private_module(name: str, line: int) -> None:
        """`name` (a dotted module path) passes through a private submodule of a package `module` is outside."""
        parts = name.split(".")
        for k in range(1, len(parts)):
            if foreign(".".join(parts[:k]), parts[k]):
                found.append(f"{module}:{line} imports {'.'.join(parts[:k + 1])}")
                return

    bound: dict[str, str] = {}  # local name -> the dlopt module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                private_module(alias.name, node.lineno)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            private_module(base, node.lineno)
            for alias in node.names:
                if foreign(base, alias.name):
                    found.append(f"{module}:{node.lineno} imports {base}.{alias.name}")
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"

    def dotted(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute):
            head = dotted(node.value)
            return f"{head}.{node.attr}" if head is not None else None
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = dotted(node.value)
            if owner is not None and foreign(owner, node.attr):
                found.append(f"{module}:{node.lineno} uses {owner}.{node.attr}")
    return sorted(set(found), key=lambda v: (v.split(":")[0], int(v.split(":")[1].split(" ")[0]), v))


def test_no_module_reaches_another_modules_private_names():
    modules = all_modules()
    names = {m for m, _, _ in modules}
    found = [v for module, text, pkg in modules for v in private_imports(text, module, names, is_package=pkg)]
    print(f"{len(found)} private names reached across modules:\n" + "\n".join(found))
    assert not found, ("a name used by another module is that module's API: name it without the underscore "
                       "(tests/test_architecture.py):\n" + "\n".join(found))


PRIVATE_MODULES = {"dlopt.package", "dlopt.package.checks", "dlopt.optimize", "dlopt.optimize.int4",
                   "dlopt.optimize.int4.graph", "dlopt.cli", "dlopt.cli._common", "dlopt.cli.bench", "dlopt.models",
                   "dlopt.models._data", "dlopt.verify"}


@pytest.mark.parametrize("source, module, is_package, expected", [
    ("from .checks import _checks, read_samples", "dlopt.package", True,
     ["dlopt.package:1 imports dlopt.package.checks._checks"]),
    ("def f():\n    from dlopt.package.checks import _check_text", "dlopt.verify", False,
     ["dlopt.verify:2 imports dlopt.package.checks._check_text"]),
    ("from dlopt.optimize import int4\nint4._gemm_to_matmul(m, set())", "dlopt.optimize.fp16", False,
     ["dlopt.optimize.fp16:2 uses dlopt.optimize.int4._gemm_to_matmul"]),
    ("import dlopt.optimize.int4.graph as graph\nx = graph._MS_DOMAIN", "dlopt.optimize.fp16", False,
     ["dlopt.optimize.fp16:2 uses dlopt.optimize.int4.graph._MS_DOMAIN"]),
    ("import dlopt.package.checks\ndlopt.package.checks._session(p, {})", "dlopt.verify", False,
     ["dlopt.verify:2 uses dlopt.package.checks._session"]),
    ("from dlopt.models._data import pip_name", "dlopt.cli.bench", False,
     ["dlopt.cli.bench:1 imports dlopt.models._data"]),
    # allowed: a module's own private names, dunders, public names, private names of other objects, a private
    # submodule inside its package, and names of modules outside dlopt
    ("from dlopt.package.checks import output_checks\nfrom dlopt import __version__\nself._x = 1\n"
     "from dlopt.models._data import pip_name\nimport numpy as np\nnp._NoValue", "dlopt.models", True, []),
    ("from ._common import echo_err\nfrom . import _common\n_common.echo_err('x')", "dlopt.cli.bench", False, []),
    ("def _helper(): ...\n_helper()", "dlopt.package.checks", False, []),
])
def test_private_rule_on_synthetic_sources(source, module, is_package, expected):
    assert private_imports(source, module, PRIVATE_MODULES, is_package=is_package) == expected


# ------------------------------------------------------- (g) the runner and the verbs do not branch on a kind

# The recipe runner and the API verbs are loops over stages: what differs by kind is declared on the Stage
# (takes, makes, reads, data_fields, quantizes, precision, recipe_check) where the stage registers itself.
KIND_FREE_MODULES = ("dlopt.recipe", "dlopt.api")


def kind_branches(source: str, module: str) -> list[str]:
    """Comparisons of a stage kind (`x.kind`, or a name `kind`) with a literal kind: `stage.kind == "prune"`,
    `kind in ("quantize", "fp16")`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names_kind = any(
            (isinstance(s, ast.Attribute) and s.attr == "kind") or (isinstance(s, ast.Name) and s.id == "kind")
            for s in sides
        )
        literal = any(
            (isinstance(s, ast.Constant) and isinstance(s.value, str))
            or (isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(isinstance(e, ast.Constant) for e in s.elts))
            for s in sides
        )
        if names_kind and literal:
            found.append(f"{module}:{node.lineno} compares a stage kind with a literal: {ast.unparse(node)}")
    return found


def test_the_recipe_runner_and_the_verbs_do_not_branch_on_a_stage_kind():
    found = [v for module, text, _ in all_modules() if module in KIND_FREE_MODULES for v in kind_branches(text, module)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ('if stage.kind == "prune":\n    pass', 1),
    ('x = kind in ("quantize", "fp16")', 1),
    ('if spec.makes == "bundle":\n    pass', 0),  # what a stage makes is declared on it: not a kind
    ("if stage.kind == other.kind:\n    pass", 0),
])
def test_kind_branch_rule_on_synthetic_sources(source, expected):
    assert len(kind_branches(source, "dlopt.recipe")) == expected


def test_the_apis_lazy_names_are_the_names_where_they_are_defined():
    """Rule (e) for dlopt.api's lazy table: a name the CLI reaches through dlopt.api is the defining module's
    own name (`"format_bench": "dlopt.bench"`), never a renaming (`"format_bench": "dlopt.bench:format_result"`)."""
    import importlib

    source = (PACKAGE_DIRS["dlopt"] / "api.py").read_text()
    table = next(
        node.value for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
    )
    lazy = ast.literal_eval(table)
    renamed = {name: target for name, target in lazy.items() if ":" in target}
    assert not renamed, renamed
    missing = [name for name, module in lazy.items() if not hasattr(importlib.import_module(module), name)]
    assert not missing, missing
