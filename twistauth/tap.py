"""
The twistd plugin's options and service maker.

Every setting is a command-line option (``--max-body-bytes 1000``); options
that take lists (``--listen``) may be repeated.  Settings are loaded and
validated in `Options.postOptions`, so a bad value stops ``twistd`` with a
message naming the key and the source before anything starts.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import partial
from typing import Any, List, Optional, Sequence

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
        [
            "worker-fds",
            None,
            None,
            "Internal: set by the parent of --processes N on its workers (the "
            "inherited listening sockets, as FD:FAMILY,...).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.argv: List[str] = []
        for name, field in Settings.keys().items():
            self[name] = [] if field.metadata["kind"].repeatable else None

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """
        Parse, remembering the arguments: worker processes get the same.
        """
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        config = self["config"] or os.environ.get(ENV_PREFIX + "CONFIG")
        if config is not None:
            # Absolute: twistd may change directory (--rundir), and a reload
            # or a worker reads the file again.
            config = os.path.abspath(config)
        self["config_path"] = config
        # Loads the settings again from the same sources (SIGHUP reload).
        self["load_settings"] = partial(
            Settings.load,
            config_path=config,
            environ=os.environ,
            command_line=command_line_values(self),
        )
        try:
            self["settings"] = self["load_settings"]()
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

    One process serves the ``listen`` endpoints itself.  With ``processes``
    above 1 this process becomes the parent of that many workers (see
    `twistauth.workers`); a worker (``--worker-fds``) serves the sockets it
    inherited.  Either way SIGTERM stops gracefully and SIGHUP reloads.

    :param reactor: the reactor to listen with and take time from; the
        global reactor if ``None``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    settings: Settings = options["settings"]
    worker_fds = options.get("worker-fds")
    if settings.processes > 1 and not worker_fds:
        return _make_parent(options, settings, reactor)
    return _make_server(options, settings, reactor, worker_fds)


def _reloader(options: Any, settings: Settings) -> Any:
    from twistauth.workers import Reloader

    load = options.get("load_settings")
    if load is None:  # a plain mapping: nothing to reload from
        def load() -> Settings:
            return settings

    return Reloader(current=settings, load=load)


def _make_server(
    options: Any, settings: Settings, reactor: Any, worker_fds: Optional[str]
) -> IService:
    """
    A process that serves: alone, or as a worker on inherited sockets.
    """
    from twisted.application.internet import StreamServerEndpointService

    from twistauth.app import make_app
    from twistauth.service import TwistauthService
    from twistauth.workers import (
        AdoptedPorts,
        GracefulStop,
        ParentWatch,
        SignalHandlers,
        parse_worker_fds,
        session_key_appliers,
        stop_reactor,
    )

    inherited = None
    if worker_fds:
        try:
            inherited = parse_worker_fds(worker_fds, settings.listen)
        except ValueError as e:
            sys.stderr.write(f"twistauth: {e}\n")
            raise SystemExit(1) from None
    app = make_app(settings, clock=reactor, reactor=reactor)
    site = app.site()
    graceful = GracefulStop(site=site, clock=reactor, grace=settings.shutdown_grace)
    service = TwistauthService(
        site,
        settings.listen if inherited is None else (),
        reactor,
        app.background,
        before_stop=[app.shutdown, graceful],
    )
    if inherited is None:
        graceful.listeners.extend(
            child for child in service if isinstance(child, StreamServerEndpointService)
        )
    else:
        ports = AdoptedPorts(reactor=reactor, factory=site, sockets=inherited)
        ports.setServiceParent(service)
        graceful.listeners.append(ports)
        ParentWatch(clock=reactor, on_orphaned=partial(stop_reactor, reactor)).setServiceParent(
            service
        )
    reloader = _reloader(options, settings)
    reloader.on("session_keys", session_key_appliers([app.api.sessions, app.api.header_sessions]))
    SignalHandlers(
        reactor=reactor,
        on_hangup=reloader.reload,
        role="server" if inherited is None else "worker",
    ).setServiceParent(service)
    service.reloader = reloader  # type: ignore[attr-defined]
    service.app = app  # type: ignore[attr-defined]
    return service


def _make_parent(options: Any, settings: Settings, reactor: Any) -> IService:
    """
    The parent of ``settings.processes`` workers: it serves nothing.
    """
    from twisted.application.service import MultiService

    from twistauth.workers import (
        STOP_MARGIN,
        RestartPolicy,
        SignalHandlers,
        WorkerPool,
        exit_status_at_exit,
        reactor_name,
        stop_reactor,
        worker_command,
        worker_environ,
    )

    argv = getattr(options, "argv", None)
    if not isinstance(argv, list):
        raise ValueError(
            "processes > 1 starts workers with the same twistd command line: pass "
            "twistauth.tap.Options parsed from it (Options().parseOptions(argv))"
        )

    def give_up() -> None:
        exit_status_at_exit(1)
        stop_reactor(reactor)

    pool = WorkerPool(
        reactor=reactor,
        count=settings.processes,
        listen=settings.listen,
        command=partial(
            worker_command,
            executable=sys.executable,
            plugin_argv=argv,
            reactor=reactor_name(reactor),
            config_path=options.get("config_path"),
        ),
        environ=worker_environ(os.environ, platform.python_implementation()),
        policy=RestartPolicy(
            clock=reactor,
            limit=settings.worker_restart_limit,
            window=settings.worker_restart_window,
        ),
        stop_timeout=settings.shutdown_grace + STOP_MARGIN,
        on_give_up=give_up,
    )
    reloader = _reloader(options, settings)
    # Applied by the workers, which reload when the parent forwards SIGHUP.
    reloader.on("session_keys", lambda keys: None)

    def reload() -> None:
        if reloader.reload().ok:
            pool.reload_workers()

    top = MultiService()
    pool.setServiceParent(top)
    SignalHandlers(reactor=reactor, on_hangup=reload, role="parent").setServiceParent(top)
    top.pool = pool  # type: ignore[attr-defined]
    top.reloader = reloader  # type: ignore[attr-defined]
    return top


