# Sourced by the scripts: make sure .venv holds loghandler (editable) and what the
# tests and the local S3 emulator need, and that tests/integration/azurite holds the
# Azure Blob emulator (Azurite, from npm).  Reinstalls when setup.py or the npm lock
# file changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv with $("$python" --version)" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.loghandler-installed"
if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
  echo "installing loghandler and its test dependencies into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
  # editable_mode=compat: a plain editable install hides twisted/plugins from twistd.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e "$root[test]" --config-settings editable_mode=compat
  # Build twisted's plugin cache now, not at the first start (read-only installs).
  "$venv/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
  touch "$stamp"
fi
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
