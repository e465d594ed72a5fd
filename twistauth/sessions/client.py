"""
The client-side session cache: the whole session travels, sealed, in the
client's cookie or header (Toto's ClientCache, done right).

The token is the session sealed by `twistauth.sessions.sealing` (AES-GCM,
versioned envelope, key id, random nonce, expiry inside, JSON inside).  What
this cache adds:

- **Purpose**: the carrier's name (cookie or header) is the sealing
  purpose, so a token minted for one carrier, or by another use of the same
  keys, does not open here.  Make one cache per carrier.
- **Timeouts** from the sealed ``created`` and ``last_seen``, on the
  injected clock; the seal itself expires when the session would.
- **Touch and re-seal**: a load marks the session `Session.dirty` when its
  recorded use is older than a fraction of the idle timeout, or when it was
  sealed with an old key; the transport saves every dirty session, so such
  a session gets a fresh token (with the newest key) on that response.  An
  old key can be retired once no token sealed with it can still be live
  (one absolute timeout after the new key became the first).
- **Size**: a token longer than the carrier can hold is refused with
  `SessionTooLargeError`, which names the server-side caches, never
  silently dropped by a browser.
- **Revocation**: logout, "log out everywhere" and back-channel logout
  write a record to an `IRevocations` store (memory for one process, Redis
  for several), which every load and save checks, so a copied or replayed
  token stops working.  That costs one store lookup per load: the price of
  revocable client-side sessions.

Concurrent requests of one session each carry their own copy: the last
token the client keeps wins, so unlike the server-side caches two requests
that change different keys at once do not both keep their change.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import attr
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth._fired import PENDING, fired_value
from twistauth.sessions._common import Timeouts, load_session, new_id, new_session
from twistauth.sessions._interfaces import IRevocations, ISessionCache, Session
from twistauth.sessions.errors import SessionTooLargeError
from twistauth.sessions.sealing import Keyring, Sealer, key_tuple

#: Cookie name plus value: what browsers keep (RFC 6265 asks for at least
#: 4096 bytes; a margin for the attributes).
DEFAULT_SIZE_LIMIT = 4000


def _provides(interface: Any) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name} must provide {interface.__name__}, got {value!r}")

    return check


@implementer(ISessionCache)
@attr.s(kw_only=True, eq=False)
class ClientSessionCache:
    """
    Sessions sealed into the token the client holds.

    :param keys: sealing keys, newest first (each exactly 32 random bytes;
        see `twistauth.sessions.sealing.load_keys`): the first seals, all
        open.
    :param revocations: where ended sessions are remembered.
    :param clock: the time source for creation, use, expiry and sealing.
    :param idle_timeout: seconds a session lives unused.
    :param absolute_timeout: seconds a session lives at most.
    :param touch_fraction: a use is recorded (a new token issued) only when
        the recorded one is older than this fraction of ``idle_timeout``.
    :param carrier_name: the cookie or header name the token travels in:
        the sealing purpose, and counted in ``size_limit``.
    :param size_limit: the most bytes of carrier name plus token.
    :param max_future_skew: seconds a token's sealing time may lie ahead of
        this clock.
    """

    name = "client"

    keys: Sequence[bytes] = attr.ib(converter=key_tuple)
    revocations: IRevocations = attr.ib(validator=_provides(IRevocations))
    clock: IReactorTime = attr.ib()
    idle_timeout: float = attr.ib(default=1800.0)
    absolute_timeout: float = attr.ib(default=43200.0)
    touch_fraction: float = attr.ib(default=0.1)
    carrier_name: str = attr.ib(default="twistauth_session")
    size_limit: int = attr.ib(default=DEFAULT_SIZE_LIMIT)
    max_future_skew: float = attr.ib(default=300.0)
    _timeouts: Timeouts = attr.ib(init=False)
    _sealer: Sealer = attr.ib(init=False)
    _purpose: str = attr.ib(init=False)
    _carrier_size: int = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._timeouts = Timeouts(
            idle=self.idle_timeout,
            absolute=self.absolute_timeout,
            touch_fraction=self.touch_fraction,
        )
        # Fixed at construction (the carrier never changes): not rebuilt
        # per load and per save.
        self._purpose = f"twistauth session/{self.carrier_name}"
        self._carrier_size = len(self.carrier_name.encode("utf-8"))
        self._sealer = Sealer(
            keyring=Keyring(self.keys),
            max_future_skew=self.max_future_skew,
            max_length=self.size_limit,
        )

    def replace_keys(self, keys: Sequence[bytes]) -> None:
        """
        Seal with ``keys`` from now on (a rotation on reload): the first
        seals, all open.  Tokens sealed with a key still listed keep
        opening and are re-sealed with the new first key when used; tokens
        sealed with a key no longer listed stop opening (the new `Sealer`
        remembers none of the tokens the old one opened).

        :raises twistauth.sessions.sealing.KeyringError: a key is unusable;
            the old keys stay in use.
        """
        keys = key_tuple(keys)
        sealer = Sealer(
            keyring=Keyring(keys),
            max_future_skew=self.max_future_skew,
            max_length=self.size_limit,
        )
        self.keys = keys
        self._sealer = sealer

    @property
    def purpose(self) -> str:
        """
        The sealing purpose (associated data) of this cache's tokens.
        """
        return self._purpose

    def _margin(self) -> float:
        # Records outlive the sessions they name by the clock skew allowed
        # between processes.
        return self.max_future_skew

    # -- ISessionCache ---------------------------------------------------

    def create(self, permanent: bool = False) -> Deferred[Session]:
        return succeed(new_session(self.clock.seconds(), permanent))

    def load(self, token: str, touch: bool = True) -> Deferred[Optional[Session]]:
        now = self.clock.seconds()
        opened = self._sealer.open_payload(token, purpose=self._purpose, now=now)
        if opened is None:
            return succeed(None)
        payload, stale_key = opened
        session = self._session(payload)
        if session is None or not self._timeouts.live(session.created, session.last_seen, now):
            return succeed(None)
        if touch and self._timeouts.touch_due(session.last_seen, now):
            session.last_seen = now
            session.mark_fields_changed()
        if stale_key:
            session.mark_fields_changed()  # re-sealed with the newest key on save
        checking = self.revocations.is_revoked(session)
        # A store that has answered already is read at once: no callback
        # chain on the path of every request.
        revoked = fired_value(checking)
        if revoked is PENDING:
            return checking.addCallback(_unless_revoked, session)
        return succeed(None if revoked else session)

    def save(self, session: Session) -> Deferred[Optional[str]]:
        if not session.version:
            return _seal_now(self._seal, session)
        # Logged out meanwhile: not brought back.
        checking = self.revocations.is_revoked(session)  # read at once, as in `load`
        revoked = fired_value(checking)
        if revoked is PENDING:
            return checking.addCallback(lambda revoked: None if revoked else self._seal(session))
        return succeed(None) if revoked else _seal_now(self._seal, session)

    @inlineCallbacks
    def renew(self, session: Session) -> Any:
        now = self.clock.seconds()
        if session.version:
            revoked = yield self.revocations.is_revoked(session)
            if revoked:
                return None
            ttl = session.created + self._timeouts.absolute - now
            if ttl > 0:
                yield self.revocations.revoke_session(session.id, ttl + self._margin())
        old_id, old_csrf = session.id, session.csrf_token
        session.id = new_id()
        session.csrf_token = new_id()
        session.mark_fields_changed()
        try:
            token = self._seal(session)
        except BaseException:
            session.id, session.csrf_token = old_id, old_csrf
            raise
        if token is None:
            session.id, session.csrf_token = old_id, old_csrf
        return token

    def delete(self, session: Session) -> Deferred[None]:
        ttl = session.created + self._timeouts.absolute - self.clock.seconds()
        if ttl <= 0:
            return succeed(None)  # expired anyway
        return self.revocations.revoke_session(session.id, ttl + self._margin())

    def delete_user(self, user_id: str) -> Deferred[int]:
        d = self.revocations.revoke_user(
            user_id, self.clock.seconds(), self._timeouts.absolute + self._margin()
        )
        d.addCallback(lambda _: -1)
        return d

    def delete_provider_session(self, issuer: str, provider_sid: str) -> Deferred[int]:
        d = self.revocations.revoke_provider_session(
            issuer, provider_sid, self._timeouts.absolute + self._margin()
        )
        d.addCallback(lambda _: -1)
        return d

    # -- sealing ---------------------------------------------------------

    def _seal(self, session: Session) -> Optional[str]:
        """
        The session's new token, or ``None`` if it is past its absolute
        lifetime.

        :raises SessionTooLargeError: the token would not fit its carrier.
        :raises TypeError: a state value is not JSON-serialisable.
        """
        now = self.clock.seconds()
        remaining = self._timeouts.remaining(session.created, now, now)
        if remaining <= 0:
            return None
        # Only the fields that differ from what `load_session` reads for a
        # missing one: a smaller token is cheaper to encrypt, carry, decrypt
        # and parse.  It loads the same; so do tokens sealed with every
        # field (by earlier versions), in either direction of an upgrade.
        fields = session.fields()
        del fields["id"], fields["version"]  # in the payload on their own
        fields = {
            name: value
            for name, value in fields.items()
            if value is not None and _DEFAULTS.get(name, _KEEP) != value
        }
        fields["last_seen"] = now
        payload = {
            "id": session.id,
            "v": session.version + 1,
            "f": fields,
            "d": session.data,
        }
        token = self._sealer.seal(payload, purpose=self._purpose, now=now, lifetime=remaining)
        size = self._carrier_size + len(token)
        if size > self.size_limit:
            raise SessionTooLargeError(size=size, limit=self.size_limit)
        session.last_seen = now
        session.version += 1
        session.mark_saved()
        return token

    def _session(self, payload: Any) -> Optional[Session]:
        # The payload verified, so we sealed it; still checked, so a token
        # from an older version of this module cannot raise.  Its state is
        # a dict just decoded and shared with nothing: not copied.
        try:
            data = payload["d"]
            if type(data) is not dict:
                return None
            return load_session(payload["id"], payload["f"], data, int(payload["v"]))
        except (KeyError, TypeError, ValueError):
            return None


#: Fields `load_session` reads as these values when they are missing (as
#: it reads every other missing field as ``None``): a token leaves them out
#: when they hold them.
_DEFAULTS: Dict[str, Any] = {"roles": [], "permanent": False}
_KEEP = object()


def _unless_revoked(revoked: bool, session: Session) -> Optional[Session]:
    return None if revoked else session


def _seal_now(seal: Any, session: Session) -> Deferred[Optional[str]]:
    try:
        return succeed(seal(session))
    except Exception:
        return fail()
