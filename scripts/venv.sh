# Sourced by scripts/test.sh and scripts/demo.sh: make sure `python` and `pip` are a virtual
# environment's, so that the scripts work on a stock Debian/Ubuntu machine, where there is no
# `python` (only `python3`) and pip refuses to install into the system Python (PEP 668).
# - A virtual environment is already active (CI's, or the user's own): use it.
# - Otherwise: the project's .venv, created with python3 on first use, then activated.
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "${VIRTUAL_ENV}/bin/python" ]; then
  echo "using the active virtual environment ${VIRTUAL_ENV}" >&2
else
  if [ -e .venv ] && [ ! -x .venv/bin/python ]; then
    echo "error: .venv exists but is not a virtual environment (no .venv/bin/python); remove it, or activate one" >&2
    exit 2
  fi
  if [ ! -e .venv ]; then
    if ! command -v python3 >/dev/null; then
      echo "error: python3 not found; install it (Debian/Ubuntu: sudo apt-get install python3 python3-venv)" >&2
      exit 2
    fi
    if ! python3 -c "import ensurepip, venv" 2>/dev/null && command -v apt-get >/dev/null; then
      # Debian ships venv's pip bootstrap separately (python3-venv)
      SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
      $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv
    fi
    echo "creating the virtual environment .venv with $(command -v python3)" >&2
    if ! python3 -m venv .venv; then
      rm -rf .venv  # the half-made one just created
      echo "error: python3 -m venv failed; install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 2
    fi
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  echo "using the virtual environment .venv (activate it with: source .venv/bin/activate)" >&2
fi
