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
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def main(argv: list[str]) -> int:
    """Run until Ctrl-C twice; 0 when loghandler stopped cleanly."""
    emulator = start_emulator(parse_args(argv).azure)
    try:
        os.makedirs(os.path.join(ROOT, ".dev"), exist_ok=True)
        with open(os.path.join(ROOT, ".dev", "emulator.env"), "w") as f:
            f.writelines("%s=%s\n" % item for item in emulator.env().items())
        env = {
            **emulator.env(),
            "ADDR": os.environ.get("ADDR", "127.0.0.1"),
            "PORT": os.environ.get("PORT", "8902"),
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
