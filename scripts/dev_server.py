"""
loghandler against a local S3 emulator, for trying it by hand (``scripts/dev-server``).

Starts moto's S3 server on a free port with the bucket ``loghandler-dev``, runs
``twistd -n loghandler`` against it and prints how to POST and where to read the
objects.  Objects are completed after ``QUEUE_TIMEOUT_MIN`` (1 minute here unless set)
or when loghandler stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.integration.moto import MotoServer  # noqa: E402


def main() -> int:
    """Run until Ctrl-C twice; exit status of twistd."""
    moto = MotoServer(bucket="loghandler-dev", region="us-east-1")
    moto.start()
    try:
        env = {
            **moto.env(),
            "ADDR": os.environ.get("ADDR", "127.0.0.1"),
            "PORT": os.environ.get("PORT", "8902"),
            "QUEUE_TIMEOUT_MIN": os.environ.get("QUEUE_TIMEOUT_MIN", "1"),
        }
        base = "http://%s:%s" % (env["ADDR"], env["PORT"])
        bucket_url = "%s/%s" % (moto.endpoint_url, moto.bucket)
        now = int(time.time() * 1000)
        date = time.strftime("%Y-%m-%d", time.gmtime(now // 1000))
        print(
            f"""
S3 emulator (moto): {moto.endpoint_url}, bucket {moto.bucket}
loghandler:         {base}/log, objects completed every {env['QUEUE_TIMEOUT_MIN']} min
                    and on Ctrl-C

POST a message:
  curl -X POST {base}/log -d '{{"text": "hello world", "content_id": 17, "client_id": 3, "timestamp": '$(date +%s%3N)'}}'

Read the objects (moto serves them without credentials):
  curl -s '{bucket_url}?list-type=2'
  curl -s {bucket_url}/chat/{date}/content_logs_{date}_3 | zcat
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
            f"\nloghandler stopped (exit {code}). The emulator still serves the objects:\n"
            f"  curl -s '{bucket_url}?list-type=2'\n"
            "Press Ctrl-C to stop it.",
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
