"""
The YAML user file's promises (fault test R6): the file is always the old
or the new content, even under ``kill -9``; two processes doing
read-modify-write lose no update; ``ENOSPC`` (a real, tiny tmpfs) is an
error with the old file intact and no temporary file left; mode 0600; a
corrupt or unreadable file is a start-up error naming the path; file I/O
never runs on the reactor thread.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twistauth.accounts import User, UserFileError, YAMLUserStore
from twistauth.accounts.yamlfile import FORMAT, UserFile
from twistauth.errors import BackendUnavailableError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fast_dir(tmp_path: Any) -> Iterator[str]:
    """
    A directory on tmpfs when there is one (``fsync`` is free there, and
    costs ~3.5 ms on this machine's disk), for the tests that write
    thousands of times.  What they test, crash consistency and locking,
    does not depend on ``fsync``.
    """
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        directory = tempfile.mkdtemp(prefix="twistauth-test-", dir=shm)
        yield directory
        shutil.rmtree(directory, ignore_errors=True)
    else:
        yield str(tmp_path)


def temps(directory: str) -> List[str]:
    return [name for name in os.listdir(directory) if ".tmp-" in name]


# -- the basic promises ------------------------------------------------------


def test_written_file_is_private_yaml(tmp_path: Any) -> None:
    path = str(tmp_path / "data" / "users.yaml")
    core = UserFile(path)
    assert core.check() == 0
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
    core.modify(lambda records: (True, records.update(alice=User(user_id="alice").to_record())))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path + ".lock").st_mode) == 0o600
    with open(path) as f:
        data = yaml.safe_load(f)
    assert data["format"] == FORMAT
    assert data["users"]["alice"]["roles"] == []
    assert "user_id" not in data["users"]["alice"]
    assert temps(str(tmp_path / "data")) == []


def test_existing_loose_mode_is_tightened_by_the_next_write(tmp_path: Any) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(f"format: {FORMAT}\nusers: {{}}\n")
    os.chmod(path, 0o644)
    core = UserFile(str(path))
    core.check()
    core.modify(lambda records: (True, records.update(bob=User(user_id="bob").to_record())))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_file_edited_by_hand_is_read(tmp_path: Any) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(
        f"format: {FORMAT}\nusers:\n  carol:\n    roles: [admin]\n    profile: {{zip: '007'}}\n"
    )
    core = UserFile(str(path))
    assert core.check() == 1
    user = User.from_record(core.read()["carol"])
    assert user.roles == frozenset({"admin"})
    assert user.profile == {"zip": "007"}
    assert user.password_hash is None


def test_reads_follow_changes_by_another_writer(tmp_path: Any) -> None:
    path = str(tmp_path / "users.yaml")
    mine, theirs = UserFile(path), UserFile(path)
    mine.check()
    assert mine.read() == {}
    theirs.modify(lambda r: (True, r.update(dave=User(user_id="dave").to_record())))
    assert list(mine.read()) == ["dave"]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("users: [unclosed\n", "not valid YAML"),
        ("just a string\n", "not a twistauth user file"),
        ("format: other/9\nusers: {}\n", "not a twistauth user file"),
        (f"format: {FORMAT}\nusers: [a, b]\n", "'users' must be a mapping"),
        (f"format: {FORMAT}\nusers:\n  eve: [1]\n", "not a user record"),
        (f"format: {FORMAT}\nusers:\n  eve: {{roles: admin}}\n", "user 'eve'"),
        (f"format: {FORMAT}\nusers:\n  eve: !!python/object:os.system {{}}\n", "not valid YAML"),
    ],
)
def test_corrupt_file_is_a_start_up_error_naming_the_path(
    tmp_path: Any, content: str, problem: str
) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(content)
    store = YAMLUserStore(path=str(path), clock=Clock(), reactor=reactor)
    with pytest.raises(UserFileError) as caught:
        store.check()
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)
    assert caught.value.path == str(path)


def test_unreadable_file_is_a_start_up_error_naming_the_path(tmp_path: Any) -> None:
    # A directory where the file should be: unreadable even for root.
    path = tmp_path / "users.yaml"
    path.mkdir()
    with pytest.raises(UserFileError) as caught:
        UserFile(str(path)).check()
    assert str(path) in str(caught.value)
    assert "cannot be read" in str(caught.value)


def test_directory_that_cannot_be_created(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "sub" / "users.yaml"
    with pytest.raises(UserFileError) as caught:
        UserFile(str(path)).check()
    assert str(path) in str(caught.value)
    assert "directory" in str(caught.value)


def test_check_removes_temporary_files_of_interrupted_writes(tmp_path: Any) -> None:
    path = tmp_path / "users.yaml"
    leftover = tmp_path / ".users.yaml.tmp-abcdef"
    leftover.write_text("half a fi")
    unrelated = tmp_path / "other.tmp-1"
    unrelated.write_text("not ours")
    UserFile(str(path)).check()
    assert not leftover.exists()
    assert unrelated.exists()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Any, monkeypatch: Any) -> None:
    """
    An error at any step before the rename (write, fsync) leaves the old
    file as it was and removes the temporary file.
    """
    path = str(tmp_path / "users.yaml")
    core = UserFile(path)
    core.modify(lambda r: (True, r.update(old=User(user_id="old").to_record())))
    with open(path, "rb") as f:
        before = f.read()
    for step in ("write", "fsync"):
        original = getattr(os, step)

        def broken(*args: Any, _original: Any = original, _step: str = step) -> Any:
            if _step == "fsync" and not stat.S_ISREG(os.fstat(args[0]).st_mode):
                return _original(*args)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, step, broken)
        with pytest.raises(OSError):
            core.modify(lambda r: (True, r.update(new=User(user_id="new").to_record())))
        monkeypatch.setattr(os, step, original)
        with open(path, "rb") as f:
            assert f.read() == before
        assert temps(str(tmp_path)) == []
        assert list(core.read()) == ["old"]


def test_change_raising_writes_nothing(tmp_path: Any) -> None:
    path = str(tmp_path / "users.yaml")
    core = UserFile(path)

    def boom(records: Dict[str, Any]) -> Tuple[bool, None]:
        records["x"] = User(user_id="x").to_record()
        raise KeyError("nope")

    with pytest.raises(KeyError):
        core.modify(boom)
    assert not os.path.exists(path)


# -- through the reactor ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_store_io_runs_off_the_reactor_thread(tmp_path: Any, monkeypatch: Any) -> None:
    store = YAMLUserStore(path=str(tmp_path / "users.yaml"), clock=Clock(), reactor=reactor)
    store.check()
    threads: List[int] = []
    for name in ("read", "modify"):
        original = getattr(UserFile, name)

        def spy(self: Any, *args: Any, _original: Any = original) -> Any:
            threads.append(threading.get_ident())
            return _original(self, *args)

        monkeypatch.setattr(UserFile, name, spy)
    await store.create(User(user_id="a"))
    assert (await store.get("a")).user_id == "a"
    assert await store.user_ids() == ["a"]
    assert len(threads) == 3
    assert threading.get_ident() not in threads


@pytest_twisted.ensureDeferred
async def test_run_time_failures_are_503_and_logged_with_the_path(tmp_path: Any) -> None:
    path = tmp_path / "users.yaml"
    store = YAMLUserStore(path=str(path), clock=Clock(), reactor=reactor)
    store.check()
    await store.create(User(user_id="a"))
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        path.write_text("users: [corrupt\n")
        with pytest.raises(BackendUnavailableError) as caught:
            await store.get("a")
        assert str(path) not in str(caught.value.value)  # the client is not told
        with pytest.raises(BackendUnavailableError):
            await store.create(User(user_id="b"))
        os.unlink(path)
        path.mkdir()  # now unreadable
        with pytest.raises(BackendUnavailableError):
            await store.user_ids()
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e for e in events if e.get("log_format", "").startswith("twistauth: cannot")]
    assert len(logged) == 3
    assert all(e["path"] == str(path) for e in logged)


@pytest_twisted.ensureDeferred
async def test_concurrent_writes_in_one_process_all_land(tmp_path: Any) -> None:
    from twisted.internet.defer import DeferredList

    store = YAMLUserStore(path=str(tmp_path / "users.yaml"), clock=Clock(), reactor=reactor)
    store.check()
    results = await DeferredList(
        [store.create(User(user_id=f"u{n}")) for n in range(30)], consumeErrors=True
    )
    assert all(ok for ok, _ in results)
    assert len(await store.user_ids()) == 30


# -- fault injection (R6) ----------------------------------------------------

_WRITER = """
import sys
from twistauth.accounts._interfaces import User
from twistauth.accounts.yamlfile import UserFile

path, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
core = UserFile(path)
print("ready", flush=True)
for n in range(start, start + count):
    record = User(user_id="counter", profile={"n": n, "pad": str(n) * 2000}).to_record()
    core.modify(lambda records: (True, records.update(counter=record)))
    print(n, flush=True)
"""


def test_kill_9_during_writes_leaves_old_or_new(fast_dir: str) -> None:
    """
    R6: writers killed with SIGKILL at random points of 1 000 writes; after
    every kill the file parses and holds a whole generation: the last one
    the writer reported, or the one after it (written, not yet reported).
    """
    path = os.path.join(fast_dir, "users.yaml")
    rng = random.Random(6)
    n = 0
    kills = 0
    while n < 1000:
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, path, str(n), str(1000 - n)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        reported = n - 1
        for _ in range(rng.randrange(0, 350)):
            line = writer.stdout.readline()
            if not line:
                break
            reported = int(line)
        writer.send_signal(signal.SIGKILL)
        rest = writer.stdout.read()
        writer.wait()
        for line in rest.split():
            reported = int(line)
        kills += writer.returncode == -signal.SIGKILL
        core = UserFile(path)
        core.check()  # parses, and removes any temporary file
        assert temps(fast_dir) == []
        records = core.read()
        if reported < 0 and not records:
            continue  # killed before its first write
        profile = records["counter"]["profile"]
        assert profile["pad"] == str(profile["n"]) * 2000  # a whole generation
        assert profile["n"] in (reported, reported + 1)
        n = profile["n"] + 1
    assert kills >= 3


def test_readers_never_see_a_partial_file(fast_dir: str) -> None:
    """
    R6, seen from outside: while another process writes 300 generations,
    every read of the file parses and holds one whole generation, and the
    generations only go forward.
    """
    path = os.path.join(fast_dir, "users.yaml")
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, path, "0", "300"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    seen: List[int] = []
    try:
        while writer.poll() is None or not seen or seen[-1] < 299:
            records = UserFile(path).read()  # a fresh instance: no cache
            if not records:
                continue
            profile = records["counter"]["profile"]
            assert profile["pad"] == str(profile["n"]) * 2000
            seen.append(profile["n"])
    finally:
        writer.kill()
        writer.wait()
    assert seen == sorted(seen)
    assert seen[-1] == 299
    # The reads did overlap the writes.  How many generations a reader
    # sees depends on how the two processes are scheduled: on a loaded
    # machine (2 cores, other jobs) it saw 30 or fewer, so only a few are
    # required.
    assert len(set(seen)) > 5


_INCREMENTER = """
import sys
from twistauth.accounts._interfaces import User
from twistauth.accounts.yamlfile import UserFile

core = UserFile(sys.argv[1])
for _ in range(int(sys.argv[2])):
    def increment(records):
        record = records.get("counter") or User(user_id="counter").to_record()
        profile = dict(record["profile"])
        profile["n"] = profile.get("n", 0) + 1
        records["counter"] = dict(record, profile=profile)
        return True, None
    core.modify(increment)
"""


def test_two_processes_lose_no_update(fast_dir: str) -> None:
    """
    R6: two processes each doing 5 000 read-modify-write increments at
    once; the final count is 10 000.
    """
    path = os.path.join(fast_dir, "users.yaml")
    each = 5000
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _INCREMENTER, path, str(each)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.wait(120) == 0
    assert UserFile(path).read()["counter"]["profile"]["n"] == 2 * each
    assert temps(fast_dir) == []


_ENOSPC = """
import errno, json, os, subprocess, sys
from twistauth.accounts._interfaces import User
from twistauth.accounts.yamlfile import UserFile, YAMLUserStore

mount = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mount], check=True)
path = os.path.join(mount, "users.yaml")
core = UserFile(path)
core.check()
core.modify(lambda r: (True, r.update(old=User(user_id="old").to_record())))
before = open(path, "rb").read()
result = {}
big = User(user_id="big", profile={"blob": "x" * 200_000}).to_record()
try:
    core.modify(lambda r: (True, r.update(big=big)))
    result["sync"] = "no error"
