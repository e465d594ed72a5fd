"""
Tests for the redaction filter (`twistauth.observe.Redactor`): checklist
case 16, "codes, state, tokens, session ids, passwords never reach access or
app logs", for every observer.

A table of nasty log calls (secrets in fields, nested containers, header
pairs, ``Headers`` objects, format strings, attribute look-ups that reach a
query string, failures whose messages carry tokens, legacy ``log.msg`` and
``log.err`` lines, unformattable formats...) is sent through one pipeline
with every kind of observer: text, JSON lines, rotating files in both
formats, and alert mail.  No secret may appear in any output, and each
event's harmless context must still be there (so a filter that drops
everything fails too).
"""

from __future__ import annotations

import base64
import json
import random
from io import StringIO
from typing import Any, Callable, Dict, List, Tuple

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.logger._legacy import publishToNewObserver
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from twistauth.observe import (
    REDACTED,
    AlertSettings,
    MemoryMailSender,
    RedactedFailure,
    Redactor,
    build_logging,
    redact_text,
)
from twistauth.observe._redact import key_sensitivity, looks_random


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# Secrets from a seeded generator: every run checks the same values.
_rng = random.Random(16)


def _token(size: int, prefix: str = "") -> str:
    return prefix + b64url(_rng.getrandbits(8 * size).to_bytes(size, "big"))


PASSWORD = "hunter2-Pa55word!"
JWT = ".".join(
    [
        b64url(json.dumps({"alg": "RS256", "kid": "k1"}).encode()),
        b64url(json.dumps({"sub": "248289761001", "iss": "https://idp.example"}).encode()),
        _token(64),
    ]
)
SESSION_ID = _token(32)
CODE = "SplxlOBeZQQYbYS6WxSbIA"
STATE = "af0ifjsldkj"
VERIFIER = _token(32)
ACCESS = _token(24, "at-")
REFRESH = _token(24, "rt-")
CLIENT_SECRET = _token(30, "cs_")
BASIC = base64.b64encode(b"twistauth-client:" + CLIENT_SECRET.encode()).decode()
CSRF = _token(16)
API_KEY = "ak_" + _rng.getrandbits(160).to_bytes(20, "big").hex()
REDIS_PASSWORD = "redis-Pw-9"
OTP = "493817"
SID = _token(12)
HMAC_KEY = _token(32)

SECRETS = {
    "password": PASSWORD,
    "jwt": JWT,
    "jwt payload": JWT.split(".")[1],
    "session id": SESSION_ID,
    "code": CODE,
    "state": STATE,
    "verifier": VERIFIER,
    "access token": ACCESS,
    "refresh token": REFRESH,
    "client secret": CLIENT_SECRET,
    "basic credentials": BASIC,
    "csrf": CSRF,
    "api key": API_KEY,
    "redis password": REDIS_PASSWORD,
    "otp": OTP,
    "sid": SID,
    "hmac key": HMAC_KEY,
}


class FakeRequest:
    """Something with attributes a format string can reach."""

    def __init__(self, uri: bytes) -> None:
        self.uri = uri
        self.args = {b"code": [CODE.encode()], b"state": [STATE.encode()]}


class FakeSession:
    """An object whose repr carries its id, as careless reprs do."""

    def __repr__(self) -> str:
        return f"<Session id={SESSION_ID} user=bob csrf={CSRF}>"


def _failure(exception: Exception) -> Failure:
    try:
        raise exception
    except Exception:
        return Failure()


def _legacy(**event: Any) -> Callable[[Any], None]:
    """A twisted.python.log event, converted as the global publisher does."""

    def emit(observer: Any) -> None:
        event.setdefault("time", 1_700_000_000.0)
        event.setdefault("system", "-")
        event.setdefault("isError", 0)
        publishToNewObserver(observer, dict(event), legacy_log.textFromEventDict)

    return emit


def _new(method: str, form: str, **fields: Any) -> Callable[[Any], None]:
    def emit(observer: Any) -> None:
        getattr(Logger(namespace="twistauth.test", observer=observer), method)(form, **fields)

    return emit


def _failure_call(form: str, failure: Failure, **fields: Any) -> Callable[[Any], None]:
    def emit(observer: Any) -> None:
        Logger(namespace="twistauth.test", observer=observer).failure(form, failure, **fields)

    return emit


