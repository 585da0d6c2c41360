# Sourced by the scripts: make sure .venv holds loghandler (editable) and what the
# tests and the local S3 emulator need.  Reinstalls when setup.py changed.
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
