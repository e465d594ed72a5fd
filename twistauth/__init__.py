"""
twistauth: a Twisted authentication and session server, and a library.

The public names: build an app with `make_app`, register methods with
`method` or a `MethodRegistry`, configure with `Settings`, answer errors
from the `twistauth.errors` tree.

The names are imported on first use: importing Klein installs Twisted's
default reactor, and ``import twistauth`` must not do that before a program
has chosen its reactor.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from twistauth._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from twistauth.app import TwistauthApp, make_app
    from twistauth.methods import Handler, MethodRegistry, method
    from twistauth.settings import Settings, SettingsError

_WHERE = {
    "TwistauthApp": "twistauth.app",
    "make_app": "twistauth.app",
    "Handler": "twistauth.methods",
    "MethodRegistry": "twistauth.methods",
    "method": "twistauth.methods",
    "Settings": "twistauth.settings",
    "SettingsError": "twistauth.settings",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'twistauth' has no attribute {name!r}")


__all__ = [
    "Handler",
    "MethodRegistry",
    "Settings",
    "SettingsError",
    "TwistauthApp",
    "__version__",
    "make_app",
    "method",
]
