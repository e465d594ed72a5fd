"""
The twistd plugin: ``twistd -n twistauth``.

It names `twistauth.tap` as a string, so scanning plugins imports nothing
heavy and installs no reactor (``twistd --reactor=asyncio`` keeps working).
"""

from twisted.application.service import ServiceMaker

twistauth = ServiceMaker(
    "twistauth",
    "twistauth.tap",
    "Authentication and session server: OIDC login, JSON methods, sessions, instant logout.",
    "twistauth",
)
