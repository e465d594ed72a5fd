"""
The twistd plugin's options and service maker.

Every setting is a command-line option (``--max-body-bytes 1000``); options
that take lists (``--listen``) may be repeated.  Settings are loaded and
validated in `Options.postOptions`, so a bad value stops ``twistd`` with a
message naming the key and the source before anything starts.

`makeService` also sets up operations around the app: the logging
pipeline (``log_observers``, ``log_level``, alert mail) as the first service
of the tree and twistd's one log observer; the private health and metrics
endpoint (``metrics_listen``); the reload of ``log_level`` on SIGHUP; and,
with several processes, the metrics shared between them.  A log file that
cannot be opened stops ``twistd`` before anything starts, naming the path.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.application.service import IService
from twisted.internet.defer import succeed
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


def _twistd(options: Any) -> Any:
    """
    twistd's own options (``-n``, ``--logfile``, ``--logger``), when these
    plugin options were parsed by twistd; else ``None``.
    """
    parent = getattr(options, "parent", None)
    return parent if parent is not None and hasattr(parent, "get") else None


def log_observers(options: Any, settings: Settings) -> Tuple[str, ...]:
    """
    The observers to log to: ``log_observers`` when it was set; left at its
    default under twistd, where twistd would have logged: standard output
    with ``-n`` (or ``--logfile -``), else ``--logfile`` (default
    ``twistd.log``), as a rotating file.
    """
    if settings.origins.get("log_observers", "default") != "default":
        return settings.log_observers
    twistd = _twistd(options)
    if twistd is None:
        return settings.log_observers
    logfile = twistd.get("logfile")
    if logfile == "-" or (twistd.get("nodaemon") and not logfile):
        return ("text",)
    path = os.path.abspath(logfile or "twistd.log")
    return ("file:" + path.replace("\\", "\\\\").replace(":", "\\:"),)


def _build_logging(options: Any, settings: Settings, reactor: Any) -> Any:
    """
    The logging pipeline, or exit 1 naming what is wrong (a log file that
    cannot be opened, an alert setting missing).
    """
    from twistauth.observe import LogSetupError, logging_from_settings

    observers = log_observers(options, settings)
    try:
        return logging_from_settings(
            attr.evolve(settings, log_observers=observers), reactor=reactor
        )
    except LogSetupError as e:
        sys.stderr.write(f"twistauth: {e}\n")
        raise SystemExit(1) from None


def _logging_service(options: Any, settings: Settings, setup: Any) -> Dict[str, Any]:
    """
    The `OperatedService.set_logging` arguments for a logging setup.
    """
    twistd = _twistd(options)
    return {
        "logging": setup.service(),
        "offer_to_twistd": not (twistd is not None and twistd.get("logger")),
        "attach_elsewhere": settings.origins.get("log_observers", "default") != "default",
    }


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
    from twisted.application import strports
    from twisted.application.internet import StreamServerEndpointService

    from twistauth.app import make_app
    from twistauth.metrics import Metrics, SharedMetricsService
    from twistauth.service import TwistauthService
    from twistauth.workers import (
        METRICS_DIR_ENV,
        AdoptedPorts,
        GracefulStop,
        ParentWatch,
        SignalHandlers,
        parse_worker_fds,
        relay_level,
        session_key_appliers,
        set_relay_level,
        stop_reactor,
    )

    inherited = None
    health_sockets: List[Any] = []
    private = (settings.metrics_listen,) if settings.metrics_listen else ()
    if worker_fds:
        try:
            inherited = parse_worker_fds(worker_fds, settings.listen + private)
        except ValueError as e:
            sys.stderr.write(f"twistauth: {e}\n")
            raise SystemExit(1) from None
        inherited, health_sockets = inherited[: len(settings.listen)], inherited[len(settings.listen) :]
    metrics: Any = None
    shared_dir = os.environ.get(METRICS_DIR_ENV) if inherited is not None else None
    if settings.metrics and shared_dir:
        # A worker: its counts go to the parent's directory, and /metrics
        # answers with every process's.
        metrics = Metrics(multiprocess_dir=shared_dir)
    logging: Dict[str, Any] = {}
    setup = None
    if inherited is None:
        setup = _build_logging(options, settings, reactor)
        logging = _logging_service(options, settings, setup)
    else:
        # The parent logs for its workers: nothing below its observers'
        # levels crosses the pipe, and no log file is opened here.
        set_relay_level(relay_level(settings))
    app = make_app(settings, clock=reactor, reactor=reactor, metrics_instance=metrics)
    if setup is not None:
        app.metrics.watch_logging(setup.observer)
        if setup.alerts is not None:
            app.metrics.watch_alerts(setup.alerts)
    background = list(app.background)
    if metrics is not None:
        background.append(SharedMetricsService(metrics, clock=reactor))
    site = app.site()
    graceful = GracefulStop(site=site, clock=reactor, grace=settings.shutdown_grace)
    health = app.health

    def draining() -> Any:
        # /readyz answers 503 "draining" while running requests finish.
        if health is not None:
            health.set_draining(True)
        return succeed(None)

    service = TwistauthService(
        site,
        settings.listen if inherited is None else (),
        reactor,
        background,
        before_stop=[draining, app.shutdown, graceful],
        logging=logging.get("logging"),
        offer_to_twistd=logging.get("offer_to_twistd", True),
        attach_logging_elsewhere=logging.get("attach_elsewhere", False),
    )
    if inherited is None:
        graceful.listeners.extend(
            child for child in service if isinstance(child, StreamServerEndpointService)
        )
        if settings.metrics_listen:
            strports.service(
                settings.metrics_listen, app.health_site(), reactor=reactor
            ).setServiceParent(service)
    else:
        ports = AdoptedPorts(reactor=reactor, factory=site, sockets=inherited)
        ports.setServiceParent(service)
        graceful.listeners.append(ports)
        if health_sockets:
            private_ports = AdoptedPorts(
                reactor=reactor, factory=app.health_site(), sockets=health_sockets
            )
            private_ports.name = "twistauth-adopted-metrics-port"
            private_ports.setServiceParent(service)
        ParentWatch(clock=reactor, on_orphaned=partial(stop_reactor, reactor)).setServiceParent(
            service
        )
    reloader = _reloader(options, settings)
    reloader.on("session_keys", session_key_appliers([app.api.sessions, app.api.header_sessions]))
    if setup is not None:
        reloader.on("log_level", setup.observer.set_default_level)
    else:

        def relay_from(level: str) -> None:
            set_relay_level(relay_level(attr.evolve(settings, log_level=level)))

        reloader.on("log_level", relay_from)
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
    from twistauth.metrics import Metrics, SharedMetricsService
    from twistauth.service import OperatedService
    from twistauth.workers import (
        METRICS_DIR_ENV,
        STOP_MARGIN,
        MetricsDirectory,
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

    top = OperatedService()
    setup = _build_logging(options, settings, reactor)
    top.set_logging(**_logging_service(options, settings, setup))
    environ = worker_environ(os.environ, platform.python_implementation())
    directory = None
    if settings.metrics:
        # Every process writes its counts here; any worker answers /metrics
        # with all of them.  The parent's own: log events and alert mails.
        directory = MetricsDirectory(os.environ)
        directory.setServiceParent(top)
        environ[METRICS_DIR_ENV] = directory.path
        own = Metrics(multiprocess_dir=directory.path)
        own.watch_logging(setup.observer)
        if setup.alerts is not None:
            own.watch_alerts(setup.alerts)
        SharedMetricsService(own, clock=reactor).setServiceParent(top)
    pool = WorkerPool(
        reactor=reactor,
        count=settings.processes,
        listen=settings.listen + ((settings.metrics_listen,) if settings.metrics_listen else ()),
        command=partial(
            worker_command,
            executable=sys.executable,
            plugin_argv=argv,
            reactor=reactor_name(reactor),
            config_path=options.get("config_path"),
        ),
        environ=environ,
        policy=RestartPolicy(
            clock=reactor,
            limit=settings.worker_restart_limit,
            window=settings.worker_restart_window,
        ),
        stop_timeout=settings.shutdown_grace + STOP_MARGIN,
        on_give_up=give_up,
        on_ended=directory.forget if directory is not None else None,
    )
    reloader = _reloader(options, settings)
    # Applied by the workers, which reload when the parent forwards SIGHUP.
    reloader.on("session_keys", lambda keys: None)
    reloader.on("log_level", setup.observer.set_default_level)

    def reload() -> None:
        if reloader.reload().ok:
            pool.reload_workers()

    pool.setServiceParent(top)
    SignalHandlers(reactor=reactor, on_hangup=reload, role="parent").setServiceParent(top)
    top.pool = pool  # type: ignore[attr-defined]
    top.reloader = reloader  # type: ignore[attr-defined]
    return top


