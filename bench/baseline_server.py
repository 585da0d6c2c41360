"""
The benchmark's baseline: the smallest twisted.web server that answers ``POST /log``
with ``{"ok":true}`` (POST form parsing off, no access log), on the port given as the
first argument.  loghandler's figures are reported as ratios against it.
"""

import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Ok(Resource):
    """Reads the body and answers 200."""

    isLeaf = True

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok":true}'


class QuietSite(Site):
    """No access log, like loghandler's default."""

    def log(self, request):  # type: ignore[no-untyped-def]
        pass


root = Resource()
root.putChild(b"log", Ok())
reactor.listenTCP(int(sys.argv[1]), QuietSite(root, parsePOSTFormSubmission=False), interface="127.0.0.1")
reactor.run()
