"""
Bare twisted.web: one leaf `Resource` doing the JSON echo.

``--tuned`` serves it with ``Site(root, parsePOSTFormSubmission=False)``:
the floor twistauth is measured against.  Without it, the default `Site`
parses the Content-Type of every POST through the ``email`` module.

``--no-access-log`` replaces ``Site.log`` with a no-op.  Without it, the
site still formats an access-log line per request and hands it to the
legacy ``twisted.python.log`` (buffered, since nothing starts logging).

``--access-log-file PATH`` writes the access log straight to a file
(``Site(..., logPath=PATH)``, line-buffered), bypassing the logging system;
with ``--buffered`` too, the file is block-buffered (64 KiB; a real server
would flush it on a timer).

Usage: ``python twisted_web.py --port N [--tuned] [--no-access-log | --access-log-file PATH]``
"""

from __future__ import annotations

import sys
from typing import Any, Dict

from _echo import answer, port_from_argv
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        status, body = answer(request.content.read())
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body


class BufferedLogSite(Site):
    def _openLogFile(self, path: Any) -> Any:
        return open(path, "a", 64 * 1024, newline="\n")  # noqa: SIM115


def main() -> None:
    kwargs: Dict[str, Any] = {}
    if "--tuned" in sys.argv:
        kwargs["parsePOSTFormSubmission"] = False
    if "--access-log-file" in sys.argv:
        kwargs["logPath"] = sys.argv[sys.argv.index("--access-log-file") + 1]
    factory = BufferedLogSite if "--buffered" in sys.argv else Site
    site = factory(Echo(), **kwargs)
    if "--no-access-log" in sys.argv:
        site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port_from_argv(sys.argv), site, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()


if __name__ == "__main__":
    main()
