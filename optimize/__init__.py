"""dlopt.optimize (the repository folder optimize/ is installed under this name)."""

if __name__ != "dlopt.optimize":  # imported as a top-level 'optimize' from the repo root: a second copy
    raise ImportError("import this package as dlopt.optimize (pip install -e . first)")
