"""
The benchmark's baseline: the smallest twisted.web server that answers ``POST /log``
with ``{"ok":true}`` (POST form parsing off, no access log).

Usage: ``python bench/baseline_server.py PORT [--workers N]`` (listens on
127.0.0.1:PORT).  With ``--workers 1`` (the default) one process serves.  With
``--workers N`` above 1 the parent opens the listening socket and starts N child
processes (this script again, same interpreter) that adopt it
(``reactor.adoptStreamPort``) and serve; the parent serves nothing, forwards
SIGTERM/SIGINT to them and exits once they have.  That is how loghandler's
``WORKERS=N`` shares one socket, so the benchmark compares like with like.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from typing import Any


def serve(port: int, adopt_fd: int) -> None:
    """Run the reactor with the resource on ``port`` or on the inherited socket ``adopt_fd``."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Ok(Resource):
        """Reads the body and answers 200."""

        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            request.content.read()
            request.setHeader(b"content-type", b"application/json")
            return b'{"ok":true}'

    class QuietSite(Site):
        """No access log, like loghandler's default."""

        def log(self, request: Any) -> None:
            pass

    root = Resource()
    root.putChild(b"log", Ok())
    site = QuietSite(root, parsePOSTFormSubmission=False)
    if adopt_fd >= 0:
        reactor.adoptStreamPort(adopt_fd, socket.AF_INET, site)  # type: ignore[attr-defined]
        os.close(adopt_fd)  # the port holds its own duplicate
    else:
        reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def supervise(port: int, workers: int) -> None:
    """Open the socket, start ``workers`` children on it, forward signals, wait for them."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    fd = listener.fileno()
    children = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(port), "--adopt-fd", str(fd)],
            pass_fds=(fd,),
        )
        for _ in range(workers)
    ]

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--workers", type=int, default=1, help="serving processes (default 1)")
    parser.add_argument("--adopt-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers > 1 and args.adopt_fd < 0:
        supervise(args.port, args.workers)
    else:
        serve(args.port, args.adopt_fd)


if __name__ == "__main__":
    main()
