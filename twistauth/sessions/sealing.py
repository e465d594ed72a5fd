"""
Sealing: authenticated encryption of small JSON payloads for the client to
carry (a client-side session in a cookie or header).

Modelled on itsdangerous's key list, with AES-GCM (from ``cryptography``)
instead of a bare signature, so the client can neither read nor change what
it carries.  A sealed value is URL-safe base64 (no padding) of::

    version (1 byte) | key id (4 bytes) | nonce (12 random bytes) | ciphertext + tag (16)

- **Keys** are exactly 32 random bytes (AES-256); a passphrase is refused.
  A `Keyring` holds them newest first: the newest seals, any opens, so a
  key is rotated by deploying it second (open-only) everywhere, then first.
  A key's id is derived from the key itself (a hash), so it needs no
  configuration and does not change when the list is reordered.
- **Purpose**: the associated data is the purpose (e.g. the cookie's name),
  the version and the key id.  A value sealed for one purpose does not open
  for another, so a blob cannot be moved from one cookie or header into
  another.
- **Time** is inside the seal: ``iat`` (when sealed) and ``exp`` (until when
  it opens), checked against the caller's clock; a value from more than
  ``max_future_skew`` seconds in the future is refused too.  A cookie's
  ``Max-Age`` is never trusted.
- **Payload** is JSON, never pickle: opening a value never runs code.
- **Nonces** are 12 random bytes per seal; rotate a key long before 2**32
  seals (the NIST SP 800-38D bound for random nonces).

`Sealer.open` answers ``None`` for anything that does not open (tampered,
truncated, too short, unknown version or key, wrong purpose, expired, from
the future): to a client these all mean "no session", never an error.
`Sealer.unseal` raises the `BadSeal` subclass that says why, for tests and
diagnostics.

A `Sealer` remembers the plaintext of the values it opened last (see
`Sealer._open`): a client presents the same value on every request until it
is sealed again, and decrypting it once more would give the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import attr
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The envelope format this module writes.
VERSION = 1
#: Key size in bytes (AES-256).
KEY_BYTES = 32
#: Bytes of a key's id in the envelope.
KEY_ID_BYTES = 4
#: Bytes of the random nonce.
NONCE_BYTES = 12
#: Bytes of the GCM tag.
TAG_BYTES = 16
#: The smallest possible sealed value, in bytes before base64.
MIN_SEALED_BYTES = 1 + KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES

_KEY_END = 1 + KEY_ID_BYTES
_HEADER = _KEY_END + NONCE_BYTES
#: The URL-safe base64 alphabet, each character at the index of its value.
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_ALPHABET_BYTES = _ALPHABET.encode("ascii")
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
#: By ``len(text) % 4``: the padding `binascii.a2b_base64` needs, and the
#: characters a canonical text may end with.  A text of ``4n + 2``
#: characters holds ``3n + 1`` bytes, so the low 4 bits of its last
#: character are unused; one of ``4n + 3`` holds ``3n + 2`` bytes, leaving 2
#: bits unused (one of ``4n`` has none; one of ``4n + 1`` is never base64).
#: The encoder writes unused bits as zeros and a decoder ignores them, so
#: up to 16 texts decode to the same bytes: only the one with zeros is
#: canonical, the one re-encoding the bytes gives back.
_PADDING = (b"", b"", b"==", b"=")
_CANONICAL_LAST = (
    _ALPHABET,
    "",
    "".join(c for i, c in enumerate(_ALPHABET) if i & 0b1111 == 0),
    "".join(c for i, c in enumerate(_ALPHABET) if i & 0b11 == 0),
)
_B64_KEY = re.compile(r"\A[A-Za-z0-9+/_-]+={0,2}\Z")
#: Fewer distinct byte values than this in 32 bytes means "not random"
#: (a random key has about 30; fewer than 12 happens with probability
#: below 2**-100).
_MIN_DISTINCT_KEY_BYTES = 12


class KeyringError(ValueError):
    """
    A sealing key is unusable: not exactly 32 bytes, not random-looking, a
    duplicate, or unreadable.  The message never contains the key.
    """


class BadSeal(Exception):
    """
    A value did not open.  Never shown to a client: `Sealer.open` turns
    every `BadSeal` into ``None``.
    """


class MalformedSeal(BadSeal):
    """Not URL-safe base64, too long, or too short to hold an envelope."""


class UnknownVersion(BadSeal):
    """The envelope's version byte is not one this module reads."""


class UnknownKey(BadSeal):
    """Sealed with a key that is not in the keyring (removed, or foreign)."""


class TamperedSeal(BadSeal):
    """The tag does not verify: changed, truncated, or sealed for another purpose."""


class ExpiredSeal(BadSeal):
    """Past the ``exp`` sealed inside it."""


