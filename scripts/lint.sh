#!/usr/bin/env bash
# The lint and type gate (run by scripts/test.sh before the tests; CI runs that): ruff's lint rules, ruff's
# formatting and mypy, on the import package's folders. Configuration: [tool.ruff] and [tool.mypy] in
# pyproject.toml. Fails at the first check that finds something, saying how to fix it.
set -uo pipefail
cd "$(dirname "$0")/.."
PATHS=(src optimize targets models)

if ! python -m ruff check "${PATHS[@]}"; then
  echo "lint: ruff check failed (above). Fix the findings; 'python -m ruff check --fix ${PATHS[*]}' fixes those marked [*]." >&2
  exit 1
fi
if ! python -m ruff format --check "${PATHS[@]}"; then
  echo "lint: files not formatted as ruff formats them (above). Run: python -m ruff format ${PATHS[*]}" >&2
  exit 1
fi
if ! python scripts/typecheck.py; then
  echo "lint: mypy found type errors (above). Fix the code or its annotations; do not add '# type: ignore'." >&2
  exit 1
fi
echo "lint: ruff check, ruff format --check and mypy passed"