# (context that must survive, emitter)
CASES: List[Tuple[str, str, Callable[[Any], None]]] = [
    ("field", "login attempt for bob", _new("info", "login attempt for {user}", user="bob", password=PASSWORD)),
    ("field in format", "login bob password", _new("warn", "login {user} password {password}", user="bob", password=PASSWORD)),
    (
        "nested containers",
        "stored tokens",
        _new(
            "info",
            "stored tokens {record}",
            record={
                "user": {"credentials": {"password": PASSWORD, "otp": int(OTP)}},
                "tokens": [{"access_token": ACCESS}, {"refresh_token": REFRESH}, {"id_token": JWT}],
                "provider": {"client_secret": CLIENT_SECRET, "clientSecret": CLIENT_SECRET},
            },
        ),
    ),
    (
        "header pairs",
        "outgoing request",
        _new(
            "info",
            "outgoing request {headers}",
            headers=[
                (b"Authorization", b"Basic " + BASIC.encode()),
                (b"Cookie", f"twistauth_session={SESSION_ID}; other=1".encode()),
                ("X-Api-Key", API_KEY),
                ("Accept", "application/json"),
            ],
        ),
    ),
    (
        "Headers object",
        "incoming headers",
        _new(
            "info",
            "incoming headers {h}",
            h=Headers(
                {
                    b"authorization": [b"Bearer " + ACCESS.encode()],
                    b"cookie": [f"twistauth_session={SESSION_ID}".encode()],
                    b"x-csrf-token": [CSRF.encode()],
                }
            ),
        ),
    ),
    ("secret in the format string", "for tokens", _new("info", f"exchanging code={CODE} state={STATE} for tokens")),
    ("attribute look-up reaches a query", "callback b'/redirect?code=", _new("info", "callback {request.uri}", request=FakeRequest(b"/redirect?code=" + CODE.encode() + b"&state=" + STATE.encode()))),
    ("attribute look-up reaches args", "callback args", _new("info", "callback args {request.args}", request=FakeRequest(b"/"))),
    ("index look-up", "the password is", _new("info", "the password is {d[password]}", d={"password": PASSWORD})),
    ("format conversion", "body was", _new("info", "body was {body!r}", body=json.dumps({"client_secret": CLIENT_SECRET, "code_verifier": VERIFIER}).encode())),
    ("form body", "token request", _new("debug", "token request {body}", body=f"grant_type=authorization_code&code={CODE}&code_verifier={VERIFIER}&client_secret={CLIENT_SECRET}&redirect_uri=https%3A%2F%2Frp")),
    ("url password", "connecting to redis", _new("info", "connecting to redis at {url}", url=f"redis://:{REDIS_PASSWORD}@10.0.0.5:6379/0")),
    ("camelCase and dashed keys", "provider config", _new("info", "provider config", clientSecret=CLIENT_SECRET, idToken=JWT, sessionId=SESSION_ID, code_verifier=VERIFIER, **{"X-Api-Key": API_KEY})),
    ("Set-Cookie line", "response header", _new("info", "response header " + f"Set-Cookie: twistauth_session={SESSION_ID}; HttpOnly; Secure")),
    ("Authorization line", "upstream said", _new("info", "upstream said {text}", text=f"HTTP/1.1 401\r\nAuthorization: Bearer {ACCESS}\r\n")),
    ("object repr", "session loaded", _new("info", "session loaded {session}", session=FakeSession())),
    ("secret as a dict key", "sessions by id", _new("info", "sessions by id {table}", table={SESSION_ID: "bob", HMAC_KEY: "key"})),
    ("json text with quotes", "provider answered", _new("info", "provider answered {text}", text=json.dumps({"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "Bearer", "expires_in": 3600}))),
    ("python repr of bytes dict", "cookies", _new("info", "cookies {c}", c=repr({b"twistauth_session": SESSION_ID.encode(), b"theme": b"dark"}))),
    ("short secrets under their names", "otp check", _new("info", "otp check", otp=OTP, pin=1234, sid=SID, state=STATE, nonce=STATE)),
    ("unformattable format", "Unable to format event", _new("info", "broken {" + SESSION_ID + " and " + JWT)),
    ("failure message with a token", "id token rejected", _failure_call("id token rejected", _failure(ValueError(f"bad id_token {JWT} for sid={SID!r}")))),
    ("failure args dict", "refresh failed", _failure_call("refresh failed for {user}", _failure(KeyError({"refresh_token": REFRESH, "access_token": ACCESS})), user="bob")),
    ("failure with a form body", "token endpoint", _failure_call("token endpoint", _failure(RuntimeError(f"POST body code={CODE}&client_secret={CLIENT_SECRET}")))),
    ("legacy msg", "legacy line", _legacy(message=(f"legacy line Authorization: Basic {BASIC}",))),
    ("legacy err", "legacy failure", _legacy(message=(), isError=1, why="legacy failure", failure=_failure(ValueError(f"session {SESSION_ID} gone")))),
    ("legacy access log", "GET /redirect", _legacy(message=(f'"10.0.0.1" - - [22/Nov/2026:04:53:38 +0000] "GET /redirect?code={CODE}&state={STATE} HTTP/1.1" 303 0 "-" "UA"',))),
    ("huge value", "big blob", _new("info", "big blob {blob}", blob="x" * 40_000 + f" token={ACCESS}")),
    ("deep nesting", "deep", _new("info", "deep {d}", d={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"password": PASSWORD}}}}}}}})),
    ("critical with fields", "key rotation", _new("critical", "key rotation failed", signing_key=HMAC_KEY, session_keys=[HMAC_KEY.encode()])),
    ("error from a thread-ish source", "hash failed", _new("error", "hash failed for {who}", who="bob", passwd=PASSWORD, pwd=PASSWORD)),
]


