"""
aiohttp: one route doing the JSON echo, run with ``web.run_app`` and its
defaults (the access log is off unless logging is configured).

Usage: ``python aiohttp_app.py --port N``
"""

from __future__ import annotations

import sys

from _echo import answer, port_from_argv
from aiohttp import web


async def api(request: web.Request) -> web.Response:
    status, body = answer(await request.read())
    return web.Response(body=body, status=status, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/api", api)
    web.run_app(app, host="127.0.0.1", port=port_from_argv(sys.argv), print=None)


if __name__ == "__main__":
    main()
