"""The import rules that keep the layers apart (issue 15), checked on the source with `ast`:

(a) a CLI module (src/dlopt/cli/) imports only the standard library, click, dlopt.api, dlopt.errors,
    dlopt.console and other dlopt.cli modules: the CLI parses and prints, the library does the work;
(b) no stage (optimize/), target (targets/) or reference model (models/) imports dlopt.cli;
(c) no core module (src/dlopt/, outside cli/) imports a stage (dlopt.optimize.*), except the stage
    registry (dlopt.stage): the core reaches stages through the registry (`get_stage(kind)`, its config
    class and its declared helpers). Neither an import statement nor a "dlopt.optimize.x[:attr]" string
    (an importlib or lazy-import spec) may name one.

Modules that still break (a) or (c) on this branch are listed below with the reason; each entry must
still be needed (a stale entry fails), so the lists only shrink.
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
STAGE_PACKAGES = ("dlopt.optimize",)
STAGE_REGISTRY = ("dlopt.stage",)

# (a) CLI verbs that still call a stage module directly: none (quantize, prune and distill call dlopt.api's
# stage verbs since h-stages).
CLI_EXCEPTIONS: dict[str, str] = {}

# (c) core modules that still import a stage directly (a module name covers its submodules): none since
# h-registry (api's stage verbs, recipe and package use the registry's stages and their helpers).
CORE_EXCEPTIONS: dict[str, str] = {}


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
        if name in CLI_ALLOWED_EXACT or _under(name, CLI_ALLOWED):
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


def core_violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Rule (c): a core module that imports a stage, by statement or by a module spec string."""
    if _under(module, STAGE_REGISTRY):
        return []
    found = [f"{module}:{line} imports {name}" for name, line, _ in imported_names(source, module, is_package=is_package)
             if _under(name, STAGE_PACKAGES)]
    # a spec names a stage module under the package; the bare package name is also a label (a schema's)
    found += [f"{module}:{line} names {name}" for name, line in module_specs(source)
              if any(name.startswith(p + ".") for p in STAGE_PACKAGES)]
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
    assert not broken, "CLI modules must import only dlopt.api, dlopt.errors, dlopt.console, dlopt.cli:\n" + "\n".join(broken)


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


def test_core_reaches_stages_only_through_the_registry():
    modules = core_modules()
    assert "dlopt.api" in {m for m, _, _ in modules}
    broken = [v for module, text, pkg in modules if not _matches(module, CORE_EXCEPTIONS)
              for v in core_violations(text, module, is_package=pkg)]
    assert not broken, ("core modules must reach stages through dlopt.stage's registry:\n" + "\n".join(broken))


def test_core_exceptions_are_still_needed():
    modules = core_modules()
    for entry, reason in CORE_EXCEPTIONS.items():
        assert reason
        covered = [(m, text, pkg) for m, text, pkg in modules if m == entry or m.startswith(entry + ".")]
        assert covered, f"{entry} is gone: remove it from CORE_EXCEPTIONS"
        assert any(core_violations(text, m, is_package=pkg) for m, text, pkg in covered), (
            f"{entry} no longer imports a stage: remove it from CORE_EXCEPTIONS")


# ------------------------------------------------------------------------------ the checker catches breaks

@pytest.mark.parametrize("source, module, expected", [
    ("from dlopt.bench import benchmark", "dlopt.cli.bench", ["dlopt.cli.bench:1 imports dlopt.bench.benchmark"]),
    ("import numpy as np", "dlopt.cli.eval", ["dlopt.cli.eval:1 imports numpy"]),
    ("def command():\n    from dlopt.optimize.export import ExportConfig", "dlopt.cli.export",
     ["dlopt.cli.export:2 imports dlopt.optimize.export.ExportConfig"]),
    ("from dlopt import bench", "dlopt.cli.x", ["dlopt.cli.x:1 imports dlopt.bench"]),
    ("from .. import fileio", "dlopt.cli.x", ["dlopt.cli.x:1 imports dlopt.fileio"]),
    ("import rich.progress", "dlopt.cli.x", ["dlopt.cli.x:1 imports rich.progress"]),
    # allowed
    ("import os, re\nimport click\nfrom dlopt.api import bench\nfrom dlopt.errors import InputError\n"
     "from dlopt.console import progress_bar\nfrom ._common import echo_err\nimport dlopt\n"
     "from dlopt.cli.run import command", "dlopt.cli.x", []),
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
    ("def f():\n    from dlopt.optimize.quantize import cpu_features", "dlopt.bench",
     ["dlopt.bench:2 imports dlopt.optimize.quantize.cpu_features"]),
    ("from dlopt import optimize", "dlopt.gate", ["dlopt.gate:1 imports dlopt.optimize"]),
    ("import dlopt.optimize.int4 as q", "dlopt.package.build", ["dlopt.package.build:1 imports dlopt.optimize.int4"]),
    ("from ..optimize import fp16", "dlopt.package.build", ["dlopt.package.build:1 imports dlopt.optimize.fp16"]),
    # dlopt.api: not even inside its stage verbs (they get their stage from the registry)
    ("def quantize_model():\n    from dlopt.optimize.quantize import quantize_file", "dlopt.api",
     ["dlopt.api:2 imports dlopt.optimize.quantize.quantize_file"]),
    ("def bench():\n    from dlopt.optimize.quantize import cpu_features", "dlopt.api",
     ["dlopt.api:2 imports dlopt.optimize.quantize.cpu_features"]),
    # module spec strings: importlib and lazy tables; prose and other packages are not specs
    ("import importlib\nm = importlib.import_module('dlopt.optimize.prune')", "dlopt.recipe",
     ["dlopt.recipe:2 names dlopt.optimize.prune"]),
    ("_LAZY = {\n  'Prune': 'dlopt.optimize.prune',\n  'x': 'dlopt.optimize.quantize:summary_text'}", "dlopt.api",
     ["dlopt.api:2 names dlopt.optimize.prune", "dlopt.api:3 names dlopt.optimize.quantize"]),
    ('"""Uses dlopt.optimize.pt2e for lowering."""\nx = "dlopt.bench:format_result"\ny = "stage:export:config"\n'
     'SCHEMA = "dlopt.optimize"', "dlopt.api", []),
    ("from dlopt.optimize.export import ExportConfig", "dlopt.api",
     ["dlopt.api:1 imports dlopt.optimize.export.ExportConfig"]),
    # the registry may
    ("import importlib\nfrom dlopt.optimize.quantize import Int8Static", "dlopt.stage", []),
    ("from dlopt.optimizer import x\nfrom dlopt.stage import registry", "dlopt.recipe", []),
])
def test_core_rule_on_synthetic_sources(source, module, expected):
    assert core_violations(source, module) == expected


def test_relative_imports_resolve_in_packages():
    assert [n for n, _, _ in imported_names("from . import harness", "dlopt.bench", is_package=True)] == [
        "dlopt.bench.harness"]
    assert [n for n, _, _ in imported_names("from .harness import run", "dlopt.bench.report")] == [
        "dlopt.bench.harness.run"]
