"""Type-check the dlopt package with mypy, under the module names it is installed as.

pyproject.toml maps three repository folders into the one import package (optimize/ -> dlopt.optimize,
targets/ -> dlopt.targets, models/ -> dlopt.models). mypy names a module by its folder, and the editable
install's import hook is invisible to it, so `mypy src/dlopt optimize` would check `optimize.quantize` beside
an unresolvable `dlopt.optimize.quantize`. Instead this script lays out the installed package as a tree of
symbolic links under build/typecheck/, runs mypy on it (`-p dlopt`, options from [tool.mypy] in pyproject.toml)
and prints the findings with the repository paths a reader can open.

Usage: python scripts/typecheck.py [MYPY OPTIONS...]; exit status is mypy's (0: no errors).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
# Where each part of the import package lives in the repository (the [tool.setuptools.package-dir] mapping).
PACKAGE_DIRS = {
    "dlopt": ROOT / "src" / "dlopt",
    "dlopt/optimize": ROOT / "optimize",
    "dlopt/targets": ROOT / "targets",
    "dlopt/models": ROOT / "models",
}


def build_link_tree() -> dict[str, str]:
    """Link every file of the package into TREE; returns {tree path prefix: repository path prefix}."""
    if TREE.exists():
        shutil.rmtree(TREE)
    prefixes: dict[str, str] = {}
    for package, source in PACKAGE_DIRS.items():
        target = TREE / package
        target.mkdir(parents=True, exist_ok=True)
        for entry in source.iterdir():
            if entry.name == "__pycache__" or (TREE / package / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry)
        prefixes[f"{os.path.relpath(target, ROOT)}/"] = f"{os.path.relpath(source, ROOT)}/"
    return prefixes


def main(argv: list[str]) -> int:
    from mypy import api

    prefixes = build_link_tree()
    os.environ["MYPYPATH"] = os.path.relpath(TREE, ROOT)
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), *argv, "-p", "dlopt"])
    # Longest prefix first: build/typecheck/dlopt/optimize/ before build/typecheck/dlopt/.
    ordered = sorted(prefixes.items(), key=lambda item: -len(item[0]))
    for line in stdout.splitlines():
        for tree_prefix, repo_prefix in ordered:
            if line.startswith(tree_prefix):
                line = repo_prefix + line[len(tree_prefix) :]
                break
        print(line)
    sys.stderr.write(stderr)
    return status


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(sys.argv[1:]))
