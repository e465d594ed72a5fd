"""
The session model and the session-cache contract.

A `Session` is dict-like state plus who is logged in.  It records which
of its keys changed since it was loaded, so a server-side cache can save
only the difference: two concurrent requests that change different keys of
one session both keep their change.

An `ISessionCache` keeps sessions.  Every operation answers through a
Deferred, whatever the backend (memory answers with ``succeed``), so callers
never branch on the backend.  A backend that cannot be reached fails the
Deferred with `twistauth.errors.BackendUnavailableError` (503): an outage is
never mistaken for "no such session", so nobody is logged out by it.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Iterator, MutableMapping, Optional, Set

import attr
from zope.interface import Attribute, Interface


@attr.s(kw_only=True, eq=False, repr=False)
class Session(MutableMapping[str, Any]):
    """
    One session.

    Mapping access (``session["cart"] = [...]``) reads and writes the
    JSON-serialisable application state; the attributes below are the
    session's own fields.  Change fields through the methods that record the
    change (`log_in`, `set_roles`, `set_signing_key`), never by assignment;
    logging out is the cache's `ISessionCache.delete`.

    :ivar id: the session's identifier: at least 128 random bits, URL-safe
        text.  Never log it.  For client-side sessions it is not what the
        client holds (that is the sealed blob) but it still names the session
        for revocation.
    :ivar user_id: who is logged in, or ``None`` for an anonymous session.
    :ivar roles: the user's roles while logged in.
    :ivar created: when the session was created (clock seconds): the start of
        its absolute lifetime.
    :ivar last_seen: when it was last used: the start of its idle timeout.
    :ivar authenticated_at: when the user logged in, or ``None``.
    :ivar permanent: the user asked to be remembered: the cookie outlives the
        browser (the server-side timeouts hold either way).
    :ivar issuer: the OpenID provider's issuer, for sessions from an OIDC login.
    :ivar provider_sid: the provider's ``sid`` claim, for back-channel logout.
    :ivar csrf_token: a per-session secret for double-submit CSRF protection;
        renewed with the id.
    :ivar signing_key: a per-session HMAC key (URL-safe base64) when the
        session signs its requests, else ``None``.
    :ivar version: incremented by every save: lets a cache detect writes it
        has not seen.
    """

    id: str = attr.ib()
    created: float = attr.ib()
    last_seen: float = attr.ib()
    user_id: Optional[str] = attr.ib(default=None)
    roles: FrozenSet[str] = attr.ib(default=frozenset(), converter=frozenset)
    authenticated_at: Optional[float] = attr.ib(default=None)
    permanent: bool = attr.ib(default=False)
    issuer: Optional[str] = attr.ib(default=None)
    provider_sid: Optional[str] = attr.ib(default=None)
    csrf_token: str = attr.ib(default="")
    signing_key: Optional[str] = attr.ib(default=None)
    version: int = attr.ib(default=0)
    _data: Dict[str, Any] = attr.ib(factory=dict, alias="data")
    _changed: Set[str] = attr.ib(factory=set, init=False)
    _deleted: Set[str] = attr.ib(factory=set, init=False)
    _fields_changed: bool = attr.ib(default=False, init=False)

    # -- the application state ------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._changed.add(key)
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._deleted.add(key)
        self._changed.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    # The mixins' versions go through __getitem__ and a KeyError: slow for
    # the common "not set" answer, which the access checks ask every call.
    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    @property
    def data(self) -> Dict[str, Any]:
        """
        A copy of the application state.
        """
        return dict(self._data)

    # -- the session's own fields ----------------------------------------

    @property
    def authenticated(self) -> bool:
        return self.user_id is not None

    def log_in(
        self,
        user_id: str,
        roles: Any = (),
        *,
        now: float,
        permanent: bool = False,
        issuer: Optional[str] = None,
        provider_sid: Optional[str] = None,
    ) -> None:
        """
        Bind the session to a user.  The caller must also give it a new id
        (`ISessionCache.renew`): an id from before login never survives it.
        """
        self.user_id = user_id
        self.roles = frozenset(roles)
        self.authenticated_at = now
        self.permanent = permanent
        self.issuer = issuer
        self.provider_sid = provider_sid
        self._fields_changed = True

    def set_roles(self, roles: Any) -> None:
        self.roles = frozenset(roles)
        self._fields_changed = True

    def set_signing_key(self, key: Optional[str]) -> None:
        self.signing_key = key
        self._fields_changed = True

    # -- for caches ------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """
        Whether anything changed since the session was loaded or saved.
        """
        return bool(self._changed or self._deleted or self._fields_changed)

    def changes(self) -> Dict[str, Any]:
        """
        The changed keys of the state with their new values: what
        a cache writes.  Deleted keys are in `deleted_keys`.
        """
        return {key: self._data[key] for key in self._changed}

    def deleted_keys(self) -> Set[str]:
        return set(self._deleted)

    def fields_changed(self) -> bool:
        return self._fields_changed

    def mark_fields_changed(self) -> None:
        """
        Mark the session's own fields as changed, so it is `dirty` and its
        next save stores it.  A cache calls this from ``load`` when it wants
        the session saved although nothing else changed: a use it records
        lazily (``last_seen``), or a client-side session opened with an old
        key that must be re-sealed with the newest.
        """
        self._fields_changed = True

    def mark_saved(self) -> None:
        """
        Forget the recorded changes (a cache calls this after a save).
        """
        self._changed.clear()
        self._deleted.clear()
        self._fields_changed = False

    def fields(self) -> Dict[str, Any]:
        """
        The session's own fields as JSON-serialisable values, for storage.
        """
        return {
            "id": self.id,
            "created": self.created,
            "last_seen": self.last_seen,
            "user_id": self.user_id,
            "roles": sorted(self.roles),
            "authenticated_at": self.authenticated_at,
            "permanent": self.permanent,
            "issuer": self.issuer,
            "provider_sid": self.provider_sid,
            "csrf_token": self.csrf_token,
            "signing_key": self.signing_key,
            "version": self.version,
        }

    def __repr__(self) -> str:
        # Never the id: reprs end up in logs.
        return f"<Session user={self.user_id!r} keys={sorted(self._data)!r}>"


class ISessionCache(Interface):
    """
    Keeps sessions.  Every method answers with a Deferred; a backend that
    cannot be reached fails it with
    `twistauth.errors.BackendUnavailableError`.

    A *token* is what the client holds: the session id for server-side
    caches, the sealed session for the client-side cache.
    """

    name: str = Attribute('The kind of cache: ``"memory"``, ``"redis"`` or ``"client"``.')

    def create(permanent: bool = False) -> Any:
        """
        A new anonymous session with a fresh id and CSRF token.  Nothing is
        stored until it is saved.

        :return: Deferred firing with the `Session`.
        """

    def load(token: str, touch: bool = True) -> Any:
        """
        The session a token names, if it is live: known, not deleted or
        revoked, within its idle and absolute timeouts, not tampered with.

        :param touch: record the use (``last_seen``, when the cache needs
            to).  ``False`` for looks that are not the user's activity (a
            logout long-poll), so they never keep an idle session alive.

        :return: Deferred firing with the `Session` or ``None``.
        """

    def save(session: Session) -> Any:
        """
        Store the session's changes.  A session that was deleted (logged out)
        meanwhile is not brought back: the save is dropped and answers
        ``None``.

        :return: Deferred firing with the token to give the client (it may
            change at every save for client-side sessions), or ``None``.
        """

    def renew(session: Session) -> Any:
        """
        Give the session a new id and CSRF token, keeping its state, and
        make the old id unusable (fixation defence: call on login and on
        every privilege change).  The renewed session is saved.

        A session that was saved before and deleted (logged out) meanwhile is
        not brought back: nothing is stored, the session keeps its old id,
        and the Deferred fires with ``None``, as `save` does.

        :return: Deferred firing with the new token, or ``None``.
        """

    def delete(session: Session) -> Any:
        """
        End the session: its token stops working everywhere.

        :return: Deferred firing with ``None``.
        """

    def delete_user(user_id: str) -> Any:
        """
        End every session of a user ("log out everywhere").

        :return: Deferred firing with how many ended (client-side: -1, unknown).
        """

    def delete_provider_session(issuer: str, provider_sid: str) -> Any:
        """
        End every session bound to an OpenID provider session (back-channel
        logout with a ``sid``).

        :return: Deferred firing with how many ended (client-side: -1, unknown).
        """


class IRevocations(Interface):
    """
    Remembers which client-side sessions were ended before they expire.

    A client-side (sealed) session lives in the client's cookie or header,
    so deleting it means remembering, until it would have expired anyway,
    that it must no longer be accepted.  Three kinds of record, each kept
    only as long as a session it names could still be live:

    - a revoked session id (logout, renewal of the id);
    - a per-user *not-before* time: every session of that user that logged
      in at or before it is revoked ("log out everywhere");
    - a revoked OpenID provider session (issuer, ``sid``): back-channel
      logout.

    Every method answers with a Deferred; a store that cannot be reached
    fails it with `twistauth.errors.BackendUnavailableError` (an outage is
    never taken as "not revoked", nor as "revoked").
    """

    def revoke_session(session_id: str, ttl: float) -> Any:
        """
        Revoke one session id for ``ttl`` seconds.

        :return: Deferred firing with ``None``.
        """

    def revoke_user(user_id: str, not_before: float, ttl: float) -> Any:
        """
        Revoke every session of ``user_id`` that logged in at or before
        ``not_before`` (clock seconds); kept ``ttl`` seconds.  A later
        ``not_before`` replaces an earlier one, never the reverse.

        :return: Deferred firing with ``None``.
        """

    def revoke_provider_session(issuer: str, provider_sid: str, ttl: float) -> Any:
        """
        Revoke every session bound to this OpenID provider session for
        ``ttl`` seconds.

        :return: Deferred firing with ``None``.
        """

    def is_revoked(session: Session) -> Any:
        """
        Whether ``session`` (as opened from its token) was revoked by any of
        the three kinds of record.

        :return: Deferred firing with a `bool`.
        """
