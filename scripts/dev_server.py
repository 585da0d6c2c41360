"""
loghandler against a local storage emulator, for trying it by hand
(``scripts/dev-server [--azure]``).

Starts moto's S3 server on a free port with the bucket ``loghandler-dev`` (with
``--azure``: Azurite, Azure Storage's emulator, with the container
``loghandler-dev``), writes its settings to ``.dev/emulator.env`` (for
``scripts/read-objects``), runs ``twistd -n loghandler`` against it and prints how to
POST and how to read what was stored.  On S3 an object is completed
``QUEUE_TIMEOUT_MIN`` after its first message (1 minute here unless set) and when
loghandler stops; on Azure the lines are appended to their blob at every checkpoint
(``CHECKPOINT_S``, 30 s by default there) and when loghandler stops.

One dev-server runs per clone: it holds an exclusive ``flock`` on
``.dev/dev-server.lock`` for as long as it runs (the kernel releases it when the
process ends, however it ends) and writes there its pid and where loghandler and the
emulator listen.  A second start finds the lock held, prints that in one line and
exits 1, leaving the running one's emulator and ``.dev/emulator.env`` alone; a lock
file left by a dead run is not locked, and is taken and rewritten.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
#: Where the dev-server keeps its lock and its emulator's settings.
DEV_DIR = os.path.join(ROOT, ".dev")

from tests.integration.azurite import AzuriteServer  # noqa: E402
from tests.integration.moto import MotoServer  # noqa: E402

USAGE = """\
Run loghandler on http://127.0.0.1:8902 against a local storage emulator that this
command starts itself: moto's S3 server (bucket loghandler-dev), or with --azure
Azurite (container loghandler-dev).  Ctrl-C stops loghandler, which stores what it
holds first; the emulator keeps serving until a second Ctrl-C.  Read what was stored
with scripts/read-objects.  loghandler's variables set in the environment are passed
on, e.g. PORT=9000 QUEUE_TIMEOUT_MIN=0.5 scripts/dev-server"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: ``--azure``, or ``--help`` (prints the usage, exits 0)."""
    parser = argparse.ArgumentParser(prog="scripts/dev-server", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--azure", action="store_true",
                        help="use Azurite (Azure Blob Storage) instead of moto (S3)")
    return parser.parse_args(argv)


class AlreadyRunning(Exception):
    """
    Another dev-server of this clone holds the lock; ``str()`` is the one line to
    print: its pid and where it serves.
    """


def take_lock(dev_dir: str = DEV_DIR) -> int:
    """
    Lock ``{dev_dir}/dev-server.lock`` (exclusive ``flock``, without waiting) for the
    rest of this process's life; the file descriptor, which must stay open.

    :raises AlreadyRunning: a live dev-server holds it (a file left by a dead run is
        not locked: it is taken, and :func:`record` rewrites it).
    """
    os.makedirs(dev_dir, exist_ok=True)
    path = os.path.join(dev_dir, "dev-server.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with os.fdopen(fd) as f:
            held = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        raise AlreadyRunning(running_message(held)) from None
    return fd


def record(fd: int, info: dict[str, str]) -> None:
    """Replace the lock file's content with ``info``, one ``name=value`` a line."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, "".join(f"{name}={value}\n" for name, value in info.items()).encode(), 0)


def running_message(held: dict[str, str]) -> str:
    """The one line a second start prints, from what the running one recorded."""
    where = held.get("emulator") or "its emulator still starting"
    return (
        f"scripts/dev-server is already running in this clone (pid {held.get('pid', '?')}):"
        f" loghandler on {held.get('loghandler', '?')}, {where}; stop it (Ctrl-C there)"
        " or use scripts/read-objects"
    )


def start_emulator(azure: bool) -> MotoServer | AzuriteServer:
    """Start Azurite or moto with the container or bucket ``loghandler-dev``."""
    if azure:
        emulator: MotoServer | AzuriteServer = AzuriteServer(container="loghandler-dev")
    else:
        emulator = MotoServer(bucket="loghandler-dev", region="us-east-1")
    emulator.start()
    return emulator


def banner(emulator: MotoServer | AzuriteServer, env: dict[str, str]) -> str:
    """Where the emulator and loghandler are, and how to POST and read."""
    base = "http://%s:%s" % (env["ADDR"], env["PORT"])
    if isinstance(emulator, AzuriteServer):
        label = "Azure Blob emulator (Azurite):"
        where = f"{emulator.endpoint_url}, container {emulator.container}"
        checkpoint = os.environ.get("CHECKPOINT_S", "30")
        stored = f"Lines are appended to their blob every {checkpoint} s (CHECKPOINT_S), and at Ctrl-C."
        read = "Read the blobs (in another terminal):"
        listing, name = "blob names, sizes and committed blocks", "NAME"
    else:
        label = "S3 emulator (moto):"
        where = f"{emulator.endpoint_url}, bucket {emulator.bucket}"
        stored = f"An object is completed {env['QUEUE_TIMEOUT_MIN']} min after its first message, and at Ctrl-C."
        read = "Read the completed objects (in another terminal):"
        listing, name = "keys and sizes", "KEY"
    return f"""
{label} {where}
{'loghandler:':<{len(label)}} {base}/log
{stored}

POST a message (timestamp: now, in ms):
  curl -X POST {base}/log -d '{{"text": "hello world", "content_id": 17, "client_id": 3, "timestamp": '$(date +%s%3N)'}}'

{read}
  scripts/read-objects              # {listing}
  scripts/read-objects {name:<13}# its NDJSON lines, decompressed
"""


def emulator_label(emulator: MotoServer | AzuriteServer) -> str:
    """Which emulator it is and where it listens, for the lock file."""
    if isinstance(emulator, AzuriteServer):
        return f"Azurite on {emulator.endpoint_url}"
    return f"moto (S3) on {emulator.endpoint_url}"


def main(argv: list[str], dev_dir: str = DEV_DIR) -> int:
    """
    Run until Ctrl-C twice; 0 when loghandler stopped cleanly.  Exits 1 with one
    line when another dev-server runs in this clone (:func:`take_lock`).
    """
    azure = parse_args(argv).azure
    try:
        lock = take_lock(dev_dir)
    except AlreadyRunning as running:
        sys.exit(str(running))
    addr = os.environ.get("ADDR", "127.0.0.1")
    port = os.environ.get("PORT", "8902")
    held = {"pid": str(os.getpid()), "loghandler": f"http://{addr}:{port}/log"}
    record(lock, held)
    emulator = start_emulator(azure)
    try:
        record(lock, {**held, "emulator": emulator_label(emulator)})
        with open(os.path.join(dev_dir, "emulator.env"), "w") as f:
            f.writelines("%s=%s\n" % item for item in emulator.env().items())
        env = {
            **emulator.env(),
            "ADDR": addr,
            "PORT": port,
            "QUEUE_TIMEOUT_MIN": os.environ.get("QUEUE_TIMEOUT_MIN", "1"),
        }
        print(banner(emulator, env), flush=True)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        daemon = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "loghandler"], env={**os.environ, **env}
        )
        try:
            code = daemon.wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to twistd too: it is storing what it holds.
            code = daemon.wait()
        print(
            f"\nloghandler stopped (exit {code}). The emulator still serves the objects:"
            "\n  scripts/read-objects\nPress Ctrl-C to stop the emulator.",
            flush=True,
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        return 0 if code in (0, -signal.SIGINT, -signal.SIGTERM) else 1
    finally:
        if isinstance(emulator, AzuriteServer):
            emulator.close()  # stops it and removes its temporary data folder
        else:
            emulator.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
