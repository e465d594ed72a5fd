"""
The twistd plugin's options and service maker.

Every setting is a command-line option (``--max-body-bytes 1000``); options
that take lists (``--listen``) may be repeated.  Settings are loaded and
validated in `Options.postOptions`, so a bad value stops ``twistd`` with a
message naming the key and the source before anything starts.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from twisted.application.service import IService
from twisted.python import usage

from twistauth.settings import (
    BOOL,
    ENV_PREFIX,
    Kind,
    Settings,
    SettingsError,
    command_line_values,
)


class Options(usage.Options):
    """
    ``twistd twistauth`` options.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the twistauth authentication and session server.  Settings come from, "
        "in rising precedence: defaults, the --config TOML file, TWISTAUTH_<KEY> "
        "environment variables, and these options."
    )
    optParameters = [
        ["config", "c", None, f"A TOML settings file (or set {ENV_PREFIX}CONFIG)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, field in Settings.keys().items():
            self[name] = [] if field.metadata["kind"].repeatable else None

    def postOptions(self) -> None:
        config = self["config"] or os.environ.get(ENV_PREFIX + "CONFIG")
        try:
            self["settings"] = Settings.load(
                config_path=config,
                environ=os.environ,
                command_line=command_line_values(self),
            )
        except SettingsError as e:
            # Exit non-zero ourselves: twistd before Twisted 26 (the one
            # PyPy 3.9 gets) exits 0 after printing a UsageError.
            sys.stderr.write(f"twistauth: {e}\n")
            raise SystemExit(1) from None


def _add_option(name: str, kind: Kind, doc: str) -> None:
    """
    One command-line option per setting: a value option, a repeatable one
    for lists, or a ``--name`` / ``--no-name`` flag pair for booleans.
    """
    if kind is BOOL:

        def switch_on(self: Options) -> None:
            self[name] = "true"

        def switch_off(self: Options) -> None:
            self[name] = "false"

        switch_on.__doc__ = doc
        switch_off.__doc__ = f"The opposite of --{name.replace('_', '-')}."
        setattr(Options, "opt_" + name, switch_on)
        setattr(Options, "opt_no_" + name, switch_off)
        return
    if kind.repeatable:

        def option(self: Options, value: str) -> None:
            self[name].append(value)

        option.__doc__ = doc + " (repeatable)"
    else:

        def option(self: Options, value: str) -> None:
            self[name] = value

        option.__doc__ = doc
    setattr(Options, "opt_" + name, option)


for _name, _field in Settings.keys().items():
    _add_option(_name, _field.metadata["kind"], _field.metadata["doc"])


def makeService(options: Any, reactor: Optional[Any] = None) -> IService:
    """
    Build the twistauth service from parsed `Options` (or any mapping with
    a ``"settings"`` key holding a `Settings`).

    :param reactor: the reactor to listen with and take time from; the
        global reactor if ``None``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from twistauth.app import make_app
    from twistauth.service import TwistauthService

    settings: Settings = options["settings"]
    app = make_app(settings, clock=reactor, reactor=reactor)
    return TwistauthService(
        app.site(), settings.listen, reactor, app.background, before_stop=[app.shutdown]
    )


make_service: Callable[..., IService] = makeService
