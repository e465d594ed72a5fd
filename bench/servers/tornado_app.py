"""
Tornado: one ``RequestHandler`` doing the JSON echo, on the asyncio loop
as Tornado 6 documents (no logging configured, so no access log).

Usage: ``python tornado_app.py --port N``
"""

from __future__ import annotations

import asyncio
import sys

from _echo import answer, port_from_argv
from tornado.web import Application, RequestHandler


class Api(RequestHandler):
    def post(self) -> None:
        status, body = answer(self.request.body)
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.write(body)


async def serve(port: int) -> None:
    Application([(r"/api", Api)]).listen(port, address="127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(serve(port_from_argv(sys.argv)))
    except KeyboardInterrupt:
        pass
