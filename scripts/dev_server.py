"""
loghandler against a local S3 emulator, for trying it by hand (``scripts/dev-server``).

Starts moto's S3 server on a free port with the bucket ``loghandler-dev``, writes its
settings to ``.dev/emulator.env`` (for ``scripts/read-objects``), runs
``twistd -n loghandler`` against it and prints how to POST and how to read the
objects.  An object is completed ``QUEUE_TIMEOUT_MIN`` after its first message (1
minute here unless set) and when loghandler stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.integration.moto import MotoServer  # noqa: E402


def main() -> int:
    """Run until Ctrl-C twice; 0 when loghandler stopped cleanly."""
    moto = MotoServer(bucket="loghandler-dev", region="us-east-1")
    moto.start()
    try:
        os.makedirs(os.path.join(ROOT, ".dev"), exist_ok=True)
        with open(os.path.join(ROOT, ".dev", "emulator.env"), "w") as f:
            f.writelines("%s=%s\n" % item for item in moto.env().items())
        env = {
            **moto.env(),
            "ADDR": os.environ.get("ADDR", "127.0.0.1"),
            "PORT": os.environ.get("PORT", "8902"),
            "QUEUE_TIMEOUT_MIN": os.environ.get("QUEUE_TIMEOUT_MIN", "1"),
        }
        base = "http://%s:%s" % (env["ADDR"], env["PORT"])
        print(
            f"""
S3 emulator (moto): {moto.endpoint_url}, bucket {moto.bucket}
loghandler:         {base}/log
An object is completed {env['QUEUE_TIMEOUT_MIN']} min after its first message, and at Ctrl-C.

POST a message (timestamp: now, in ms):
  curl -X POST {base}/log -d '{{"text": "hello world", "content_id": 17, "client_id": 3, "timestamp": '$(date +%s%3N)'}}'

Read the completed objects (in another terminal):
  scripts/read-objects              # keys and sizes
  scripts/read-objects KEY          # its NDJSON lines, decompressed
""",
            flush=True,
        )
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        daemon = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "loghandler"], env={**os.environ, **env}
        )
        try:
            code = daemon.wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to twistd too: it is completing every object.
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
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
