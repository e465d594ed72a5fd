"""
The redaction filter: the one place where secrets are taken out of log
events, before any observer sees them.

A `Redactor` makes a redacted *copy* of an event (the original is shared
with every other observer of the publisher and is never changed):

- fields whose *name* says they hold a secret (``password``, ``token``,
  ``client_secret``, ``code``, ``state``, ``cookie``, ``session_id``,
  ``Authorization`` ...) lose their value, at any depth of nested dicts,
  lists, tuples, ``(name, value)`` header pairs and Twisted ``Headers``;
- every string (field values, dict keys, the message, exception messages,
  tracebacks, ``repr`` of other objects) is searched for things that look
  secret whatever their name: JWTs, ``Bearer``/``Basic`` credentials,
  ``Authorization:``/``Cookie:``/``Set-Cookie:`` header lines,
  ``key=value`` and ``"key": "value"`` pairs with a secret key (query
  strings, JSON, Python reprs), passwords in URLs, and long random-looking
  strings (session ids, keys, opaque tokens);
- the message is rendered once, from the event with its secret fields
  already removed, then searched as above; the copy's ``log_format`` is that
  text (braces escaped), so no observer formats the original fields again
  (``{request.uri}`` cannot reach a query string's ``code``);
- a ``log_failure`` becomes a `RedactedFailure`: same exception type (so
  ``check`` still works), with the message and traceback text redacted and
  no frames, locals or globals;
- any other object becomes its redacted ``repr`` (so the copy is JSON-safe).

What counts as secret errs on the side of hiding: a long mixed-case random
string is hidden even when it was harmless.  Short numeric values under
ambiguous names (``code``, ``state``, ``session``) are kept, so HTTP statuses
and error codes survive (``status_code=404``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

import attr
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.reflect import qual, safe_repr, safe_str
from zope.interface import implementer

REDACTED = "<redacted>"

#: Substrings of a normalised field name (lower case, letters and digits
#: only) that always mean a secret, whatever the value's type.
STRONG_NAMES: FrozenSet[str] = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "cookie",
        "authorization",
        "credential",
        "verifier",
        "apikey",
        "privatekey",
        "signingkey",
        "encryptionkey",
        "hmackey",
        "masterkey",
        "accesskey",
        "sessionid",
        "sessionkey",
        "assertion",
    }
)

#: Whole words of a field name (split at ``_``, ``-``, ``.``, spaces and
#: camelCase) that always mean a secret, whatever the value's type.
SECRET_WORDS: FrozenSet[str] = frozenset(
    {"pwd", "pass", "pin", "otp", "jwt", "csrf", "xsrf", "bearer"}
)

#: Whole words that mean a secret when the value is text; numbers under
#: these names are kept (``status_code=404``, ``session_count=3``).
WEAK_WORDS: FrozenSet[str] = frozenset(
    {
        "code",
        "codes",
        "state",
        "nonce",
        "sid",
        "session",
        "sessions",
        "auth",
        "pkce",
        "signature",
        "sig",
        "hmac",
    }
)

#: Words that, next to ``code``, say the code is not a secret (``error_code``,
#: ``status_code``): their text values are kept.
_HARMLESS_CODE_WORDS: FrozenSet[str] = frozenset(
    {"status", "error", "http", "exit", "response", "reason", "country", "language", "lang"}
)

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")

_SECRET, _WEAK, _PLAIN = 2, 1, 0


_sensitivity: Dict[str, int] = {}


def key_sensitivity(name: str) -> int:
    """
    How secret a field named ``name`` is.

    :return: 2 if its value is always hidden, 1 if text values are hidden
        (numbers kept), 0 if the name says nothing.
    """
    level = _sensitivity.get(name)
    if level is None:
        level = _key_sensitivity(name)
        if len(_sensitivity) < 4096:
            _sensitivity[name] = level
    return level


def _key_sensitivity(name: str) -> int:
    compact = _NOT_ALNUM.sub("", name.lower())
    for strong in STRONG_NAMES:
        if strong in compact:
            return _SECRET
    words = [w.lower() for w in _WORD_SPLIT.split(name) if w]
    if SECRET_WORDS.intersection(words):
        return _SECRET
    for word in words:
        if word in WEAK_WORDS:
            if word in ("code", "codes") and _HARMLESS_CODE_WORDS.intersection(words):
                continue
            return _WEAK
    return _PLAIN


# ---------------------------------------------------------------------------
# Text patterns.

_B64 = r"A-Za-z0-9_\-"

# Each kind of secret has its own pattern, tried only when a cheap substring
# test says it may match: one combined pattern costs ~20 us on an access-log
# line in CPython, these cost a few.

#: A JWT / JWS / JWE in compact form (header and payload start "eyJ").
_JWT = re.compile(
    r"(?<![A-Za-z0-9_\-])eyJ[" + _B64 + r"]{2,}\.[" + _B64 + r"]{2,}(?:\.[" + _B64 + r"]+){0,3}"
)
#: A password in a URL's user info: scheme://user:password@host.
_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@'\"]*:)[^/\s@'\"]+(?=@)")
#: Header lines whose whole value is secret.
_HEADER_WORDS = (
    "authorization",
    "cookie",
    "x-api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-xsrf-token",
)
_HEADER = re.compile(
    r"(?<![A-Za-z0-9_\-])(?P<head>(?i:(?:proxy-)?authorization|set-cookie|cookie|x-api-key"
    r"|x-auth-token|x-csrf-token|x-xsrf-token)\s*:[ \t]*)[^\r\n'\"\]]+"
)
#: Credentials after an authentication scheme.
_SCHEME_WORDS = ("bearer", "basic", "digest", "negotiate", "ntlm", "hmac")
_SCHEME = re.compile(
    r"(?<![A-Za-z0-9_\-])(?P<head>(?i:bearer|basic|digest|negotiate|ntlm|hmac)\s+)"
    r"(?P<cred>[A-Za-z0-9._~+/\-]{6,}=*)"
)
#: What follows ``key=`` or ``"key": ``: a quoted string or a bare word.
_VALUE = re.compile(
    r"\[?\s*b?(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\s&;,'\"()\[\]{}<>]+)"
)
_SEPARATOR = re.compile(r"[:=]")
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
#: Long runs of base64 / hex characters: session ids, keys, opaque tokens.
_RUN = re.compile(r"(?<![A-Za-z0-9_+/\-])[A-Za-z0-9_+/\-]{16,}=*(?![A-Za-z0-9_+/\-])")

_SCHEMES_ALWAYS = ("bearer",)
_MIN_RANDOM = 16


def looks_random(text: str) -> bool:
    """
    Whether ``text`` (a run of 16 or more base64 or hex characters) looks
    like a key, a token or a session id rather than a word or a name.

    Names (``ConnectionRefusedError``, ``HTTP11ClientProtocol``) are mostly
    made of lower-case runs of three letters or more with vowels in them;
    random strings rarely are.  A random string mixes upper case, lower case
    and digits, or is long hexadecimal, or long lower case with digits.

    Measured on random base64url strings, the share *not* recognised is 0
    for 32 random bytes and more, ~0.1 % for 24, ~0.5 % for 16 and ~2.5 %
    for 12; on 1,392 identifiers of 16+ characters from Twisted and the
    standard library, 16 are taken for random.  Secrets that short are
    caught by their names (``sid=...``, a ``state`` field) instead.
    """
    n = len(text)
    if not text.strip("0123456789abcdef") or not text.strip("0123456789ABCDEF"):
        # Hexadecimal: a key or a digest when long, a short id otherwise.
        return n >= 32 and sum(c.isdigit() for c in text) >= 4
    upper = lower = digits = wordy = run = vowels = 0
    for c in text:
        if "a" <= c <= "z":
            lower += 1
            run += 1
            if c in "aeiouy":
                vowels += 1
            continue
        if run >= 3 and vowels * 4 >= run:
            wordy += run
        run = vowels = 0
        if "A" <= c <= "Z":
            upper += 1
        elif "0" <= c <= "9":
            digits += 1
    if run >= 3 and vowels * 4 >= run:
        wordy += run
    if wordy >= 0.5 * n:
        return False
    if upper >= 2 and lower >= 2 and digits >= 2:
        return True
    if upper >= 0.2 * n and lower >= 0.2 * n:
        return True
    return n >= 24 and digits >= 3 and lower >= 3 and "-" not in text and "_" not in text


def _unquote(value: str) -> str:
    value = value.lstrip("[ b")
    if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
        return value[1:-1]
    return value


def _scheme(match: re.Match[str]) -> str:
    head, cred = match.group("head"), match.group("cred")
    if head.strip().lower() in _SCHEMES_ALWAYS or len(cred) >= 16 or looks_random(cred):
        return head + REDACTED
    return match.group(0)


def _run(match: re.Match[str]) -> str:
    return REDACTED if looks_random(match.group(0)) else match.group(0)


def _pairs(text: str) -> str:
    """
    Redact the values of ``key=value`` / ``key: value`` / ``"key": "value"``
    pairs whose key names a secret.
    """
    pieces: List[str] = []
    done = 0
    for sep in _SEPARATOR.finditer(text):
        at = sep.start()
        if at < done:
            continue
        # The key ends before optional blanks and a closing quote.
        end = at
        while end > done and text[end - 1] in " \t":
            end -= 1
        quoted = end > done and text[end - 1] in "\"'"
        if quoted:
            end -= 1
        start = end
        while start > done and end - start < 64 and text[start - 1] in _KEY_CHARS:
            start -= 1
        while start < end and not text[start].isalpha():
            start += 1
        if start == end:
            continue
        key = text[start:end]
        level = key_sensitivity(key)
        if level == _PLAIN:
            continue
        if level == _WEAK and not quoted and text[at] != "=":
            # "sessions: memory cache" is prose; "state=..", "'code': .."
            # and '"sid": ..' are data.
            continue
        value_at = sep.end()
        while value_at < len(text) and text[value_at] in " \t":
            value_at += 1
        value = _VALUE.match(text, value_at)
        if value is None:
            continue
        if level == _WEAK:
            inner = _unquote(value.group(0))
            if inner.isdigit() and len(inner) <= 5:
                continue
        pieces.append(text[done:value_at])
        pieces.append(REDACTED)
        done = value.end()
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def redact_text(text: str) -> str:
    """
    ``text`` with everything that looks secret replaced by ``<redacted>``.
    """
    if len(text) < 8:
        return text
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "://" in text:
        text = _URL.sub(lambda m: m.group("head") + REDACTED, text)
    lower = text.lower()
    for word in _HEADER_WORDS:
        if word in lower:
            text = _HEADER.sub(lambda m: m.group("head") + REDACTED, text)
            break
    for word in _SCHEME_WORDS:
        if word in lower:
            text = _SCHEME.sub(_scheme, text)
            break
    if "=" in text or ":" in text:
        text = _pairs(text)
    if len(text) >= _MIN_RANDOM:
        text = _RUN.sub(_run, text)
    return text


# ---------------------------------------------------------------------------
# Failures.


class RedactedException(Exception):
    """
    Stands in for an exception whose message was redacted.
    """


class RedactedFailure(Failure):
    """
    A `Failure` of the original exception type whose message and traceback
    were redacted; it has no frames, locals or globals.

    :ivar redacted_traceback: the original traceback's text, redacted.
    """

    redacted_traceback: str

    def getTraceback(self, elideFrameworkCode: int = 0, detail: str = "default") -> str:
        return self.redacted_traceback

    def getBriefTraceback(self) -> str:
        return self.redacted_traceback

    def printTraceback(
        self, file: Any = None, elideFrameworkCode: Any = False, detail: str = "default"
    ) -> None:
        if file is not None:
            file.write(self.redacted_traceback)

    def getErrorMessage(self) -> str:
        return safe_str(self.value)


def redact_failure(failure: Failure) -> RedactedFailure:
    """
    A `RedactedFailure` standing in for ``failure``.
    """
    if isinstance(failure, RedactedFailure):
        return failure
    try:
        traceback = failure.getTraceback()
    except Exception as e:  # a broken __str__ must not stop the log
        traceback = f"(traceback unavailable: {safe_str(e)})\n"
    message = redact_text(safe_str(failure.value))
    try:
        stand_in = RedactedFailure(RedactedException(message), failure.type)
    except Exception:  # pragma: no cover - exc_type that is not a class
        stand_in = RedactedFailure(RedactedException(message))
    stand_in.redacted_traceback = _redact_traceback(traceback)
    return stand_in


def _redact_traceback(traceback: str) -> str:
    """
    Redact a traceback's messages but not its frames: a frame's file, line,
    function name and source line are code, and function names are what a
    reader needs (some look random to `looks_random`).  Everything from the
    first line that is not part of the frame list on (the exception and its
    message, which may span lines) is redacted.
    """
    lines = traceback.split("\n")
    out: List[str] = []
    source_next = False
    for i, line in enumerate(lines):
        if line.startswith('  File "'):
            source_next = True
        elif source_next and line.startswith("    "):
            source_next = False
        elif line.startswith(("Traceback (most recent call last)", "--- <exception caught here> ---")):
            source_next = False
        else:
            out.extend(redact_text(rest) for rest in lines[i:])
            break
        out.append(line)
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Events.

_LEVEL_KEYS = ("log_level", "log_namespace", "log_time")
_DROPPED = frozenset(
    {"log_logger", "log_source", "log_flattened", "log_trace", "log_format", "log_failure"}
)
_SCALARS = (int, float, bool, type(None))
#: Keys of events from ``twisted.python.log`` that the rendered text already
#: carries (the message, a failure's traceback, the system).
_LEGACY = frozenset({"message", "format", "failure", "why", "time", "system", "isError", "printed"})


@attr.s(frozen=True, kw_only=True)
class Redactor:
    """
    Makes redacted copies of log events.

    :ivar max_depth: containers nested deeper are replaced by a marker.
    :ivar max_items: containers are cut after this many items.
    :ivar max_chars: strings are cut after this many characters (after
        redaction, so a secret is never cut in half and missed).
    :ivar extra_names: more field-name substrings that always mean a secret.
    """

    max_depth: int = attr.ib(default=6)
    max_items: int = attr.ib(default=100)
    max_chars: int = attr.ib(default=16_384)
    extra_names: FrozenSet[str] = attr.ib(default=frozenset(), converter=frozenset)
    _cache: Dict[str, int] = attr.ib(factory=dict, init=False, repr=False, eq=False)

    def sensitivity(self, name: str) -> int:
        """
        `key_sensitivity`, with ``extra_names`` and a cache.
        """
        level = self._cache.get(name)
        if level is None:
            level = key_sensitivity(name)
            if level != _SECRET and self.extra_names:
                compact = _NOT_ALNUM.sub("", name.lower())
                if any(extra in compact for extra in self.extra_names):
                    level = _SECRET
            if len(self._cache) < 4096:
                self._cache[name] = level
        return level

    def text(self, value: str) -> str:
        """
        Redact and cut one string.
        """
        value = redact_text(value)
        if len(value) > self.max_chars:
            value = value[: self.max_chars] + f"...[{len(value) - self.max_chars} more characters]"
        return value

    def value(self, value: Any, depth: int = 0) -> Any:
        """
        A redacted, JSON-safe copy of ``value``.
        """
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.text(bytes(value).decode("utf-8", "replace"))
        if isinstance(value, LogLevel):
            return value.name
        if isinstance(value, Failure):
            failure = redact_failure(value)
            return {
                "type": qual(failure.type) if isinstance(failure.type, type) else "?",
                "message": failure.getErrorMessage(),
                "traceback": failure.getTraceback(),
            }
        if depth >= self.max_depth:
            return "<nested too deeply>"
        if isinstance(value, dict):
            return self._mapping(value.items(), depth)
        if isinstance(value, (list, tuple, set, frozenset)):
            return self._sequence(value, depth)
        headers = _headers_items(value)
        if headers is not None:
            return self._mapping(headers, depth)
        return self.text(safe_repr(value))

    def field(self, name: str, value: Any, depth: int = 0) -> Any:
        """
        The redacted value of a field called ``name``.
        """
        level = self.sensitivity(name)
        if level == _SECRET:
            return value if value is None or isinstance(value, bool) else REDACTED
        if level == _WEAK:
            return value if isinstance(value, _SCALARS) else REDACTED
        return self.value(value, depth)

    def _mapping(self, items: Iterable[Tuple[Any, Any]], depth: int) -> Dict[str, Any]:
        result: Dict[str, Any] = {}
        for i, (key, value) in enumerate(items):
            if i >= self.max_items:
                result["..."] = "more items not shown"
                break
            if isinstance(key, (bytes, bytearray)):
                key = bytes(key).decode("utf-8", "replace")
            name = key if isinstance(key, str) else safe_repr(key)
            shown = self.text(name)
            if shown in result:
                # Two keys redacted alike: keep both entries.
                shown = f"{shown}#{i}"
            result[shown] = self.field(name, value, depth + 1)
        return result

    def _sequence(self, items: Any, depth: int) -> Any:
        result: List[Any] = []
        for i, item in enumerate(items):
            if i >= self.max_items:
                result.append("...more items not shown")
                break
            pair_name = _pair_name(item)
            if pair_name is not None:
                result.append([self.text(pair_name), self.field(pair_name, item[1], depth + 1)])
            else:
                result.append(self.value(item, depth + 1))
        return result

    def _render(self, form: Any, fields: Dict[str, Any]) -> str:
        """
        Render a format string from ``fields`` and redact the text.
        """
        if isinstance(form, str) and "()" not in form:
            # str.format_map does what Twisted's formatter does (attribute
            # and index look-ups) except "{f()}" calls, several times faster.
            try:
                return self.text(form.format_map(fields))
            except Exception:  # noqa: S110 - formatEvent says what went wrong
                pass
        return self.text(formatEvent(fields))

    def message(self, event: LogEvent) -> str:
        """
        The event's message, rendered without its secret fields and redacted.
        """
        text: str = self.redact_event(event)["log_text"]
        return text

    def redact_event(self, event: LogEvent) -> Dict[str, Any]:
        """
        A redacted copy of ``event``: see the module docstring.

        The message is rendered from a copy of the event whose secret fields
        are replaced and whose containers are redacted, but whose other
        objects are the originals (for ``{request.uri}``-style look-ups);
        the rendered text is then redacted.  The copy's ``log_format`` is
        that text (braces escaped), its ``log_failure`` a `RedactedFailure`,
        and every other field a JSON-safe redacted value; ``log_level``,
        ``log_namespace`` and ``log_time`` are kept.
        """
        render: Dict[str, Any] = {}
        out: Dict[str, Any] = {}
        legacy = event.get("log_namespace") == "log_legacy"
        cache = self._cache
        for name, value in event.items():
            if name[:4] == "log_":
                if name in _LEVEL_KEYS:
                    out[name] = render[name] = value
                elif name in _DROPPED:
                    if name != "log_flattened" and name != "log_trace":
                        render[name] = value
                elif name != "log_text":
                    render[name] = value
                    out[name] = self.value(value)
                else:
                    render[name] = value
                continue
            if legacy and name in _LEGACY:
                render[name] = value
                continue
            level = cache.get(name)
            if level is None:
                level = self.sensitivity(name)
            if value is None or value is True or value is False:
                out[name] = render[name] = value
            elif level == _SECRET or (level == _WEAK and not isinstance(value, _SCALARS)):
                out[name] = render[name] = REDACTED
            elif isinstance(value, str):
                render[name] = value
                out[name] = self.text(value) if len(value) >= 8 else value
            elif isinstance(value, _SCALARS):
                out[name] = render[name] = value
            else:
                redacted = self.value(value)
                out[name] = redacted
                render[name] = redacted if isinstance(redacted, (dict, list)) else value
        rendered = self._render(event.get("log_format"), render)
        out["log_format"] = rendered.replace("{", "{{").replace("}", "}}")
        out["log_text"] = rendered
        failure = event.get("log_failure")
        if isinstance(failure, BaseException):
            failure = Failure(failure)
        if isinstance(failure, Failure):
            out["log_failure"] = redact_failure(failure)
        elif failure is not None:
            out["log_failure_text"] = self.value(failure)
        return out

    def wrap(self, observer: Callable[[LogEvent], None]) -> RedactingObserver:
        """
        An observer that hands ``observer`` redacted copies: for a host
        program's own observers, so they see what twistauth's see.
        """
        return RedactingObserver(redactor=self, observer=observer)


@implementer(ILogObserver)
@attr.s(frozen=True, kw_only=True)
class RedactingObserver:
    """
    Passes a redacted copy of every event to ``observer``.
    """

    redactor: Redactor = attr.ib()
    observer: Callable[[LogEvent], None] = attr.ib()

    def __call__(self, event: LogEvent) -> None:
        self.observer(self.redactor.redact_event(event))


def _pair_name(item: Any) -> Optional[str]:
    """
    The name of a ``(name, value)`` pair, e.g. one raw header.
    """
    if isinstance(item, (tuple, list)) and len(item) == 2:
        name = item[0]
        if isinstance(name, (bytes, bytearray)):
            return bytes(name).decode("latin-1")
        if isinstance(name, str):
            return name
    return None


def _headers_items(value: Any) -> Optional[Iterable[Tuple[Any, Any]]]:
    """
    The items of a Twisted ``Headers`` object, else ``None``.
    """
    get = getattr(value, "getAllRawHeaders", None)
    if get is None or not callable(get):
        return None
    try:
        return list(get())
    except Exception:
        return None