class FutureSeal(BadSeal):
    """Sealed (``iat``) further in the future than the allowed clock skew."""


def generate_key() -> str:
    """
    A new random key, as the URL-safe base64 text `decode_key` reads.
    """
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def check_key(key: bytes) -> bytes:
    """
    Refuse a key that is not exactly `KEY_BYTES` random-looking bytes.

    :raises KeyringError: with a message that says what is wrong (and never
        the key).
    """
    if not isinstance(key, bytes):
        raise KeyringError(f"a sealing key must be bytes, not {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise KeyringError(
            f"a sealing key must be exactly {KEY_BYTES} random bytes, got {len(key)} bytes; "
            "make one with: python3 -c "
            "'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'"
        )
    if len(set(key)) < _MIN_DISTINCT_KEY_BYTES:
        raise KeyringError("a sealing key must be random bytes, not a pattern or a passphrase")
    return key


def decode_key(spec: str) -> bytes:
    """
    Read one key from its configured form: base64 (standard or URL-safe,
    padding optional) of exactly 32 bytes, or ``file:PATH`` naming a file
    that holds such text (the file keeps the key out of the configuration
    and the command line).

    :raises KeyringError: unreadable file, not base64, or not a valid key.
    """
    where = "sealing key"
    text = spec.strip()
    if text.startswith("file:"):
        path = text[len("file:") :]
        where = f"sealing key file {path!r}"
        try:
            with open(path, "rb") as f:
                raw = f.read(1024)
        except OSError as e:
            raise KeyringError(f"cannot read {where}: {e.strerror}") from None
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise KeyringError(f"{where} must hold the key as base64 text") from None
    if not _B64_KEY.match(text):
        raise KeyringError(f"{where} is not base64 text")
    normalised = text.rstrip("=").replace("+", "-").replace("/", "_")
    try:
        key = base64.urlsafe_b64decode(normalised + "=" * (-len(normalised) % 4))
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where} is not base64 text") from None
    try:
        return check_key(key)
    except KeyringError as e:
        raise KeyringError(f"{where}: {e}") from None


def load_keys(specs: Iterable[str]) -> List[bytes]:
    """
    Read every configured key (newest first), as `decode_key` does.
    """
    return [decode_key(spec) for spec in specs]


def key_tuple(keys: Iterable[bytes]) -> Tuple[bytes, ...]:
    """
    Keys as a tuple (an attrs converter that type checkers follow).
    """
    return tuple(keys)


def key_id(key: bytes) -> bytes:
    """
    The id a key is known by in the envelope: the first `KEY_ID_BYTES` of a
    domain-separated SHA-256 of the key (it reveals nothing usable about the
    key, and needs no configuration).
    """
    return hashlib.sha256(b"twistauth sealing key id\x00" + key).digest()[:KEY_ID_BYTES]


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """
    Strict URL-safe base64 without padding: exactly one text per value, so
    no change to the text leaves the value opening.

    Refused: any character outside the URL-safe alphabet (padding,
    whitespace, ``+`` and ``/`` included), a length of ``4n + 1`` (never
    base64), and a last character with unused bits set (see
    `_CANONICAL_LAST`).  Checking those bits is the same as re-encoding the
    bytes and comparing, without the second pass; and `binascii` alone
    would skip characters outside its alphabet instead of refusing them,
    hence the check that removing every alphabet character leaves nothing.
    """
    rest = len(text) & 3
    if rest == 1 or not text.isascii():
        raise MalformedSeal("not URL-safe base64")
    data = text.encode("ascii")
    if data.translate(None, _ALPHABET_BYTES):
        raise MalformedSeal("not URL-safe base64")
    if rest and text[-1] not in _CANONICAL_LAST[rest]:
        raise MalformedSeal("not canonical base64")
    try:
        return binascii.a2b_base64(data.translate(_TO_STANDARD) + _PADDING[rest])
    except binascii.Error:  # pragma: no cover - every input is checked above
        raise MalformedSeal("not URL-safe base64") from None


