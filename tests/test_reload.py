"""
Reloading settings on SIGHUP (`twistauth.workers.Reloader`) and replacing
the client-side session cache's keyring at run time
(`ClientSessionCache.replace_keys`): a rotation logs nobody out, a retired
key's tokens stop opening, a bad reload changes nothing, keys that cannot
change are refused and kept, and no key ever reaches the log.  The same
through ``kill -HUP`` on real processes is in
``test_reload_processes.py``.
"""

from __future__ import annotations

import base64
import os
import tempfile
from functools import partial
from typing import Any, Dict, List, Sequence

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistauth.sessions import ClientSessionCache, KeyringError, MemoryRevocations
from twistauth.sessions.sealing import KEY_ID_BYTES, key_id
from twistauth.settings import Settings
from twistauth.workers import Reloader, session_key_appliers

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K3 = bytes(range(200, 232))


def text(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def key_of(token: str) -> bytes:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return raw[1 : 1 + KEY_ID_BYTES]


class Config:
    """
    A TOML configuration file a test rewrites.
    """

    def __init__(self) -> None:
        directory = tempfile.mkdtemp(prefix="twistauth-reload-")
        self.path = os.path.join(directory, "twistauth.toml")

    def write(self, keys: Sequence[bytes] = (K1,), **values: Any) -> None:
        lines = ['session_cache = "client"']
        lines.append("session_keys = [" + ", ".join(f'"{text(k)}"' for k in keys) + "]")
        for name, value in values.items():
            lines.append(f"{name} = {value}")
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")


class Logged:
    """
    Every log event while a test runs, formatted.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> List[str]:
        return [formatEvent(e) for e in self.events]


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = Config()
        self.config.write()
        self.load = partial(Settings.load, config_path=self.config.path)
        self.applied: List[Any] = []
        self.reloader = Reloader(current=self.load(), load=self.load)
        self.reloader.on("session_keys", self.applied.append)
        self.logged = Logged(self)

    def test_nothing_changed(self) -> None:
        result = self.reloader.reload()
        self.assertEqual((result.ok, result.applied, result.refused), (True, (), ()))
        self.assertEqual(self.applied, [])
        self.assertIn("twistauth: reload: no setting changed", self.logged.texts())

    def test_rotation_is_applied(self) -> None:
        before = self.reloader.current
        self.config.write(keys=(K2, K1))
        result = self.reloader.reload()
        self.assertEqual(result.applied, ("session_keys",))
        self.assertEqual(self.applied, [(K2, K1)])
        self.assertEqual(self.reloader.current.session_keys, (K2, K1))
        self.assertEqual(self.reloader.current.max_body_bytes, before.max_body_bytes)
        self.assertIn(
            f"twistauth: reload: session_keys is now 2 key(s) set (config file {self.config.path})",
            self.logged.texts(),
        )

    def test_other_keys_are_refused_and_kept(self) -> None:
        """
        A key that cannot change at run time is logged and keeps its value;
        a reloadable key changed at the same time is still applied.
        """
        self.config.write(keys=(K2, K1), max_body_bytes=1000, processes=1)
        result = self.reloader.reload()
        self.assertEqual(result.applied, ("session_keys",))
        self.assertEqual(result.refused, ("max_body_bytes",))
        self.assertEqual(self.reloader.current.max_body_bytes, 64 * 1024)
        self.assertEqual(self.reloader.current.session_keys, (K2, K1))
        self.assertIn(
            "twistauth: reload: max_body_bytes changed but cannot change while running "
            "(restart to apply); keeping 65536 (default)",
            self.logged.texts(),
        )

    def test_invalid_configuration_changes_nothing(self) -> None:
        before = self.reloader.current
        self.config.write(keys=(K2,), max_body_bytes='"lots"')
        result = self.reloader.reload()
        self.assertFalse(result.ok)
        self.assertIs(self.reloader.current, before)
        self.assertEqual(self.applied, [])
        [message] = [t for t in self.logged.texts() if "reload refused" in t]
        self.assertIn("max_body_bytes", message)
        self.assertIn("settings unchanged", message)

    def test_unreadable_key_file_changes_nothing(self) -> None:
        with open(self.config.path, "w") as f:
            f.write('session_cache = "client"\nsession_keys = ["file:/nonexistent/k"]\n')
        self.assertFalse(self.reloader.reload().ok)
        self.assertEqual(self.reloader.current.session_keys, (K1,))

    def test_applier_refusal_keeps_the_old_value(self) -> None:
        def refuse(keys: Any) -> None:
            raise KeyringError("the same sealing key (or key id) is configured twice")

        self.reloader.on("session_keys", refuse)
        self.config.write(keys=(K2,))
        result = self.reloader.reload()
        self.assertEqual(result.refused, ("session_keys",))
        self.assertEqual(self.reloader.current.session_keys, (K1,))
        self.assertTrue(any("session_keys refused (KeyringError" in t
                            for t in self.logged.texts()))

    def test_command_line_still_wins(self) -> None:
        """
        The command line (and the environment) cannot change under a
        running process: their values keep their precedence over the file.
        """
        load = partial(Settings.load, config_path=self.config.path,
                       command_line={"max_body_bytes": "1000"})
        reloader = Reloader(current=load(), load=load)
        self.config.write(max_body_bytes=2000)
        self.assertEqual(reloader.reload().refused, ())
        self.assertEqual(reloader.current.max_body_bytes, 1000)

    def test_no_key_is_logged(self) -> None:
        self.config.write(keys=(K3, K2), max_body_bytes=1000)
        self.reloader.reload()
        self.config.write(keys=(K3,), deployment_key=f'"{text(K1)}"')
        self.reloader.reload()
        everything = "\n".join(self.logged.texts()) + repr(self.logged.events)
        for key in (K1, K2, K3):
            self.assertNotIn(text(key), everything)
            self.assertNotIn(repr(key), everything)
        self.assertIn("deployment_key changed", everything)

    def test_only_settings_can_be_reloadable(self) -> None:
        with pytest.raises(ValueError):
            self.reloader.on("no_such_key", print)


class ReplaceKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        revocations = MemoryRevocations(clock=self.clock)
        self.cookie = ClientSessionCache(keys=(K1,), revocations=revocations, clock=self.clock,
                                         carrier_name="c")
        self.header = ClientSessionCache(keys=(K1,), revocations=revocations, clock=self.clock,
                                         carrier_name="h")

    def token(self, cache: ClientSessionCache) -> str:
        session = self.successResultOf(cache.create())
        session.user_id = "alice"
        return self.successResultOf(cache.save(session))

    def test_rotation_reseals_and_retiring_ends(self) -> None:
        """
        After [new, old], an old token opens, is marked for re-sealing, and
        is re-sealed with the new key; after [new], old tokens no longer
        open and new ones do.
        """
        old = self.token(self.cookie)
        self.assertEqual(key_of(old), key_id(K1))
        self.cookie.replace_keys([K2, K1])
        session = self.successResultOf(self.cookie.load(old))
        self.assertEqual(session.user_id, "alice")
        self.assertTrue(session.dirty)
        new = self.successResultOf(self.cookie.save(session))
        self.assertEqual(key_of(new), key_id(K2))
        self.cookie.replace_keys([K2])
        self.assertIsNone(self.successResultOf(self.cookie.load(old)))
        self.assertEqual(self.successResultOf(self.cookie.load(new)).user_id, "alice")

    def test_bad_keys_keep_the_old(self) -> None:
        token = self.token(self.cookie)
        for bad in ([], [b"short"], [K2, K2], [bytes(32)]):
            with pytest.raises(KeyringError):
                self.cookie.replace_keys(bad)
        self.assertEqual(self.cookie.keys, (K1,))
        self.assertIsNotNone(self.successResultOf(self.cookie.load(token)))

    def test_applier_changes_every_client_cache(self) -> None:
        """
        The session_keys applier rotates both carriers' caches, checking
        the keys before changing either; other caches are ignored.
        """
        apply = session_key_appliers([self.cookie, self.header, self.cookie, object()])
        with pytest.raises(KeyringError):
            apply((K2, K2))
        self.assertEqual((self.cookie.keys, self.header.keys), ((K1,), (K1,)))
        apply((K2, K1))
        self.assertEqual((self.cookie.keys, self.header.keys), ((K2, K1), (K2, K1)))
        self.assertEqual(key_of(self.token(self.header)), key_id(K2))
        session_key_appliers([])((K3,))  # no client cache: nothing to change
