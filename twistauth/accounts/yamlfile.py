"""
The YAML-file user store: every user in one human-readable file, for a
single-process deployment with no Redis.

What it promises, and how:

- **Old or new, never half.**  A write goes to a temporary file in the same
  directory, is flushed to disk (``fsync``), renamed over the file
  (``os.replace``, atomic on POSIX), and the directory is flushed so the
  rename itself survives a power cut.  Killed at any point (``kill -9``),
  the file holds the old content or the new, and the next start removes
  any temporary file left behind.  Twisted's ``FilePath.setContent`` does
  the rename but no ``fsync``.
- **No lost updates.**  Every read-modify-write holds an exclusive
  ``fcntl.flock`` on a lock file beside the data (``<file>.lock``) and
  re-reads the data under it, so two processes writing at once both keep
  their change.
- **Private.**  The file is created with mode 0600 (the directory, if this
  store creates it, 0700).
- **Never blocks the reactor.**  File I/O runs in the reactor's thread pool
  (``deferToThreadPool``); writes of this process queue on a `DeferredLock`
  so they do not tie up threads waiting on the file lock.
- **Clear failures.**  A corrupt or unreadable file is a start-up error
  naming the path (`YAMLUserStore.check` raises `UserFileError`); the same
  problem at run time, or a failed write (``ENOSPC``), is logged with the
  path and answered with `twistauth.errors.BackendUnavailableError` (the
  client is not told the path); a failed write leaves the old file intact
  and no temporary file behind.

`UserFile` is the synchronous core (it blocks; call it from a thread);
`YAMLUserStore` is the `IUserStore` around it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import attr
import yaml
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistauth.accounts._interfaces import IUserStore, User
from twistauth.accounts.errors import (
    UnknownUserError,
    UserConflictError,
    UserExistsError,
    UserFileError,
)
from twistauth.errors import BackendUnavailableError, TwistauthError

log = Logger()

FORMAT = "twistauth-users/1"
"""The ``format`` key of the file: changes if the layout ever does."""

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

T = TypeVar("T")
Records = Dict[str, Dict[str, Any]]
_Signature = Tuple[int, int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class UserFile:
    """
    The synchronous core of the YAML store.  Every method blocks: call them
    from a thread (or at start-up, before the reactor runs).

    The file looks like::

        format: twistauth-users/1
        users:
          alice:
            password_hash: $argon2id$v=19$m=65536,t=3,p=4$...
            roles: [admin]
            ...

    :ivar path: the data file (absolute).
    :ivar lock_path: the lock file beside it.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self.lock_path = self.path + ".lock"
        self._temp_prefix = "." + os.path.basename(self.path) + ".tmp-"
        self._cache: Optional[Tuple[_Signature, Records]] = None

    # -- start-up ----------------------------------------------------------

    def check(self) -> int:
        """
        Make sure the store can be used: create the directory (mode 0700) if
        it is missing, remove temporary files a killed writer left behind,
        and read the file if it exists.

        :return: the number of users.
        :raises UserFileError: the file or its directory cannot be used.
        """
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise UserFileError(self.path, f"cannot create its directory: {_why(e)}") from None
        try:
            with self._locked():
                removed = self._remove_stale_temps()
                records = self._read_fresh()
        except OSError as e:
            raise UserFileError(self.path, f"cannot be read: {_why(e)}") from None
        for name in removed:
            log.warn("twistauth: removed {name}, left behind by an interrupted write", name=name)
        try:
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
        except FileNotFoundError:
            mode = 0
        if mode & 0o077:
            log.warn(
                "twistauth: user file {path} has mode {mode:o}; it holds password "
                "hashes: it will be rewritten 0600 at the next change",
                path=self.path,
                mode=mode,
            )
        return len(records)

    # -- reading -----------------------------------------------------------

    def read(self) -> Records:
        """
        Every user record, by id.  The parsed file is cached and read again
        only when it changed on disk.  Do not change what this returns.

        :raises UserFileError: the file is not valid.
        :raises OSError: it cannot be read.
        """
        try:
            current = _signature(os.stat(self.path))
        except FileNotFoundError:
            return {}
        if self._cache is not None and self._cache[0] == current:
            return self._cache[1]
        return self._read_fresh()

    def _read_fresh(self) -> Records:
        try:
            with open(self.path, "rb") as f:
                signature = _signature(os.fstat(f.fileno()))
                raw = f.read()
        except FileNotFoundError:
            self._cache = None
            return {}
        records = self._parse(raw)
        self._cache = (signature, records)
        return records

    def _parse(self, raw: bytes) -> Records:
        try:
            data = yaml.load(raw, Loader=_Loader)  # noqa: S506 - a safe loader
        except yaml.YAMLError as e:
            raise UserFileError(self.path, f"is not valid YAML: {e}") from None
        if data is None:
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserFileError(
                self.path, f"is not a twistauth user file (expected 'format: {FORMAT}')"
            )
        users = data.get("users") or {}
        if not isinstance(users, dict):
            raise UserFileError(self.path, "'users' must be a mapping of user id to record")
        records: Records = {}
        for user_id, record in users.items():
            if not isinstance(user_id, str) or not isinstance(record, dict):
                raise UserFileError(self.path, f"the entry {user_id!r} is not a user record")
            full = dict(record, user_id=user_id)
            try:
                User.from_record(full)
            except ValueError as e:
                raise UserFileError(self.path, f"user {user_id!r}: {e}") from None
            records[user_id] = full
        return records

    # -- writing -----------------------------------------------------------

    def modify(self, change: Callable[[Records], Tuple[bool, T]]) -> T:
        """
        Read-modify-write under the file lock.

        :param change: called with a fresh copy of the records (which it may
            change in place); returns ``(changed, result)``.  The file is
            written only if ``changed``.  An exception it raises is passed
            on, and nothing is written.
        :return: ``change``'s result.
        :raises OSError: the file cannot be read or written (then it is
            unchanged and no temporary file remains).
        """
        with self._locked():
            records = {k: dict(v) for k, v in self._read_fresh().items()}
            changed, result = change(records)
            if changed:
                self._write(records)
        return result

    def _write(self, records: Records) -> None:
        users = {
            user_id: {k: v for k, v in record.items() if k != "user_id"}
            for user_id, record in sorted(records.items())
        }
        data = yaml.dump(
            {"format": FORMAT, "users": users},
            Dumper=_Dumper,
            default_flow_style=False,
            sort_keys=True,
            allow_unicode=True,
            encoding="utf-8",
        )
        temp = os.path.join(self.directory, self._temp_prefix + secrets.token_hex(6))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        self._fsync_directory()
        try:
            self._cache = (_signature(os.stat(self.path)), records)
        except OSError:
            self._cache = None

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove_stale_temps(self) -> List[str]:
        """
        Remove temporary files of interrupted writes.  Only safe while
        holding the lock (nobody else is writing then).
        """
        removed = []
        for name in os.listdir(self.directory):
            if name.startswith(self._temp_prefix):
                try:
                    os.unlink(os.path.join(self.directory, name))
                    removed.append(name)
                except FileNotFoundError:
                    pass
        return removed

    def _locked(self) -> _FileLock:
        return _FileLock(self.lock_path)


