"""
Settings: one frozen object, loaded from five sources.

In rising precedence: built-in defaults, a TOML file (``--config PATH``),
environment variables (``TWISTAUTH_<KEY>``), command-line options, Python
keywords.  Every key is declared once, here, with its kind (how a value is
checked and how a string is parsed) and its documentation; the command-line
options, the configuration reference in ``docs/`` and the validation all come
from that declaration.

A bad value never starts anything: `Settings.load` raises `SettingsError`,
whose message names the key, the source it came from and what is allowed.
"""

from __future__ import annotations

import base64
import difflib
import importlib
import sys
from functools import partial
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import attr

from twistauth.redisconn import is_redis_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

ENV_PREFIX = "TWISTAUTH_"


class SettingsError(ValueError):
    """
    A setting is unknown, of the wrong type, or out of range.

    :ivar key: the setting's name (or ``None`` for a whole-source problem).
    :ivar source: where the value came from, e.g. ``"config file a.toml"``.
    """

    def __init__(self, key: Optional[str], source: str, message: str):
        self.key = key
        self.source = source
        where = f"setting {key!r} from {source}" if key else source
        super().__init__(f"{where}: {message}")


# ---------------------------------------------------------------------------
# Kinds: how a value is checked, parsed from a string, and described.


@attr.s(auto_attribs=True, frozen=True)
class Kind:
    """
    The type of a setting: ``check`` takes a typed value (TOML, keywords),
    ``parse`` takes a string (environment, command line).  Both raise
    `ValueError` with a message that says what is allowed.
    """

    allowed: str
    check: Callable[[Any], Any]
    parse: Callable[[str], Any]
    repeatable: bool = False
    table: bool = False
    """Written as TOML tables (``[providers.NAME]``) rather than a value."""
    secret: bool = False
    """Values are keys: never shown (``repr``, logs)."""


def _int_kind(low: int, high: int) -> Kind:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer from {low} to {high}, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value}")
        return value

    def parse(text: str) -> int:
        try:
            return check(int(text.strip()))
        except ValueError:
            raise ValueError(f"expected an integer from {low} to {high}, got {text!r}") from None

    return Kind(f"an integer from {low} to {high}", check, parse)


def _float_kind(low: float, high: float) -> Kind:
    allowed = f"a number of seconds from {low:g} to {high:g}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected {allowed}, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"expected {allowed}, got {value}")
        return float(value)

    def parse(text: str) -> float:
        try:
            number = float(text.strip())
        except ValueError:
            raise ValueError(f"expected {allowed}, got {text!r}") from None
        return check(number)

    return Kind(allowed, check, parse)


def _check_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _path_kind() -> Kind:
    def check(value: Any) -> str:
        value = _check_str(value)
        if (
            not value.startswith("/")
            or value.endswith("/")
            or "?" in value
            or "#" in value
            or "//" in value
            or not all("!" <= c <= "~" for c in value)
        ):
            raise ValueError(
                f"expected an absolute URL path such as '/api' (printable ASCII, no "
                f"empty segment, trailing '/', query or fragment), got {value!r}"
            )
        return value

    return Kind("an absolute URL path such as '/api'", check, check)


def _list_kind(item: Callable[[str], str], allowed: str) -> Kind:
    def check(value: Any) -> Tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of {allowed}, got {value!r}")
        return tuple(item(_check_str(v)) for v in value)

    def parse(text: str) -> Tuple[str, ...]:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    return Kind(f"a list of {allowed}", check, parse, repeatable=True)


