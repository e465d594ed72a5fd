"""
Test-only JSON methods for the worker-process tests (loaded by the servers
they start with ``--method-modules workers_methods``): which process
answered, and a method that takes a while.  No tests here.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from twisted.internet.task import deferLater
from twisted.logger import Logger

from twistauth.methods.registry import method

log = Logger()


@method("public.worker_pid")
def worker_pid(handler: Any) -> Dict[str, Any]:
    """
    The process id of the worker that answers.
    """
    return {"pid": os.getpid()}


@method("public.slow")
def slow(handler: Any, seconds: float) -> Any:
    """
    Answer the process id after ``seconds``; logs when it starts, so a test
    knows the call is running.
    """
    log.info("test: slow call for {seconds} s started in {pid}", seconds=seconds, pid=os.getpid())
    return deferLater(handler.services.clock, seconds, lambda: {"pid": os.getpid()})