def _all_observers(tmp_path: Any) -> Tuple[Any, Dict[str, Callable[[], str]], Clock, MemoryMailSender]:
    text, jsonl = StringIO(), StringIO()
    clock = Clock()
    mail = MemoryMailSender()
    text_file = str(tmp_path / "app.log")
    json_file = str(tmp_path / "app.jsonl")
    setup = build_logging(
        [
            "text:level=debug",
            "json:stream=stderr:level=debug",
            f"file:{text_file}:level=debug",
            f"file:path={json_file}:format=json:level=debug:max_bytes=64M",
            "smtp:level=debug",
        ],
        streams={"stdout": text, "stderr": jsonl},
        alerts=AlertSettings(
            from_address="twistauth@example.org",
            to_addresses=("ops@example.org",),
            batch_delay=1.0,
            max_events=1000,
        ),
        mail_sender=mail,
        clock=clock,
    )

    def read(path: str) -> Callable[[], str]:
        return lambda: open(path, encoding="utf-8").read()

    def mails() -> str:
        return "\n".join(m.decode("utf-8") for _, _, m in mail.sent)

    outputs = {
        "text": text.getvalue,
        "json": jsonl.getvalue,
        "text file": read(text_file),
        "json file": read(json_file),
        "smtp": mails,
    }
    return setup, outputs, clock, mail


@pytest.mark.parametrize("name,context,emit", CASES, ids=[c[0] for c in CASES])
def test_no_secret_reaches_any_observer(tmp_path: Any, name: str, context: str, emit: Any) -> None:
    setup, outputs, clock, mail = _all_observers(tmp_path)
    emit(setup.observer)
    clock.advance(1.0)
    assert len(mail.sent) == 1
    assert clock.getDelayedCalls() == []
    for observer, read in outputs.items():
        written = read()
        assert context in written, f"{observer} lost the event's context: {written[:500]!r}"
        for what, secret in SECRETS.items():
            assert secret not in written, f"{what} reached the {observer} observer: {written[:2000]!r}"
    # The JSON outputs stay parseable, one object a line.
    for line in outputs["json"]().splitlines():
        assert isinstance(json.loads(line), dict)


