# Sourced by the scripts: make sure the virtualenv holds loghandler (editable) and what
# the tests and the local S3 emulator need, and that tests/integration/azurite holds the
# Azure Blob emulator (Azurite, from npm).  Reinstalls when setup.py, the interpreter's
# constraints file or the npm lock file changed.
#
# PYTHON picks the interpreter (default python3).  Each implementation has its own
# virtualenv beside the others, so one clone tests both: .venv for CPython, .venv-pypy
# for PyPy (PYTHON=pypy3, Debian's pypy3 and pypy3-venv; pypy3-dev for the C
# extensions some test dependencies build).  pip resolves with the interpreter's
# constraints file, constraints/<implementation><major>.<minor>.txt (for example
# constraints/pypy3.9.txt), else constraints/<implementation>.txt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ensure_venv INTERPRETER: create and fill the interpreter's virtualenv when needed;
# sets venv (its path) and impl (sys.implementation.name).
ensure_venv() {
  local python="$1" impl_version constraints stamp extras
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "PYTHON=$python: no such interpreter" >&2
    exit 2
  fi
  read -r impl impl_version < <("$python" -c \
    'import sys; print(sys.implementation.name, "%d.%d" % sys.version_info[:2])')
  if [ "$impl" = cpython ]; then venv="$root/.venv"; else venv="$root/.venv-$impl"; fi
  constraints="$root/constraints/$impl$impl_version.txt"
  if [ ! -f "$constraints" ]; then constraints="$root/constraints/$impl.txt"; fi
  if [ ! -f "$constraints" ]; then
    echo "no constraints file for $impl $impl_version in $root/constraints/" >&2
    exit 2
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv with $("$python" --version 2>&1 | tr '\n' ' ')" >&2
    "$python" -m venv "$venv"
  fi
  # CPython's venv also gets the static checkers (extra "dev": ruff, mypy) that
  # scripts/check runs; they check the code, not the interpreter, so PyPy's goes without.
  extras=test
  if [ "$impl" = cpython ]; then extras=test,dev; fi
  stamp="$venv/.loghandler-installed"
  if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ] || [ "$constraints" -nt "$stamp" ]; then
    echo "installing loghandler and its test dependencies into $venv" \
      "(constraints: ${constraints#"$root/"})" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
    # editable_mode=compat: a plain editable install hides twisted/plugins from twistd.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -c "$constraints" -e "$root[$extras]" --config-settings editable_mode=compat
    # Build twisted's plugin cache now, not at the first start (read-only installs).
    "$venv/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
    touch "$stamp"
  fi
}

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "PYTHON=$python: no such interpreter" >&2
  exit 2
fi
if [ "$("$python" -c 'import sys; print(sys.implementation.name)' 2>/dev/null)" != cpython ] \
  && [ -z "${EMULATOR_PYTHON:-}" ]; then
  # Another interpreter's tests run the storage emulators (moto_server, the fault
  # proxy) on CPython, as CPython's tests do (tests/integration/moto.py says why), so
  # CPython's virtualenv is made too.
  ensure_venv python3
  export EMULATOR_PYTHON="$venv/bin/python"
fi
ensure_venv "$python"
# Azurite, pinned in tests/integration/azurite/package-lock.json, for the Azure
# integration tests (tests/integration/azurite.py).  Without npm it is left out: those
# tests then skip, or fail when CI is set (.ci/run installs Node first).
azurite="$root/tests/integration/azurite"
azurite_stamp="$azurite/node_modules/.loghandler-installed"
azurite_current() {
  [ -f "$azurite_stamp" ] && [ ! "$azurite/package-lock.json" -nt "$azurite_stamp" ] \
    && [ ! "$azurite/package.json" -nt "$azurite_stamp" ]
}
if ! azurite_current; then
  if command -v npm >/dev/null 2>&1; then
    # One install at a time: npm ci empties node_modules first.
    exec 9>"$venv/.azurite-install.lock"
    if command -v flock >/dev/null 2>&1; then flock 9; fi
    if ! azurite_current; then
      echo "installing Azurite into $azurite/node_modules" >&2
      npm ci --no-audit --no-fund --loglevel=error --prefix "$azurite" >&2
      touch "$azurite_stamp"
    fi
    exec 9>&-
  else
    echo "npm not found: Azurite is not installed, the Azure integration tests will skip" >&2
  fi
fi