def _endpoint(text: str) -> str:
    """
    Check a server endpoint string by parsing it (nothing listens).
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:
        raise ValueError(
            f"expected a Twisted server endpoint such as 'tcp:8080' or "
            f"'tcp:8080:interface=127.0.0.1', got {text!r} ({e})"
        ) from None
    return text


def _module_name(text: str) -> str:
    if not text or not all(part.isidentifier() for part in text.split(".")):
        raise ValueError(f"expected a dotted module name, got {text!r}")
    return text


def _callable_kind() -> Kind:
    """
    A callable, given as ``"package.module:attribute"`` in text sources or as
    the object itself in Python keywords.
    """
    allowed = "a callable given as 'package.module:name'"

    def parse(text: str) -> Callable[..., Any]:
        module_name, sep, attribute = text.partition(":")
        if not sep or not attribute:
            raise ValueError(f"expected {allowed}, got {text!r}")
        try:
            target: Any = importlib.import_module(_module_name(module_name))
            for part in attribute.split("."):
                target = getattr(target, part)
        except Exception as e:  # any import failure is a bad setting
            raise ValueError(f"cannot import {text!r}: {e}") from None
        if not callable(target):
            raise ValueError(f"{text!r} is not callable")
        return target

    def check(value: Any) -> Optional[Callable[..., Any]]:
        if value is None:
            return None
        if isinstance(value, str):
            return parse(value)
        if not callable(value):
            raise ValueError(f"expected {allowed}, got {value!r}")
        return value

    return Kind(allowed, check, parse)


def _secret_kind(length: int) -> Kind:
    """
    A key of exactly ``length`` random bytes, written as URL-safe base64, or
    ``"file:PATH"`` naming a file that holds it (keeps it off the command line).
    """
    allowed = (
        f"{length} random bytes in URL-safe base64 (make one with: python3 -c "
        f"'import secrets; print(secrets.token_urlsafe({length}))'), or 'file:PATH'"
    )

    def parse(text: str) -> bytes:
        text = text.strip()
        if text.startswith("file:"):
            path = text[len("file:") :]
            try:
                with open(path, encoding="ascii") as f:
                    text = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read the key file {path!r}: {e}") from None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            raise ValueError(f"expected {allowed}; the value is not base64") from None
        if len(raw) != length:
            raise ValueError(f"expected {allowed}; it decodes to {len(raw)} bytes")
        return raw

    def check(value: Any) -> Optional[bytes]:
        if value is None:
            return None
        if isinstance(value, bytes):
            if len(value) != length:
                raise ValueError(f"expected {length} bytes, got {len(value)}")
            return value
        return parse(_check_str(value))

    return Kind(allowed, check, parse, secret=True)


def _bool_kind() -> Kind:
    words = {
        "true": True,
        "yes": True,
        "on": True,
        "1": True,
        "false": False,
        "no": False,
        "off": False,
        "0": False,
    }

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    def parse(text: str) -> bool:
        try:
            return words[text.strip().lower()]
        except KeyError:
            raise ValueError(
                f"expected true or false (or yes/no, on/off, 1/0), got {text!r}"
            ) from None

    return Kind("true or false", check, parse)


def _choice_or_url_kind(choices: Sequence[str], schemes: Sequence[str]) -> Kind:
    allowed = (
        " or ".join(repr(c) for c in choices)
        + " or a URL starting "
        + " or ".join(repr(s + "://") for s in schemes)
    )

    def check(value: Any) -> str:
        value = _check_str(value)
        if value in choices:
            return value
        if any(value.startswith(s + "://") for s in schemes):
            return _redis_url(value)
        raise ValueError(f"expected {allowed}, got {value!r}")

    return Kind(allowed, check, check)


def _redis_url(text: str) -> str:
    from twistauth.redisconn import parse_url

    parse_url(text)  # raises RedisURLError, a ValueError naming what is wrong
    return text


def _optional_redis_url_kind() -> Kind:
    def check(value: Any) -> Optional[str]:
        if value is None:
            return None
        return _redis_url(_check_str(value))

    return Kind(
        "a Redis URL ('redis://[:password@]host:port/db' or "
        "'redis-sentinel://host:port,.../service')",
        check,
        check,
    )


def _providers_kind() -> Kind:
    """
    OpenID providers: a table of tables, name to settings (see
    `twistauth.identity.config.ProviderConfig`); JSON in text sources.
    """
    allowed = (
        "a table of providers, e.g. [providers.keycloak] with issuer, client_id, "
        "client_secret and redirect_uri (JSON in environment variables and options)"
    )

    def check(value: Any) -> Tuple[Any, ...]:
        from twistauth.identity.config import ProviderConfig

        if isinstance(value, tuple):
            if all(isinstance(v, ProviderConfig) for v in value):
                return value
        if not isinstance(value, dict):
            raise ValueError(f"expected {allowed}, got {type(value).__name__}")
        configs = []
        for name, table in value.items():
            if not isinstance(table, dict):
                raise ValueError(f"provider {name!r} must be a table of settings")
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"provider name {name!r}: use letters, digits, '_' and '-'")
            configs.append(ProviderConfig.from_mapping(name, table))
        return tuple(configs)

    def parse(text: str) -> Tuple[Any, ...]:
        import json

        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"expected {allowed}; the value is not JSON: {e}") from None
        return check(value)

    return Kind(allowed, check, parse, table=True)


def _log_path(text: str) -> str:
    """
    ``"-"``, or a file path that can be appended to (checked now, so a bad
    path stops the server at start-up, naming the path).
    """
    if text == "-":
        return text
    import os

    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise ValueError(f"{text!r} is a directory, not a log file")
    if os.path.exists(path):
        writable = os.access(path, os.W_OK)
    else:
        writable = os.access(os.path.dirname(path), os.W_OK | os.X_OK)
    if not writable:
        raise ValueError(f"cannot write the log file {path!r}")
    return text



def _secret_text_kind() -> Kind:
    """
    A secret string (a password), or ``"file:PATH"`` naming a file that
    holds it (its first line; keeps it off the command line and out of
    ``ps``).  Never shown (``repr``, `Settings.describe`, logs).
    """
    allowed = "a password, or 'file:PATH' naming a file that holds it"

    def parse(text: str) -> str:
        if text.startswith("file:"):
            path = text[len("file:") :]
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read the password file {path!r}: {e}") from None
        if not text:
            raise ValueError(f"expected {allowed}; it is empty")
        return text

    def check(value: Any) -> Optional[str]:
        if value is None:
            return None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"expected {allowed}; the bytes are not UTF-8") from None
            if not value:
                raise ValueError(f"expected {allowed}; it is empty")
            return value
        return parse(_check_str(value))

    return Kind(allowed, check, parse, secret=True)


def _optional_text_kind(allowed: str, item: Callable[[str], str] = str) -> Kind:
    """
    A string checked by ``item``, or unset (``None``; an empty string in
    text sources).
    """

    def check(value: Any) -> Optional[str]:
        if value is None:
            return None
        return item(_check_str(value))

    def parse(text: str) -> Optional[str]:
        return item(text) if text else None

    return Kind(allowed, check, parse)


def _writable_path(path: str) -> None:
    """
    Raise `ValueError` naming ``path`` unless a file there can be appended
    to or created (nothing is created now).
    """
    import os

    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a log file")
    if os.path.exists(path):
        writable = os.access(path, os.W_OK)
    else:
        writable = os.access(os.path.dirname(path), os.W_OK | os.X_OK)
    if not writable:
        raise ValueError(f"cannot write the log file {path!r}")


def _log_observer(text: str) -> str:
    """
    One log observer description (`twistauth.observe.parse_observer_spec`);
    a file's path must be writable (checked now, nothing created).
    """
    from twistauth.observe import parse_observer_spec

    spec = parse_observer_spec(text)
    if spec.kind == "file" and spec.path:
        _writable_path(spec.path)
    return text


def _log_level(text: str) -> str:
    from twistauth.observe import parse_level

    parse_level(text)
    return text.strip().lower()


def _mail_address(text: str) -> str:
    if (
        not text
        or text.count("@") != 1
        or text.startswith("@")
        or text.endswith("@")
        or any(c in text for c in "\r\n,;<> \t\"")
    ):
        raise ValueError(f"expected a plain e-mail address such as 'ops@example.org', got {text!r}")
    return text


def _readable_file(text: str) -> str:
    import os

    if not os.access(text, os.R_OK) or os.path.isdir(text):
        raise ValueError(f"cannot read the file {text!r}")
    return text


def _access_check(name: str) -> Callable[[str], str]:
    """
    A checker from `twistauth.access`, imported when first used.
    """

    def check(text: str) -> str:
        import twistauth.access

        return getattr(twistauth.access, name)(text)

    return check


def _choice(text: str, choices: Sequence[str]) -> str:
    if text not in choices:
        raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {text!r}")
    return text


def _origin(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest or "*" in rest:
        raise ValueError(f"expected an origin such as 'https://app.example', got {text!r}")
    return text


def _cookie_name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "_-" for c in text) or text.startswith("__"):
        raise ValueError(
            f"expected a cookie name of letters, digits, '_' and '-' (the '__Host-' "
            f"prefix is added when secure), got {text!r}"
        )
    return text


def _keys_kind(single: Kind) -> Kind:
    def check(value: Any) -> Tuple[bytes, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of {single.allowed}, got a {type(value).__name__}")
        return tuple(single.check(v) for v in value)

    def parse(text: str) -> Tuple[bytes, ...]:
        return tuple(single.parse(part) for part in text.split(",") if part.strip())

    return Kind(
        f"a list, newest first, of keys: {single.allowed}",
        check,
        parse,
        repeatable=True,
        secret=single.secret,
    )


def _local_path(value: Any) -> str:
    text = _check_str(value)
    if text != "/" and (not text.startswith("/") or text.startswith("//") or "\\" in text):
        raise ValueError(f"expected a path on this server such as '/' or '/home', got {text!r}")
    return text


#: The paths of the health and metrics endpoints on the main site (when
#: ``metrics_listen`` is unset).
HEALTH_PATHS = ("/healthz", "/readyz", "/metrics")

API_PATH_OR_ROOT = Kind("a path on this server such as '/'", _local_path, _local_path)
INT_BYTES = _int_kind(1, 16 * 1024 * 1024)
API_PATH = _path_kind()
ENDPOINTS = _list_kind(_endpoint, "Twisted server endpoint strings")
MODULES = _list_kind(_module_name, "dotted module names")
CALLABLE = _callable_kind()
KEY32 = _secret_kind(32)
BOOL = _bool_kind()
SECONDS = _float_kind(1, 10 * 365 * 86400)


def setting(default: Any, kind: Kind, doc: str, *, example: Optional[str] = None) -> Any:
    """
    Declare a setting: an attrs field carrying its kind and documentation.
    """
    return attr.ib(
        default=default,
        repr=_hidden if kind.secret else True,
        metadata={"kind": kind, "doc": doc, "example": example},
    )


def _hidden(value: Any) -> str:
    return "<hidden>" if value else repr(value)


# ---------------------------------------------------------------------------
# The settings object.


@attr.s(frozen=True, kw_only=True, auto_attribs=True)
class Settings:
    """
    Every setting twistauth reads.  Build it with `Settings.load`; the
    constructor does no validation of its own.
    """

    listen: Tuple[str, ...] = setting(
        ("tcp:8080",),
        ENDPOINTS,
        "Where to listen: Twisted server endpoint strings, repeatable.",
        example="tcp:8080:interface=127.0.0.1",
    )
    api_path: str = setting("/api", API_PATH, "The URL path of the JSON-method endpoint.")
    method_modules: Tuple[str, ...] = setting(
        ("twistauth.demo_methods",),
        MODULES,
        "Packages of method modules: the method 'a.b' is the function 'invoke' "
        "of the module '<package>.a.b'.  The built-in demo package answers "
        "'echo' and 'time.now'.",
        example="myapp.methods",
    )
    max_body_bytes: int = setting(
        64 * 1024,
        INT_BYTES,
        "Largest request body accepted; a larger one is answered 413 before it is read.",
    )
    max_batch_size: int = setting(
        32, _int_kind(1, 1000), "Most calls one batch may hold (more: 413)."
    )
    max_json_depth: int = setting(
        32,
        _int_kind(2, 256),
        "Deepest nesting of arrays and objects a request may have (deeper: 400).",
    )
    request_timeout: float = setting(
        30.0,
        _float_kind(0.1, 3600),
        "Deadline for receiving a request's headers and body (slow clients: 408).",
    )
    idle_timeout: float = setting(
        60.0, _float_kind(0.1, 3600), "Seconds an idle keep-alive connection is kept open."
    )
    access_log: Optional[str] = setting(
        None,
        Kind(
            "a writable file path, '-' for the server's log, or unset (none)",
            lambda v: None if v is None else _log_path(_check_str(v)),
            lambda t: _log_path(t) if t else None,
        ),
        "Write an access log line per request (never query strings or referrers, "
        "which can carry codes and tokens): to a file (cheap: written directly), or "
        "'-' to the server's own log (through twisted.logger: measured at about 40% "
        "of the JSON endpoint's throughput).  Unset: no access log.",
        example="/var/log/twistauth/access.log",
    )
    max_connections_per_ip: int = setting(
        256, _int_kind(1, 1_000_000), "Most open connections from one client address."
    )
    deployment_key: Optional[bytes] = setting(
        None,
        KEY32,
        "The deployment's secret (32 bytes, base64url, or 'file:PATH').  "
        "Unset: a random key per process, which only suits one process.",
        example="file:/etc/twistauth/deployment.key",
    )
    session_cache: str = setting(
        "memory",
        _choice_or_url_kind(("memory", "client"), ("redis", "redis-sentinel")),
        "Where sessions live: 'memory' (one process), 'client' (sealed in the "
        "cookie or header; needs session_keys), or a Redis URL "
        "('redis://[:password@]host:port/db', 'redis-sentinel://host:port,.../service').",
        example="redis://127.0.0.1:6379/0",
    )
    session_cookie_name: str = setting(
        "twistauth_session",
        Kind("a cookie name", lambda v: _cookie_name(_check_str(v)), _cookie_name),
        "The session cookie's name ('__Host-' is prepended when secure; the CSRF "
        "cookie is this name plus '_csrf').",
    )
    session_cookie_secure: bool = setting(
        True,
        BOOL,
        "Send the cookies with Secure and the __Host- prefix.  Switch off only "
        "for development over plain HTTP on a host other than localhost.",
    )
    session_idle_timeout: float = setting(
        1800.0, SECONDS, "A session unused this many seconds ends."
    )
    session_absolute_timeout: float = setting(
        43200.0, SECONDS, "A session ends this many seconds after it began, however used."
    )
    session_permanent_lifetime: float = setting(
        14 * 86400.0,
        SECONDS,
        "Max-Age of a 'remember me' cookie (the server-side timeouts still hold).",
    )
    session_keys: Tuple[bytes, ...] = setting(
        (),
        _keys_kind(KEY32),
        "Keys that seal client-side sessions, newest first: the newest seals, any "
        "opens.  Rotate by adding a key in front; drop the oldest later.",
        example="file:/etc/twistauth/session-2026.key",
    )
    session_max_entries: int = setting(
        100_000, _int_kind(1, 100_000_000), "Most sessions the memory cache keeps (LRU)."
    )
    allowed_origins: Tuple[str, ...] = setting(
        (),
        _list_kind(_origin, "origins"),
        "Other origins allowed to call with credentials (CORS) besides the server's own.",
        example="https://app.example",
    )
    local_accounts: bool = setting(
        True,
        BOOL,
        "Serve local password accounts: the account.* and session.info methods.",
    )
    account_signup: bool = setting(
        True, BOOL, "Let anyone create an account with account.create (false: refused, 403)."
    )
    user_store: str = setting(
        "yaml",
        _choice_or_url_kind(("yaml", "memory"), ("redis", "redis-sentinel")),
        "Where users live: 'yaml' (a file in data_dir; one process), 'memory' "
        "(lost at exit), or a Redis URL.",
        example="redis://127.0.0.1:6379/0",
    )
    data_dir: str = setting(
        "twistauth-data",
        Kind("a directory path", _check_str, str),
        "The directory for files twistauth keeps (users.yaml); created with mode 0700.",
    )
    password_min_length: int = setting(8, _int_kind(1, 1024), "Shortest password accepted.")
    password_max_bytes: int = setting(
        1024,
        _int_kind(64, 4096),
        "Longest password accepted, in UTF-8 bytes (bounds the hashing cost; never truncated).",
    )
    argon2_time_cost: int = setting(3, _int_kind(1, 100), "argon2id iterations.")
    argon2_memory_cost: int = setting(
        65536, _int_kind(8192, 4 * 1024 * 1024), "argon2id memory per hash, in KiB."
    )
    argon2_parallelism: int = setting(4, _int_kind(1, 64), "argon2id lanes.")
    password_hash_threads: int = setting(
        2, _int_kind(1, 64), "Threads that hash passwords (never the reactor thread)."
    )
    password_hash_queue: int = setting(
        64, _int_kind(1, 100_000), "Hashes that may wait for a thread before logins answer 503."
    )
    login_max_failures_per_account: int = setting(
        100, _int_kind(1, 1_000_000), "Failed logins per account per window before 429."
    )
    login_max_failures_per_address: int = setting(
        300, _int_kind(1, 1_000_000), "Failed logins per client address per window before 429."
    )
    login_failure_window: float = setting(
        3600.0, SECONDS, "The window, in seconds, failed logins are counted over."
    )
    redis_url: Optional[str] = setting(
        None,
        _optional_redis_url_kind(),
        "The deployment's shared Redis, for what every process must see: login "
        "throttling, revocations of client-side sessions, signing nonces.  Unset: "
        "the session cache's or user store's Redis URL if either is one, else memory "
        "(one process).",
        example="redis://127.0.0.1:6379/0",
    )
    redis_timeout: float = setting(
        2.0, _float_kind(0.05, 60), "Deadline of every Redis call; an outage answers 503 after it."
    )
    providers: Tuple[Any, ...] = setting(
        (),
        _providers_kind(),
        "OpenID Connect providers to log in with, by name.  Each needs issuer, "
        "client_id, client_secret ('file:PATH' keeps it off the command line) and "
        "redirect_uri; see the OpenID Connect page for every key.",
        example='{ keycloak = { issuer = "https://id.example/realms/main", '
        'client_id = "twistauth", client_secret = "file:/etc/twistauth/kc.secret", '
        'redirect_uri = "https://app.example/redirect" } }',
    )
    demo: bool = setting(
        False,
        BOOL,
        "Serve the demo page at /demo/: login, the session, a method call and the "
        "live logout watch.",
    )
    bus_mode: str = setting(
        "pattern",
        Kind(
            "'pattern' or 'channel'",
            lambda v: _choice(_check_str(v), ("pattern", "channel")),
            lambda t: _choice(t, ("pattern", "channel")),
        ),
        "How the Redis bus subscribes: one pattern for every key (no per-wait cost, "
        "the default) or one channel per waited key.",
    )
    logout_max_wait: float = setting(
        25.0,
        _float_kind(1, 55),
        "Longest a /logout/wait long-poll waits before answering {\"logged_out\": false}.",
    )
    logout_max_waiters_per_session: int = setting(
        4, _int_kind(1, 1000), "Open logout waits one session may hold (more: 429)."
    )
    logout_max_waiters: int = setting(
        10_000,
        _int_kind(1, 1_000_000),
        "Open logout waits one process holds (more: 429).  Each holds a connection: "
        "keep it under the process's open-file limit.",
    )
    events_heartbeat_interval: float = setting(
        15.0, _float_kind(1, 300), "Seconds between heartbeat comments on /events streams."
    )
    acl_initial: Tuple[str, ...] = setting(
        ("account.*", "echo", "public.*", "session.*", "time.now"),
        _list_kind(_access_check("check_acl_pattern"), "method patterns"),
        "The methods an anonymous session may call (default-deny; patterns are a "
        "name, 'namespace.*' or '*').  Add your own public methods here.",
        example="public.*",
    )
    acl_lifted: Tuple[str, ...] = setting(
        ("*",),
        _list_kind(_access_check("check_acl_pattern"), "method patterns"),
        "The methods a logged-in session may call once its ACL is lifted (each "
        "method's own roles= still applies).",
    )
    acl_role_grants: Tuple[str, ...] = setting(
        (),
        _list_kind(_access_check("check_role_grant"), "'role=pattern' entries"),
        "Extra methods a role unlocks in lifted sessions, as 'role=pattern'.",
        example="admin=admin.*",
    )
    acl_lift_on_login: bool = setting(
        True, BOOL, "Lift a session's ACL when it logs in (else methods lift it)."
    )
    access_account_check: bool = setting(
        True,
        BOOL,
        "Re-check a logged-in session's account (gone or disabled: logged out "
        "everywhere) at most every access_recheck_interval seconds.",
    )
    access_recheck_interval: float = setting(
        60.0, _float_kind(0, 86400), "Seconds between account re-checks of a session (0: every call)."
    )
    roles_claim: str = setting(
        "",
        Kind("a claim name or dotted path", _check_str, str),
        "The OpenID claim holding a user's roles, e.g. 'groups' or 'realm_access.roles' "
        "(empty: roles come from the user store only).",
    )
    roles_claim_map: Tuple[str, ...] = setting(
        (),
        _list_kind(_access_check("check_claim_mapping"), "'claim value=role' entries"),
        "Map claim values to role names, as 'value=role' (unmapped values are kept as they are).",
        example="twistauth-admins=admin",
    )
    method_cache: str = setting(
        "memory",
        _choice_or_url_kind(("memory", "none"), ("redis", "redis-sentinel")),
        "Where @cached methods keep answers: 'memory' (one process), 'none', or a "
        "Redis URL.  A Redis outage makes the cache a pass-through, never an error.",
    )
    method_cache_max_entries: int = setting(
        10_000, _int_kind(1, 10_000_000), "Most answers the memory method cache keeps (LRU)."
    )
    return_origins: Tuple[str, ...] = setting(
        (),
        _list_kind(_origin, "origins"),
        "Origins besides the server's own that a login's 'next' may return to "
        "(anything else falls back to '/').",
        example="https://app.example",
    )
    oidc_refresh_margin: float = setting(
        60.0,
        _float_kind(0, 3600),
        "Refresh a user's access token when it expires within this many seconds.",
    )
    oidc_backchannel_rate_limit: int = setting(
        60,
        _int_kind(1, 1_000_000),
        "Refused back-channel logout tokens one address may send per minute before 429.",
    )
    oidc_logout_landing: str = setting(
        "/",
        API_PATH_OR_ROOT,
        "Where the browser lands after logging out at the provider.",
    )
    login_page_title: str = setting(
        "Sign in", Kind("a title", _check_str, str), "The title of GET /login/page."
    )
    login_page_css: str = setting(
        "",
        Kind("CSS text", _check_str, str),
        "Extra CSS for GET /login/page (style the provider buttons).",
    )
    processes: int = setting(
        1,
        _int_kind(1, 256),
        "Worker processes sharing the listening sockets (tcp, tcp6 and unix "
        "endpoints).  More than one: the parent process only supervises them, "
        "and sessions, the bus, users and the method cache must live in Redis.",
    )
    shutdown_grace: float = setting(
        10.0,
        _float_kind(0, 3600),
        "On SIGTERM, seconds running requests may take to finish before their "
        "connections are closed (pending logout waits are answered at once).",
    )
    worker_restart_limit: int = setting(
        5,
        _int_kind(1, 1000),
        "Restarts of one worker process allowed within worker_restart_window; "
        "one more crash and the parent stops every worker and exits 1.",
    )
    worker_restart_window: float = setting(
        60.0,
        _float_kind(1, 86400),
        "The window, in seconds, worker crashes are counted over.",
    )
    log_observers: Tuple[str, ...] = setting(
        ("text",),
        _list_kind(_log_observer, "log observer descriptions"),
        "Where log events go, each through the redaction filter: 'text' or 'json' "
        "(standard output; ':stream=stderr'), 'file:PATH' (text, rotated by size; "
        "options format=json, max_bytes=10M, count=5, level=...), 'smtp' (error "
        "events mailed in batches; needs the alert_* settings).  Each may name its "
        "own level (':level=warn').  Under twistd and left unset, it follows twistd: "
        "standard output with -n, else twistd's --logfile (default twistd.log).",
        example="file:/var/log/twistauth/app.jsonl:format=json",
    )
    log_level: str = setting(
        "info",
        Kind("debug, info, warn, error or critical", lambda v: _log_level(_check_str(v)), _log_level),
        "The lowest level logged by observers that name none.  Changes on SIGHUP.",
    )
    alert_smtp_host: Optional[str] = setting(
        None,
        _optional_text_kind("a host name or address"),
        "The mail server alert mails go to (the 'smtp' log observer).",
        example="mail.example.org",
    )
    alert_smtp_port: int = setting(25, _int_kind(1, 65535), "The mail server's port.")
    alert_smtp_tls: str = setting(
        "none",
        Kind(
            "'none', 'starttls' or 'implicit'",
            lambda v: _choice(_check_str(v), ("none", "starttls", "implicit")),
            lambda t: _choice(t, ("none", "starttls", "implicit")),
        ),
        "TLS to the mail server: none, STARTTLS (required: no mail is sent without "
        "it), or implicit TLS (usually port 465).  The certificate is verified.",
    )
    alert_smtp_username: Optional[str] = setting(
        None,
        _optional_text_kind("a user name"),
        "The mail server's AUTH user name (with it, authentication is required).",
        example="twistauth",
    )
    alert_smtp_password: Optional[str] = setting(
        None,
        _secret_text_kind(),
        "The mail server's AUTH password, or 'file:PATH'.  Never shown or logged.",
        example="file:/etc/twistauth/smtp.password",
    )
    alert_smtp_ca_file: Optional[str] = setting(
        None,
        _optional_text_kind("a readable PEM file", _readable_file),
        "A PEM file of the CA that signed the mail server's certificate, instead of "
        "the system's.",
        example="/etc/twistauth/mail-ca.pem",
    )
    alert_from: Optional[str] = setting(
        None,
        _optional_text_kind("an e-mail address", _mail_address),
        "The sender address of alert mails.",
        example="twistauth@example.org",
    )
    alert_to: Tuple[str, ...] = setting(
        (),
        _list_kind(_mail_address, "e-mail addresses"),
        "Who gets alert mails.",
        example="ops@example.org",
    )
    alert_subject: str = setting(
        "twistauth alert",
        Kind("a subject line", _check_str, str),
        "The beginning of alert mails' subject (the count, host and first error follow).",
    )
    alert_batch_delay: float = setting(
        30.0,
        _float_kind(0, 3600),
        "Seconds to collect error events after the first before one mail carries them all.",
    )
    alert_min_interval: float = setting(
        300.0,
        _float_kind(0, 86400),
        "Least seconds between two alert mails: an error storm sends a handful of "
        "mails, never one per error.",
    )
    alert_max_events: int = setting(
        50, _int_kind(1, 10_000), "Error events listed in one mail (the rest are counted)."
    )
    alert_timeout: float = setting(
        30.0,
        _float_kind(1, 600),
        "Seconds one mail may take to send; then it is abandoned and its events are "
        "dropped (counted in the metrics).",
    )
    metrics: bool = setting(
        True,
        BOOL,
        "Count requests, method calls and latencies, logins, refreshes, logouts, "
        "sessions, waiters, cache hits and Redis errors, and serve them at GET /metrics "
        "(Prometheus text format).",
    )
    metrics_listen: Optional[str] = setting(
        None,
        _optional_text_kind("a Twisted server endpoint string", _endpoint),
        "A separate, private endpoint for /metrics, /healthz and /readyz.  Unset: "
        "they are served on the main site (keep them from the public with a proxy).",
        example="tcp:9100:interface=127.0.0.1",
    )
    readiness_timeout: float = setting(
        2.0,
        _float_kind(0.05, 60),
        "Seconds each /readyz check (Redis PING, user store, bus) may take before it "
        "counts as failed (a Redis PING gets min(readiness_timeout, redis_timeout), and "
        "its check 10% more, so the PING's own deadline fires first).",
    )
    request_id_trust_header: bool = setting(
        False,
        BOOL,
        "Keep a well-formed X-Request-Id sent by the client instead of making a new "
        "one.  Switch on only behind a proxy that sets or strips the header.",
    )
    exception_hook: Optional[Callable[..., Any]] = setting(
        None,
        CALLABLE,
        "Called as hook(handler, exception) when a method raises; may return a "
        "TwistauthError to answer with, or None to answer 500.",
        example="myapp.errors:map_error",
    )
    before_hook: Optional[Callable[..., Any]] = setting(
        None, CALLABLE, "Called as hook(transaction) before every method call."
    )
    after_hook: Optional[Callable[..., Any]] = setting(
        None,
        CALLABLE,
        "Called as hook(transaction) after every method call and every whole batch, "
        "with its duration and outcome.",
    )
    origins: Mapping[str, str] = attr.ib(factory=dict, eq=False, repr=False)
    """Where each key's value came from, e.g. ``{"listen": "default"}``."""

    @classmethod
    def keys(cls) -> Dict[str, attr.Attribute[Any]]:
        """
        The declared settings, by name, in declaration order.
        """
        return {a.name: a for a in attr.fields(cls) if "kind" in a.metadata}

    @classmethod
    def load(
        cls,
        *,
        config_path: Optional[str] = None,
        environ: Optional[Mapping[str, str]] = None,
        command_line: Optional[Mapping[str, Any]] = None,
        **keywords: Any,
    ) -> Settings:
        """
        Load settings from every source and validate them.

        :param config_path: a TOML file, or ``None``.
        :param environ: the environment to read ``TWISTAUTH_*`` variables from
            (``None``: none are read; pass ``os.environ`` to read the process's).
        :param command_line: values from the command line, by key: strings,
            or lists of strings for repeatable keys.
        :param keywords: typed values, the highest precedence.
        :raises SettingsError: for anything unknown or invalid.
        """
        declared = cls.keys()
        values: Dict[str, Any] = {}
        origins: Dict[str, str] = {name: "default" for name in declared}

        def take(name: str, source: str, convert: Callable[[Kind], Any]) -> None:
            if name not in declared:
                close = difflib.get_close_matches(name, declared, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise SettingsError(name, source, f"unknown setting{hint}")
            kind: Kind = declared[name].metadata["kind"]
            try:
                values[name] = convert(kind)
            except ValueError as e:
                raise SettingsError(name, source, str(e)) from None
            origins[name] = source

        if config_path is not None:
            source = f"config file {config_path}"
            for name, value in _read_toml(config_path, source).items():
                take(name, source, partial(_check, value=value))

        for variable, text in sorted((environ or {}).items()):
            if not variable.startswith(ENV_PREFIX) or variable == ENV_PREFIX + "CONFIG":
                continue
            name = variable[len(ENV_PREFIX) :].lower()
            take(name, f"environment variable {variable}", partial(_parse, text=text))

        for name, given in (command_line or {}).items():
            if given is None:
                continue
            source = f"command-line option --{name.replace('_', '-')}"

            def from_text(kind: Kind, given: Any = given) -> Any:
                if kind.repeatable:
                    return tuple(item for text in given for item in kind.parse(text))
                return kind.parse(given)

            take(name, source, from_text)

        for name, value in keywords.items():
            take(name, "Python keyword", partial(_check, value=value))

        settings = cls(origins=origins, **values)
        settings._check_together()
        return settings

    @property
    def shared_redis_url(self) -> Optional[str]:
        """
        The Redis every process of the deployment shares: ``redis_url``, else
        the session cache's or user store's if either is a Redis URL, else
        ``None`` (one process, memory).
        """
        if self.redis_url is not None:
            return self.redis_url
        for url in (self.session_cache, self.user_store):
            if is_redis_url(url):
                return url
        return None

    def _check_together(self) -> None:
        """
        Rules that span several keys.
        """
        if self.processes > 1:
            # Several worker processes need every piece of state they share in
            # Redis, and listening sockets a child process can adopt: name each
            # memory backend and the setting that replaces it.
            from twistauth.workers import listen_spec

            problems = []
            if self.session_cache == "memory":
                problems.append(
                    "session_cache = 'memory' keeps sessions in one process: set "
                    "session_cache = 'redis://HOST:PORT/DB', or session_cache = 'client' "
                    "with redis_url = 'redis://HOST:PORT/DB' (revocations)"
                )
            if self.shared_redis_url is None:
                problems.append(
                    "the bus (logout wake-ups), login throttling and revocations are in "
                    "memory: set redis_url = 'redis://HOST:PORT/DB' (or a Redis session_cache "
                    "or user_store)"
                )
            if self.user_store in ("yaml", "memory"):
                problems.append(
                    f"user_store = {self.user_store!r} belongs to one process: set "
                    "user_store = 'redis://HOST:PORT/DB'"
                )
            if self.method_cache == "memory":
                problems.append(
                    "method_cache = 'memory' would serve answers another process "
                    "invalidated: set method_cache = 'redis://HOST:PORT/DB' or 'none'"
                )
            for description in self.listen + (
                (self.metrics_listen,) if self.metrics_listen else ()
            ):
                try:
                    listen_spec(description)
                except ValueError as e:
                    problems.append(str(e))
            if self.shared_redis_url is not None and self.deployment_key is None:
                problems.append(
                    "a deployment sharing Redis needs deployment_key (32 random bytes, "
                    "the same on every process)"
                )
            if problems:
                raise SettingsError(
                    "processes",
                    self.origins["processes"],
                    f"{self.processes} worker processes need shared state: " + "; ".join(problems),
                )
        if self.session_cache == "client" and not self.session_keys:
            raise SettingsError(
                "session_cache",
                self.origins["session_cache"],
                "session_cache = 'client' needs at least one key in session_keys "
                "(32 random bytes, base64url, or 'file:PATH')",
            )
        if self.shared_redis_url is not None and self.deployment_key is None:
            raise SettingsError(
                "deployment_key",
                "default",
                "a deployment sharing Redis needs a deployment_key (the same on every "
                "process: it authenticates bus messages between them)",
            )
        self._check_operations()
        if self.session_idle_timeout > self.session_absolute_timeout:
            raise SettingsError(
                "session_idle_timeout",
                self.origins["session_idle_timeout"],
                f"must not exceed session_absolute_timeout ({self.session_absolute_timeout:g} s)",
            )

    def _check_operations(self) -> None:
        """
        Logging, alert and health settings that depend on each other.
        """
        from twistauth.observe import parse_observer_spec

        kinds = [parse_observer_spec(text).kind for text in self.log_observers]
        if "smtp" in kinds:
            missing = [
                key
                for key, value in (
                    ("alert_smtp_host", self.alert_smtp_host),
                    ("alert_from", self.alert_from),
                    ("alert_to", self.alert_to),
                )
                if not value
            ]
            if missing:
                raise SettingsError(
                    "log_observers",
                    self.origins["log_observers"],
                    "the 'smtp' observer mails alerts and needs these settings too: "
                    + ", ".join(missing),
                )
            if kinds.count("smtp") > 1:
                raise SettingsError(
                    "log_observers", self.origins["log_observers"], "list 'smtp' once"
                )
        if self.metrics_listen is None and self.api_path in HEALTH_PATHS:
            raise SettingsError(
                "api_path",
                self.origins["api_path"],
                f"{self.api_path} serves health or metrics; choose another api_path or "
                "set metrics_listen",
            )

    def describe(self, name: str) -> str:
        """
        ``"value (source)"`` for one key, for start-up log lines.  Secrets are
        never shown.
        """
        value = getattr(self, name)
        field = Settings.keys().get(name)
        if field is not None and field.metadata["kind"].secret and isinstance(value, str):
            shown = "<hidden>"
        elif isinstance(value, bytes) or (
            isinstance(value, tuple) and value and isinstance(value[0], bytes)
        ):
            shown = f"{len(value) if isinstance(value, tuple) else 1} key(s) set"
        elif isinstance(value, tuple):
            shown = ", ".join(value)
        elif callable(value):
            shown = f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', '?')}"
        else:
            shown = str(value)
        return f"{shown} ({self.origins.get(name, 'default')})"


def _check(kind: Kind, value: Any) -> Any:
    return kind.check(value)


def _parse(kind: Kind, text: str) -> Any:
    return kind.parse(text)


def _read_toml(path: str, source: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SettingsError(None, source, f"cannot be read: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(None, source, f"is not valid TOML: {e}") from None
    declared = Settings.keys()
    for name, value in data.items():
        if isinstance(value, dict) and not (
            name in declared and declared[name].metadata["kind"].table
        ):
            raise SettingsError(
                name, source, "tables are not settings; write keys at the top level"
            )
    return data


def documented_keys() -> Iterable[Tuple[str, str, str, Any, Optional[str]]]:
    """
    (name, allowed, doc, default, example) for each key: the configuration reference.
    """
    for name, a in Settings.keys().items():
        yield name, a.metadata["kind"].allowed, a.metadata["doc"], a.default, a.metadata["example"]


def command_line_values(options: Mapping[str, Any]) -> Dict[str, Any]:
    """
    The settings given in a parsed `twistauth.tap.Options`, by key.
    """
    return {name: options[name] for name in Settings.keys() if options.get(name) not in (None, [])}


__all__: Sequence[str] = [
    "Settings",
    "SettingsError",
    "ENV_PREFIX",
    "documented_keys",
    "command_line_values",
]