def test_the_table_as_one_stream_and_the_json_fields(tmp_path: Any) -> None:
    setup, outputs, clock, mail = _all_observers(tmp_path)
    for _, _, emit in CASES:
        emit(setup.observer)
    clock.advance(1.0)
    for observer, read in outputs.items():
        written = read()
        for what, secret in SECRETS.items():
            assert secret not in written, f"{what} reached the {observer} observer"
    records = [json.loads(line) for line in outputs["json"]().splitlines()]
    assert len(records) == len(CASES)
    first = records[0]
    assert first["user"] == "bob" and first["password"] == REDACTED
    assert first["level"] == "info" and first["namespace"] == "twistauth.test"
    otp = next(r for r in records if r["message"] == "otp check")
    assert otp["pin"] == REDACTED and otp["otp"] == REDACTED and otp["state"] == REDACTED
    failure = next(r for r in records if r["message"].startswith("refresh failed"))
    assert failure["failure"]["type"] == "builtins.KeyError"
    assert "Traceback" in failure["failure"]["traceback"]
    assert failure["level"] == "critical"


def test_numbers_under_ambiguous_names_are_kept() -> None:
    redactor = Redactor()
    event = {
        "log_level": LogLevel.info,
        "log_namespace": "t",
        "log_format": "status {status_code} error {error_code} sessions {session_count} code {code}",
        "status_code": 404,
        "error_code": "invalid_grant",
        "session_count": 3,
        "code": 40001,
        "token_count": 2,
        "password": 1234,
    }
    out = redactor.redact_event(event)
    assert out["log_text"] == "status 404 error invalid_grant sessions 3 code 40001"
    assert out["token_count"] == REDACTED  # "token" names a secret whatever the type
    assert out["password"] == REDACTED
    assert out["status_code"] == 404 and out["error_code"] == "invalid_grant"


def test_the_original_event_is_not_changed() -> None:
    event: Dict[str, Any] = {
        "log_level": LogLevel.info,
        "log_namespace": "t",
        "log_format": "{password}",
        "password": PASSWORD,
        "nested": {"token": ACCESS},
    }
    before = repr(event)
    Redactor().redact_event(event)
    assert repr(event) == before


def test_failures_keep_their_type_and_lose_their_secrets() -> None:
    failure = _failure(ValueError(f"token {ACCESS} and code={CODE}"))
    out = Redactor().redact_event(
        {"log_level": LogLevel.error, "log_namespace": "t", "log_format": "x", "log_failure": failure}
    )
    redacted = out["log_failure"]
    assert isinstance(redacted, RedactedFailure)
    assert redacted.check(ValueError) is ValueError
    assert ACCESS not in redacted.getTraceback() and CODE not in redacted.getErrorMessage()
    assert "ValueError" in redacted.getTraceback()
    assert redacted.frames == [] and redacted.tb is None
    # The original is untouched.
    assert ACCESS in failure.getErrorMessage()