except OSError as e:
    result["sync"] = errno.errorcode.get(e.errno, str(e.errno))
result["sync_intact"] = open(path, "rb").read() == before
result["sync_temps"] = [n for n in os.listdir(mount) if ".tmp-" in n]

# The same through the store: a 503, and the store still works.
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twistauth.errors import BackendUnavailableError

async def main(reactor):
    store = YAMLUserStore(path=path, clock=reactor, reactor=reactor)
    try:
        await store.create(User(user_id="big", profile={"blob": "x" * 200_000}))
        result["async"] = "no error"
    except BackendUnavailableError as e:
        result["async"] = e.name
    result["async_intact"] = open(path, "rb").read() == before
    result["async_temps"] = [n for n in os.listdir(mount) if ".tmp-" in n]
    await store.create(User(user_id="small"))
    result["after"] = await store.user_ids()
    print(json.dumps(result), flush=True)

task.react(lambda reactor: ensureDeferred(main(reactor)))
"""


def test_enospc_on_a_tiny_tmpfs(tmp_path: Any) -> None:
    """
    R6: a real full file system (a 64 KiB tmpfs, mounted in a private user
    and mount namespace, so no root is needed): the write fails with
    ENOSPC, the old file is intact, no temporary file is left, the store
    answers 503 and keeps working for smaller writes.
    """
    unshare = shutil.which("unshare")
    assert unshare is not None, "the ENOSPC test needs util-linux's unshare"
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            sys.executable,
            "-c",
            _ENOSPC,
            str(mount),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    assert result is not None, done.stderr[-2000:]
    assert result == {
        "sync": "ENOSPC",
        "sync_intact": True,
        "sync_temps": [],
        "async": "backend_unavailable",
        "async_intact": True,
        "async_temps": [],
        "after": ["old", "small"],
    }
