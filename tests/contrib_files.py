"""
The deployment files under ``contrib/``, read the way their programs read them, for
the tests that check them against the code (tests/test_contrib.py) and run them
(tests/integration/test_init_script.py, test_container.py, test_contrib_tools.py).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")
INIT_SCRIPT = os.path.join(CONTRIB, "init.d", "loghandler")
DEFAULTS = os.path.join(CONTRIB, "default", "loghandler")
UNIT = os.path.join(CONTRIB, "systemd", "loghandler.service")
DOCKERFILE = os.path.join(CONTRIB, "Dockerfile")
DOCKERIGNORE = os.path.join(ROOT, ".dockerignore")
KUBERNETES = os.path.join(CONTRIB, "kubernetes")

#: The init script's own settings in /etc/default/loghandler (its header lists them).
INIT_SCRIPT_SETTINGS = frozenset(
    {"TWISTD", "PIDFILE", "LOGFILE", "RUNDIR", "DAEMON_USER", "TWISTD_OPTS", "STOP_TIMEOUT_S"}
)


def read(path: str) -> str:
    """The text of ``path``."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def unit_entries(path: str = UNIT) -> list[tuple[str, str, str]]:
    """
    A systemd unit file's ``(section, key, value)`` entries in order; a key may come
    more than once (``SystemCallFilter=``), as systemd allows.  Comments and blank
    lines are skipped; no line continuations are used in contrib/'s unit.
    """
    entries = []
    section = ""
    for line in read(path).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(key: str, section: str = "Service", path: str = UNIT) -> str:
    """
    The last value of ``key`` in ``section`` (the one systemd keeps for a
    single-valued key).

    :raises KeyError: the key is not set.
    """
    values = [v for s, k, v in unit_entries(path) if s == section and k == key]
    if not values:
        raise KeyError(key)
    return values[-1]


def systemd_seconds(text: str) -> float:
    """A systemd time span (``45``, ``45s``, ``1min 30s``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def defaults_file(path: str = DEFAULTS) -> dict[str, str]:
    """
    The ``NAME=value`` lines of /etc/default/loghandler that are set (not
    commented out).
    """
    values = {}
    for line in read(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if not equals:
            raise ValueError("%s: not NAME=value: %r" % (path, line))
        values[name] = value
    return values


def dockerfile_instructions(path: str = DOCKERFILE) -> list[tuple[str, str]]:
    """
    The Dockerfile's ``(INSTRUCTION, arguments)`` in order, with continued lines
    joined and comments dropped.
    """
    instructions = []
    pending = ""
    for line in read(path).splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        instruction, _, arguments = whole.partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
    return instructions


def dockerfile_exec_form(arguments: str) -> list[str]:
    """A ``CMD`` or ``ENTRYPOINT`` in exec form, as its list of words."""
    words = json.loads(arguments)
    assert isinstance(words, list)
    return [str(word) for word in words]


def manifests() -> dict[str, dict[str, Any]]:
    """
    The Kubernetes objects of contrib/kubernetes/, keyed by kind (one of each), the
    example Secret included.
    """
    import yaml

    objects: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(KUBERNETES)):
        if not name.endswith(".yaml") or name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(read(os.path.join(KUBERNETES, name))):
            if document is None:
                continue
            kind = document["kind"]
            if kind in objects:
                raise ValueError("two objects of kind %s in %s" % (kind, KUBERNETES))
            objects[kind] = document
    return objects