def test_wrap_redacts_for_a_host_programs_observer() -> None:
    seen: List[Dict[str, Any]] = []
    observer = Redactor().wrap(seen.append)
    Logger(observer=observer).info("hello {who}", who="bob", token=ACCESS)
    assert seen[0]["token"] == REDACTED and seen[0]["log_text"] == "hello bob"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("GET /redirect?code=abc123&state=xyz HTTP/1.1", f"GET /redirect?code={REDACTED}&state={REDACTED} HTTP/1.1"),
        ("Authorization: Bearer abc.def", f"Authorization: {REDACTED}"),
        ("{'password': 'hunter 2', 'user': 'bob'}", f"{{'password': {REDACTED}, 'user': 'bob'}}"),
        ('{"refresh_token": "rt-1", "n": 3}', f'{{"refresh_token": {REDACTED}, "n": 3}}'),
        ('{"password": "a\\"b c"}', f'{{"password": {REDACTED}}}'),
        ("redis://user:hunter2@host:6379/0", f"redis://user:{REDACTED}@host:6379/0"),
        ("Set-Cookie: twistauth_session=Zm9v; HttpOnly", f"Set-Cookie: {REDACTED}"),
        ("status code: 404", "status code: 404"),
        ("code=123456", f"code={REDACTED}"),
        ("x=1, y=2, path=/api", "x=1, y=2, path=/api"),
        ("error: connection refused (ConnectionRefusedError)", "error: connection refused (ConnectionRefusedError)"),
        ("Basic authentication failed", "Basic authentication failed"),
        ("the bearer token expired", "the bearer token expired"),
        ("Bearer abcdef", f"Bearer {REDACTED}"),
        ("x-api-key: K1", f"x-api-key: {REDACTED}"),
        ("url='https://x/cb?code=abcd'", f"url='https://x/cb?code={REDACTED}'"),
        ("token='a=b c' rest", f"token={REDACTED} rest"),
        (f"see {JWT}.", f"see {REDACTED}."),
        ("request 0123456789abcdef done", "request 0123456789abcdef done"),
        ("twistauth: sessions: memory cache", "twistauth: sessions: memory cache"),
        ("state=abc, 'state': 'abc', \"sid\": \"x\"", f"state={REDACTED}, 'state': {REDACTED}, \"sid\": {REDACTED}"),
        ("password: hunter2", f"password: {REDACTED}"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_long_random_strings_are_redacted_and_names_are_not() -> None:
    rng = random.Random(20261122)
    # Measured rates of random strings the heuristic misses (without a
    # telling key): 0 at 32 bytes, ~0.1 % at 24, ~0.5 % at 16, ~2.5 % at 12.
    for size, allowed in ((64, 0), (32, 0), (24, 6), (16, 20), (12, 80)):
        missed = sum(
            1 for _ in range(2000) if not looks_random(b64url(rng.getrandbits(8 * size).to_bytes(size, "big")))
        )
        assert missed <= allowed, (size, missed)
    for size in (16, 20, 32):
        missed = sum(
            1 for _ in range(1000) if not looks_random(rng.getrandbits(8 * size).to_bytes(size, "big").hex())
        )
        assert missed == 0
    names = [
        "ConnectionRefusedError",
        "HTTP11ClientProtocol",
        "TwistauthServiceMaker",
        "UnsupportedMediaTypeError",
        "IReactorPluggableNameResolver",
        "test_redaction_of_nested_failures",
        "site-packages/twisted/internet/defer",
        "123e4567-e89b-12d3-a456-426614174000",
        "0123456789abcdef",
        "DefaultOpenSSLContextFactory",
        "SessionCacheConformance",
    ]
    for name in names:
        assert redact_text(f"in {name} here") == f"in {name} here", name


@pytest.mark.parametrize(
    "name,level",
    [
        ("password", 2),
        ("client_secret", 2),
        ("clientSecret", 2),
        ("X-Api-Key", 2),
        ("id_token", 2),
        ("code_verifier", 2),
        ("otp", 2),
        ("session_id", 2),
        ("twistauth_session", 1),
        ("code", 1),
        ("state", 1),
        ("sid", 1),
        ("status_code", 0),
        ("error_code", 0),
        ("user", 0),
        ("request_id", 0),
        ("method", 0),
    ],
)
def test_key_sensitivity(name: str, level: int) -> None:
    assert key_sensitivity(name) == level


def test_extra_names() -> None:
    redactor = Redactor(extra_names={"ssn"})
    out = redactor.redact_event(
        {"log_level": LogLevel.info, "log_namespace": "t", "log_format": "{user_ssn}", "user_ssn": "078-05-1120"}
    )
    assert out["user_ssn"] == REDACTED and out["log_text"] == REDACTED


def test_redacted_dict_keys_do_not_collide() -> None:
    out = Redactor().value({SESSION_ID: "bob", HMAC_KEY: "alice"})
    assert sorted(out.values()) == ["alice", "bob"]
    assert all(SESSION_ID not in k and HMAC_KEY not in k for k in out)


def test_traceback_frames_are_kept() -> None:
    def _dataReceived_CHUNK_LENGTH() -> None:  # a name that looks random
        raise ValueError(f"chunk for session {SESSION_ID}")

    try:
        _dataReceived_CHUNK_LENGTH()
    except ValueError:
        failure = Failure()
    text = Redactor().value(failure)["traceback"]
    assert "in _dataReceived_CHUNK_LENGTH" in text
    assert SESSION_ID not in text and f"chunk for session {REDACTED}" in text
    # A message cannot pass itself off as a frame to escape redaction.
    forged = _failure(ValueError(f'x\n  File "a.py", line 1, in f\n    {SESSION_ID}'))
    assert SESSION_ID not in Redactor().value(forged)["traceback"]