@attr.s(eq=False, repr=False)
class Keyring:
    """
    Sealing keys, newest first: the first seals, every one opens.

    :param keys: the keys, each exactly 32 random bytes (see `check_key`).
    :raises KeyringError: no keys, a bad key, or the same key twice.
    """

    keys: Sequence[bytes] = attr.ib(converter=key_tuple)
    _ciphers: Dict[bytes, AESGCM] = attr.ib(init=False, factory=dict)
    _purposes: Dict[str, PurposeKeys] = attr.ib(init=False, factory=dict)
    sealing_id: bytes = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        if not self.keys:
            raise KeyringError("at least one sealing key is needed")
        for key in self.keys:
            check_key(key)
            ident = key_id(key)
            if ident in self._ciphers:
                raise KeyringError("the same sealing key (or key id) is configured twice")
            self._ciphers[ident] = AESGCM(key)
        self.sealing_id = key_id(self.keys[0])

    def for_purpose(self, purpose: str) -> PurposeKeys:
        """
        The keys bound to ``purpose``, made on first use and kept: each
        seal or open then costs a dictionary lookup instead of building its
        associated data (and, on PyPy, handing a new bytes object to
        ``cryptography``).

        A program uses a handful of fixed purposes; should one pass an
        unbounded variety, the kept ones are dropped when there are
        `MAX_PURPOSES`, so memory stays bounded either way.
        """
        keys = self._purposes.get(purpose)
        if keys is None:
            if len(self._purposes) >= MAX_PURPOSES:
                self._purposes.clear()
            keys = self._purposes[purpose] = PurposeKeys(self, purpose)
        return keys

    def __repr__(self) -> str:
        return f"<Keyring {len(self.keys)} key(s)>"


#: How many purposes a `Keyring` keeps bound (see `Keyring.for_purpose`).
MAX_PURPOSES = 64


class PurposeKeys:
    """
    A `Keyring`'s keys bound to one purpose: everything about sealing and
    opening that does not change from one value to the next.

    :ivar openers: for each key id, the key's cipher, the associated data
        of a value sealed with it for this purpose, and whether that key is
        not the newest (a value it opens should be sealed again).
    :ivar cipher: the cipher of the sealing (newest) key.
    :ivar header: what every value sealed for this purpose starts with: the
        version and the sealing key's id.
    :ivar aad: the associated data of a value sealed for this purpose now.
    """

    __slots__ = ("openers", "cipher", "header", "aad")

    def __init__(self, keyring: Keyring, purpose: str) -> None:
        self.openers: Dict[bytes, Tuple[AESGCM, bytes, bool]] = {
            ident: (cipher, _aad(purpose, VERSION, ident), ident != keyring.sealing_id)
            for ident, cipher in keyring._ciphers.items()
        }
        self.cipher, self.aad, _ = self.openers[keyring.sealing_id]
        self.header = bytes([VERSION]) + keyring.sealing_id

    def __repr__(self) -> str:
        return f"<PurposeKeys {len(self.openers)} key(s)>"


@attr.s(frozen=True, slots=True)
class Opened:
    """
    A value that opened.

    :ivar payload: the JSON payload.
    :ivar issued_at: when it was sealed (``iat``).
    :ivar expires_at: until when it opens (``exp``).
    :ivar stale_key: it was sealed with a key other than the newest: seal it
        again so the old key can be retired.
    """

    payload: Any = attr.ib()
    issued_at: float = attr.ib()
    expires_at: float = attr.ib()
    stale_key: bool = attr.ib()


def _aad(purpose: str, version: int, ident: bytes) -> bytes:
    return b"twistauth seal\x00" + purpose.encode("utf-8") + b"\x00" + bytes([version]) + ident


#: The one JSON form of a plaintext: compact, UTF-8, no NaN or infinity
#: (made once: ``json.dumps`` with options builds an encoder per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


#: How many opened values a `Sealer` remembers (see `Sealer._open`): about
#: a kilobyte each for a session.
MAX_OPENED = 4096


