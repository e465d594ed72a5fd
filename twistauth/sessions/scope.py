"""
The session of one request: loaded lazily, changed by methods, committed once.

A `SessionScope` sits between a request and the `ISessionCache`.  The web
layer makes one per request that presents a session token (or whose method
asks for a session), methods log in and out through it (via their
handler), and after the call the web layer `commit` s it and learns what to
tell the client: a new token, a cleared one, or nothing.

It holds the rules that are not about any one backend: sessions are created
lazily and never for a token a client made up; login renews the id
(fixation); logout ends the session before anything else happens.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from twistauth.sessions._interfaces import ISessionCache, Session


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Commit:
    """
    What the client must be told after a request.

    :ivar token: a new token to send, or ``None`` to leave it as it is.
    :ivar clear: the client's token is dead: remove it.
    :ivar session: the session as committed, or ``None``.
    """

    token: Optional[str] = None
    clear: bool = False
    session: Optional[Session] = None


UNCHANGED = Commit()
CLEAR = Commit(clear=True)


@attr.s(slots=True)
class SessionScope:
    """
    One request's view of its session.

    :ivar presented: whether the client presented a token (even a dead one).
    :ivar session: the live session, or ``None``.
    """

    cache: ISessionCache = attr.ib()
    presented: bool = attr.ib(default=False)
    session: Optional[Session] = attr.ib(default=None)
    _token: Optional[str] = attr.ib(default=None)
    _renewed: bool = attr.ib(default=False)
    _ended: bool = attr.ib(default=False)

    @classmethod
    def for_token(cls, cache: ISessionCache, token: Optional[str]) -> Deferred[SessionScope]:
        """
        Load the session a client's token names (if any) into a new scope.
        """
        if not token:
            return succeed(cls(cache))
        return cache.load(token).addCallback(cls.loaded, cache, token)

    @classmethod
    def loaded(
        cls, session: Optional[Session], cache: ISessionCache, token: str
    ) -> SessionScope:
        """
        The scope of a request that presented ``token``, which names
        ``session`` (``None``: no live session), as ``cache.load`` answered.
        """
        return cls(cache, True, session, token)

    @property
    def token(self) -> Optional[str]:
        """
        The token the client holds now (after any renewal), or ``None``.
        """
        return self._token

    @property
    def untouched(self) -> bool:
        """
        Nothing to commit: no token was presented and no session was made or
        ended (the common anonymous call costs no commit).
        """
        return not self.presented and self.session is None and not self._ended

    @property
    def dead_token(self) -> bool:
        """
        The client presented a token that names no live session.
        """
        return self.presented and self.session is None

    def ensure(self) -> Deferred[Session]:
        """
        The request's session, created (unsaved) if it has none.
        """
        if self.session is not None:
            return succeed(self.session)

        def created(session: Session) -> Session:
            self.session = session
            self._ended = False
            return session

        return self.cache.create().addCallback(created)

    @inlineCallbacks
    def log_in(
        self,
        user_id: str,
        roles: Iterable[str] = (),
        *,
        now: float,
        permanent: bool = False,
        issuer: Optional[str] = None,
        provider_sid: Optional[str] = None,
    ) -> Any:
        """
        Bind the request's session to a user under a new id: a session id
        from before login never survives it.
        """
        had_session = self.session is not None and self._token is not None

        def bind(session: Session) -> Session:
            session.log_in(
                user_id,
                roles,
                now=now,
                permanent=permanent,
                issuer=issuer,
                provider_sid=provider_sid,
            )
            return session

        session = bind((yield self.ensure()))
        if had_session:
            token = yield self.cache.renew(session)
            if token is None:
                # Ended meanwhile (logged out elsewhere): log in on a fresh one.
                self.session = None
                session = bind((yield self.ensure()))
                self._token = None
            else:
                self._token = token
                self._renewed = True
        return session

    @inlineCallbacks
    def renew(self) -> Any:
        """
        A new id for the session (call on any privilege change).
        """
        if self.session is None:
            return None
        token = yield self.cache.renew(self.session)
        if token is None:
            # Ended meanwhile: the request goes on without a session.
            self.session = None
            self._ended = True
            return None
        self._token = token
        self._renewed = True
        return self.session

    @inlineCallbacks
    def log_out(self) -> Any:
        """
        End this request's session.
        """
        if self.session is not None:
            session, self.session = self.session, None
            yield self.cache.delete(session)
        self._ended = True

    def commit(self) -> Deferred[Commit]:
        """
        Save what changed and say what the client must be told.

        Answers with an already-fired Deferred when there is nothing to
        save (the common case: a call that changed nothing).

        :return: Deferred firing with a `Commit`.
        """
        session = self.session
        if session is None:
            if self._ended or self.dead_token:
                return succeed(CLEAR)
            return succeed(UNCHANGED)
        if session.dirty or self._token is None:
            return self.cache.save(session).addCallback(self._saved, session)
        if self._renewed:
            return succeed(Commit(token=self._token, session=session))
        return succeed(Commit(session=session))

    def _saved(self, token: Optional[str], session: Session) -> Commit:
        if token is None:
            # Logged out meanwhile by another request: not brought back.
            return CLEAR
        if token != self._token or self._renewed:
            self._token = token
            return Commit(token=token, session=session)
        return Commit(session=session)
