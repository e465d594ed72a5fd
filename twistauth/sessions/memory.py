"""
The in-process session cache: the embedded default.

Sessions live in a dict in this process, so this cache is only for a
deployment of one process (the composition root refuses more).  It keeps
the same rules as the Redis cache, so code tested against it behaves the
same there: state goes through JSON on save (a value that is not
JSON-serialisable fails here too, and a tuple reads back as a list), a
save stores only the keys that changed, a save after a delete is dropped,
and expiry is measured on the injected clock.

The number of sessions is bounded: past ``max_entries`` the least recently
used session is dropped (its client is logged out).  Expired sessions are
dropped when next looked up, and a few at the old end of the recency order
on every write, so no timer runs and memory does not grow with dead
sessions.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from itertools import islice
from typing import Any, Dict, Optional, Set, Tuple

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth.sessions._common import (
    FIELD_NAMES,
    Timeouts,
    copy_json,
    dump_value,
    is_session_id,
    load_session,
    new_id,
    new_session,
)
from twistauth.sessions._interfaces import ISessionCache, Session

#: Expired entries looked at (from the least recently used end) per write.
_SWEEP = 4


@attr.s(slots=True)
class _Record:
    """
    One stored session: its own fields as immutable values, and its state
    with each value as it decodes from the JSON it was checked as on save
    (so a value reads back as it would from Redis: tuples as lists, and so
    on).  Both are read on every load, so both are kept decoded; a load
    copies the state (`copy_json`), so a loaded session never aliases the
    store.
    """

    fields: Dict[str, Any] = attr.ib()
    data: Dict[str, Any] = attr.ib()
    version: int = attr.ib()

    def value(self, name: str) -> Any:
        return self.fields[name]


def _stored(key: str, value: Any) -> Any:
    """
    A state value as the record keeps it: checked as JSON (`dump_value`
    refuses what the Redis cache could not store) and decoded again.
    """
    return json.loads(dump_value(key, value))


def _field_values(session: Session) -> Dict[str, Any]:
    """
    The session's own fields (`FIELD_NAMES`) as the record keeps them: the
    roles as a sorted tuple, every other field a str, number, bool or None.
    """
    fields = session.fields()
    json.dumps(fields)  # what the Redis cache cannot store, this one refuses too
    fields["roles"] = tuple(fields["roles"])
    return {name: fields[name] for name in FIELD_NAMES}


@implementer(ISessionCache)
@attr.s(kw_only=True, eq=False)
class MemorySessionCache:
    """
    Sessions in this process's memory.

    :param clock: the time source for creation, use and expiry.
    :param idle_timeout: seconds a session lives unused.
    :param absolute_timeout: seconds a session lives at most.
    :param max_entries: the most sessions kept; past it the least recently
        used is dropped.
    """

    name = "memory"

    clock: IReactorTime = attr.ib()
    idle_timeout: float = attr.ib(default=1800.0)
    absolute_timeout: float = attr.ib(default=43200.0)
    max_entries: int = attr.ib(default=100_000)
    _timeouts: Timeouts = attr.ib(init=False)
    _records: OrderedDict[str, _Record] = attr.ib(init=False, factory=OrderedDict)
    _by_user: Dict[str, Set[str]] = attr.ib(init=False, factory=dict)
    _by_provider: Dict[Tuple[str, str], Set[str]] = attr.ib(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        # The memory cache writes nothing per use, so it records every use.
        self._timeouts = Timeouts(
            idle=self.idle_timeout, absolute=self.absolute_timeout, touch_fraction=0
        )
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {self.max_entries!r}")

    def __len__(self) -> int:
        """
        How many sessions are stored (expired ones included until dropped).
        """
        return len(self._records)

    # -- ISessionCache ---------------------------------------------------

    def create(self, permanent: bool = False) -> Deferred[Session]:
        return succeed(new_session(self.clock.seconds(), permanent))

    def load(self, token: str, touch: bool = True) -> Deferred[Optional[Session]]:
        if not is_session_id(token):
            return succeed(None)
        record = self._live(token)
        if record is None:
            return succeed(None)
        if touch:
            record.fields["last_seen"] = self.clock.seconds()
            self._records.move_to_end(token)
        data = record.data
        session = load_session(
            token,
            record.fields,
            {key: copy_json(value) for key, value in data.items()} if data else {},
            record.version,
        )
        return succeed(session)

    def save(self, session: Session) -> Deferred[Optional[str]]:
        try:
            return succeed(self._save(session))
        except Exception as e:
            return fail(e)

    def renew(self, session: Session) -> Deferred[Optional[str]]:
        try:
            return succeed(self._renew(session))
        except Exception as e:
            return fail(e)

    def delete(self, session: Session) -> Deferred[None]:
        self._drop(session.id)
        return succeed(None)

    def delete_user(self, user_id: str) -> Deferred[int]:
        ids = list(self._by_user.get(user_id, ()))
        for session_id in ids:
            self._drop(session_id)
        return succeed(len(ids))

    def delete_provider_session(self, issuer: str, provider_sid: str) -> Deferred[int]:
        ids = list(self._by_provider.get((issuer, provider_sid), ()))
        for session_id in ids:
            self._drop(session_id)
        return succeed(len(ids))

    # -- the store -------------------------------------------------------

    def _live(self, session_id: str) -> Optional[_Record]:
        """
        The record of a live session, dropping it if it has expired.
        """
        record = self._records.get(session_id)
        if record is None:
            return None
        now = self.clock.seconds()
        if not self._timeouts.live(record.value("created"), record.value("last_seen"), now):
            self._drop(session_id)
            return None
        return record

    def _save(self, session: Session) -> Optional[str]:
        now = self.clock.seconds()
        if session.version == 0:
            if session.id in self._records:
                raise RuntimeError("session id collision")
            record = _Record(fields={}, data={}, version=0)
        else:
            found = self._live(session.id)
            if found is None:
                return None  # deleted or expired meanwhile: not brought back
            record = found
        if not self._timeouts.live(session.created, session.last_seen, now):
            return None
        if record.version and session.fields_changed():
            self._unindex(session.id, record)  # the user or provider may change
        self._apply(session, record, now)
        self._records[session.id] = record
        self._records.move_to_end(session.id)
        self._index(session.id, record)
        self._bound()
        return session.id

    def _apply(self, session: Session, record: _Record, now: float) -> None:
        """
        Write the session's changes into ``record``: every field on creation
        or when they changed, else just ``last_seen``; only the changed keys
        of the state.
        """
        changes = {key: _stored(key, value) for key, value in session.changes().items()}
        session.last_seen = now
        if record.version == 0 or session.fields_changed():
            record.fields.update(_field_values(session))
        else:
            record.fields["last_seen"] = now
        if record.version == 0:
            record.data = {key: _stored(key, session[key]) for key in session}
        else:
            record.data.update(changes)
            for key in session.deleted_keys():
                record.data.pop(key, None)
        record.version += 1
        session.version = record.version
        session.mark_saved()

    def _renew(self, session: Session) -> Optional[str]:
        old_id = session.id
        if session.version and self._live(old_id) is None:
            return None
        record = self._records.pop(old_id, None)
        self._unindex(old_id, record)
        session.id = new_id()
        session.csrf_token = new_id()
        session.mark_fields_changed()
        if record is not None:
            self._records[session.id] = record
        token = self._save(session)
        if token is None and record is None:
            session.id = old_id
        return token

    def _index(self, session_id: str, record: _Record) -> None:
        user_id = record.value("user_id")
        if user_id is not None:
            self._by_user.setdefault(user_id, set()).add(session_id)
        issuer, provider_sid = record.value("issuer"), record.value("provider_sid")
        if issuer is not None and provider_sid is not None:
            self._by_provider.setdefault((issuer, provider_sid), set()).add(session_id)

    def _unindex(self, session_id: str, record: Optional[_Record]) -> None:
        # The indexes may hold ids of sessions that changed user since: look
        # in every index the record could be in, and drop empty sets.
        if record is None:
            return
        user_id = record.value("user_id")
        ids = self._by_user.get(user_id)
        if ids is not None:
            ids.discard(session_id)
            if not ids:
                del self._by_user[user_id]
        key = (record.value("issuer"), record.value("provider_sid"))
        ids = self._by_provider.get(key)
        if ids is not None:
            ids.discard(session_id)
            if not ids:
                del self._by_provider[key]

    def _drop(self, session_id: str) -> None:
        self._unindex(session_id, self._records.pop(session_id, None))

    def _bound(self) -> None:
        """
        Drop a few expired sessions from the least recently used end, then
        the least recently used ones past ``max_entries``.
        """
        now = self.clock.seconds()
        for session_id in list(islice(self._records, _SWEEP)):
            record = self._records[session_id]
            if not self._timeouts.live(record.value("created"), record.value("last_seen"), now):
                self._drop(session_id)
        while len(self._records) > self.max_entries:
            session_id = next(iter(self._records))
            self._drop(session_id)
