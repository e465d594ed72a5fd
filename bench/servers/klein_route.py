"""
Bare Klein: one route doing the JSON echo, served by a plain `Site` (as
``Klein.run`` does, without its logging to stdout).

``--tuned`` serves it with ``Site(root, parsePOSTFormSubmission=False)``.

Usage: ``python klein_route.py --port N [--tuned]``
"""

from __future__ import annotations

import sys
from typing import Any

from _echo import answer, port_from_argv
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

app = Klein()


@app.route("/api", methods=["POST"])
def api(request: Any) -> bytes:
    status, body = answer(request.content.read())
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return body


def main() -> None:
    if "--tuned" in sys.argv:
        site = Site(app.resource(), parsePOSTFormSubmission=False)
    else:
        site = Site(app.resource())
    reactor.listenTCP(port_from_argv(sys.argv), site, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()


if __name__ == "__main__":
    main()