@attr.s(kw_only=True, eq=False)
class Sealer:
    """
    Seals and opens JSON payloads with a `Keyring`.

    :param keyring: the keys.
    :param max_future_skew: seconds a value's ``iat`` may lie ahead of the
        opener's clock (another process's clock may run ahead).
    :param max_length: the longest text `unseal` decodes at all.
    """

    keyring: Keyring = attr.ib()
    max_future_skew: float = attr.ib(default=300.0)
    max_length: int = attr.ib(default=16384)
    _opened: Dict[str, Tuple[PurposeKeys, bytes, bool]] = attr.ib(
        init=False, factory=dict, repr=False
    )

    def seal(self, payload: Any, *, purpose: str, now: float, lifetime: float) -> str:
        """
        Seal ``payload`` for ``purpose``, to open until ``now + lifetime``.

        :raises TypeError: the payload is not JSON-serialisable.
        """
        try:
            plaintext = _ENCODER.encode({"iat": now, "exp": now + lifetime, "p": payload})
        except ValueError as e:
            raise TypeError(f"the payload is not JSON-serialisable: {e}") from None
        keys = self.keyring.for_purpose(purpose)
        nonce = os.urandom(NONCE_BYTES)
        sealed = keys.cipher.encrypt(nonce, plaintext.encode("utf-8"), keys.aad)
        return _b64encode(keys.header + nonce + sealed)

    def unseal(self, token: str, *, purpose: str, now: float) -> Opened:
        """
        Open a sealed value.

        :raises BadSeal: the subclass that says why it does not open.
        """
        payload, iat, exp, stale = self._open(token, purpose, now)
        return Opened(payload=payload, issued_at=iat, expires_at=exp, stale_key=stale)

    def open(self, token: str, *, purpose: str, now: float) -> Optional[Opened]:
        """
        Open a sealed value, or answer ``None`` if it does not open for any
        reason (see `unseal`); never raises for bad input.
        """
        try:
            return self.unseal(token, purpose=purpose, now=now)
        except BadSeal:
            return None

    def open_payload(self, token: str, *, purpose: str, now: float) -> Optional[Tuple[Any, bool]]:
        """
        What `open` answers, as ``(payload, stale_key)``, or ``None``: the
        same checks without building an `Opened`, for a caller that opens a
        value per request and needs neither of its times.
        """
        try:
            payload, _, _, stale = self._open(token, purpose, now)
        except BadSeal:
            return None
        return payload, stale

    def _open(self, token: str, purpose: str, now: float) -> Tuple[Any, float, float, bool]:
        """
        ``(payload, iat, exp, stale_key)`` of a value that opens.

        A value that opened is remembered as its plaintext, with the keys
        of the purpose it opened for (at most `MAX_OPENED` values, all
        forgotten when there are more).  The very same text presented for
        the same purpose and keys then skips the base64 and the
        decryption, which would give the same bytes again; any other text,
        purpose or keyring is decrypted.  On PyPy that is most of the cost
        of a client-side session: each ``cryptography`` call goes through
        cpyext, which calls back into Python for every buffer argument and
        moves each new buffer out of the nursery.  The rest is done on
        every open: the payload is decoded again (each caller gets objects
        of its own) and the times are checked against ``now`` (an expired
        value is forgotten).  The text is looked up as the memory cache
        looks up a session id: a dictionary compares it only with a text
        of the same hash.

        :raises BadSeal: the subclass that says why it does not open.
        """
        if not isinstance(token, str) or len(token) > self.max_length:
            raise MalformedSeal("not a string of acceptable length")
        keys = self.keyring.for_purpose(purpose)
        known = self._opened.get(token)
        if known is not None and known[0] is keys:
            _, plaintext, stale = known
        else:
            known = None
            plaintext, stale = _decrypt(token, keys)
        iat, exp, payload = _parse(plaintext)
        if iat > now + self.max_future_skew:
            raise FutureSeal("sealed in the future")
        if exp <= now:
            if known is not None:
                del self._opened[token]
            raise ExpiredSeal("expired")
        if known is None:
            if len(self._opened) >= MAX_OPENED:
                self._opened.clear()
            self._opened[token] = (keys, plaintext, stale)
        return payload, iat, exp, stale


def _decrypt(token: str, keys: PurposeKeys) -> Tuple[bytes, bool]:
    """
    The plaintext of a value sealed for the purpose of ``keys``, and
    whether it was sealed with a key other than the newest.

    :raises BadSeal: the subclass that says why it does not open.
    """
    raw = _b64decode(token)
    if len(raw) < MIN_SEALED_BYTES:
        raise MalformedSeal("too short")
    version = raw[0]
    if version != VERSION:
        raise UnknownVersion(f"version {version}")
    opener = keys.openers.get(raw[1:_KEY_END])
    if opener is None:
        raise UnknownKey("not sealed with a key of this keyring")
    cipher, aad, stale = opener
    try:
        return cipher.decrypt(raw[_KEY_END:_HEADER], raw[_HEADER:], aad), stale
    except InvalidTag:
        raise TamperedSeal("the tag does not verify") from None


def _json_loads(text: str) -> Any:
    """
    `json.loads`, minus its option checks and the two whitespace matches
    around the document when ``text`` is one compact JSON document (every
    plaintext `Sealer.seal` writes): about a fifth of the cost of decoding
    a session on CPython.  Anything else (whitespace around the document,
    data after it, not JSON) is left to `json.loads`, so the answer (or
    the error) is always the one `json.loads` gives.

    Only on CPython (see `_loads`): PyPy's `json.loads` has a built-in
    decoder that a `json.JSONDecoder` does not use.
    """
    try:
        value, end = _raw_decode(text)
    except ValueError:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


_raw_decode = json.JSONDecoder().raw_decode
_loads = json.loads if sys.implementation.name == "pypy" else _json_loads


def _parse(plaintext: bytes) -> Tuple[float, float, Any]:
    # Only reached for a value that verified, i.e. one we sealed; still
    # checked, so a bug elsewhere cannot turn into an exception here.
    try:
        inner = _loads(plaintext.decode("utf-8"))
        iat, exp = float(inner["iat"]), float(inner["exp"])
        return iat, exp, inner["p"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise TamperedSeal("the sealed payload is not ours") from None
