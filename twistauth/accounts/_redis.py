"""
Calling Redis from the account stores: every call goes through
`twistauth.redisconn.call` or, for a Lua script,
`twistauth.redisconn.run_script` (a deadline on the injected clock; an outage
becomes `twistauth.errors.BackendUnavailableError`), and an outage is
logged once when it starts and once when it ends, not once per call.
"""

from __future__ import annotations

from typing import Any, Sequence

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth import redisconn
from twistauth.errors import BackendUnavailableError

log = Logger()


@attr.s(kw_only=True)
class RedisCaller:
    """
    Runs txredisapi commands with a deadline.

    :ivar redis: a txredisapi connection (`twistauth.redisconn.connect`, or
        any made with ``convertNumbers=False``).
    :ivar clock: times the deadline.
    :ivar timeout: seconds a command may take, including waiting for a
        connection.
    :ivar what: names the user of the connection in messages.
    """

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=2.0)
    what: str = attr.ib(default="redis")
    _down: bool = attr.ib(default=False, init=False)

    def __call__(self, command: str, *args: Any) -> Any:
        """
        Run ``command`` (a txredisapi method name) with ``args``.

        :return: Deferred firing with the reply, or failing with
            `BackendUnavailableError`.
        """
        d = redisconn.call(
            self.clock, self.timeout, getattr(self.redis, command), *args, what=f"the {self.what}"
        )
        return d.addCallbacks(self._answered, self._failed, errbackArgs=(command,))

    def eval(self, script: redisconn.Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """
        Run a Lua script by `redisconn.run_script` (by SHA; loaded again if
        Redis forgot it), with the deadline.

        :param keys: exactly ``script.keys`` keys.
        :param args: sent as ``str(arg)``: format a float yourself (``repr``).
        :return: as `__call__`.
        """
        d = redisconn.run_script(
            self.redis,
            script,
            keys,
            [str(a) for a in args],
            clock=self.clock,
            timeout=self.timeout,
            what=f"the {self.what}",
        )
        return d.addCallbacks(self._answered, self._failed, errbackArgs=("eval",))

    def _answered(self, reply: Any) -> Any:
        if self._down:
            self._down = False
            log.info("twistauth: {what}: Redis answers again", what=self.what)
        return reply

    def _failed(self, failure: Failure, command: str) -> Failure:
        if failure.check(BackendUnavailableError) and not self._down:
            self._down = True
            log.error(
                "twistauth: {what}: Redis {command} failed ({problem}); answering 503 "
                "until it is back",
                what=self.what,
                command=command.upper(),
                problem=str(failure.value)[:200],
            )
        return failure


__all__ = ["RedisCaller"]
