"""dlopt.targets (the repository folder targets/ is installed under this name)."""

if __name__ != "dlopt.targets":  # imported as a top-level 'targets' from the repo root: a second copy
    raise ImportError("import this package as dlopt.targets (pip install -e . first)")