class _FileLock:
    """
    An exclusive ``flock`` on a lock file, as a context manager.  The lock
    file is never deleted (deleting it would let two holders lock two
    different files).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # closing releases the lock


def _why(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "")
    return f"{e.strerror or e} ({name})" if name else str(e)


@implementer(IUserStore)
@attr.s(kw_only=True)
class YAMLUserStore:
    """
    An `IUserStore` in one YAML file (see the module documentation).

    Call `check` once at start-up, before serving: it turns a corrupt or
    unreadable file into an error that stops the start, naming the path.

    :ivar path: the file.
    :ivar clock: stamps ``created`` and ``updated``.
    :ivar reactor: runs the blocking file I/O in its thread pool
        (``IReactorThreads`` and ``IReactorFromThreads``).
    """

    name = "yaml"

    path: str = attr.ib()
    clock: IReactorTime = attr.ib()
    reactor: Any = attr.ib()
    _file: UserFile = attr.ib(init=False)
    _write_lock: DeferredLock = attr.ib(init=False, factory=DeferredLock)

    def __attrs_post_init__(self) -> None:
        self._file = UserFile(self.path)

    @property
    def file(self) -> UserFile:
        """The synchronous core."""
        return self._file

    def check(self) -> int:
        """
        Start-up check (blocks; call before the reactor runs).

        :return: the number of users.
        :raises UserFileError: the file cannot be used; the message names it.
        """
        count = self._file.check()
        log.info(
            "twistauth: user store: YAML file {path} ({count} users)",
            path=self._file.path,
            count=count,
        )
        return count

    # -- IUserStore ----------------------------------------------------------

    def get(self, user_id: str) -> Any:
        def read() -> Optional[User]:
            record = self._file.read().get(user_id)
            return None if record is None else User.from_record(record)

        return self._in_thread("read", read)

    def create(self, user: User) -> Any:
        now = self.clock.seconds()
        stored = user.evolve(created=now, updated=now, version=1)

        def change(records: Records) -> Tuple[bool, User]:
            if user.user_id in records:
                raise UserExistsError()
            records[user.user_id] = stored.to_record()
            return True, stored

        return self._write(change)

    def replace(self, user: User) -> Any:
        now = self.clock.seconds()

        def change(records: Records) -> Tuple[bool, User]:
            record = records.get(user.user_id)
            if record is None:
                raise UnknownUserError()
            if record.get("version", 0) != user.version:
                raise UserConflictError()
            stored = user.evolve(
                created=record.get("created", now), updated=now, version=user.version + 1
            )
            records[user.user_id] = stored.to_record()
            return True, stored

        return self._write(change)

    def delete(self, user_id: str) -> Any:
        def change(records: Records) -> Tuple[bool, bool]:
            if user_id not in records:
                return False, False
            del records[user_id]
            return True, True

        return self._write(change)

    def user_ids(self) -> Any:
        return self._in_thread("read", lambda: sorted(self._file.read()))

    # -- plumbing ------------------------------------------------------------

    def _write(self, change: Callable[[Records], Tuple[bool, Any]]) -> Any:
        return self._write_lock.run(self._in_thread, "write", self._file.modify, change)

    def _in_thread(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)
        return d.addErrback(self._failed, what)

    def _failed(self, failure: Failure, what: str) -> Failure:
        if failure.check(TwistauthError):
            return failure
        if failure.check(OSError, UserFileError):
            problem = (
                _why(failure.value) if isinstance(failure.value, OSError) else str(failure.value)
            )
            log.error(
                "twistauth: cannot {what} the user file {path}: {problem}",
                what=what,
                path=self._file.path,
                problem=problem,
            )
            done = "written" if what == "write" else "read"
            return Failure(BackendUnavailableError(f"the user store cannot be {done}; retry later"))
        return failure


__all__ = ["FORMAT", "UserFile", "YAMLUserStore"]
