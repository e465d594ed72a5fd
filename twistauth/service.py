"""
The service tree: listening endpoints around one site.

`TwistauthService` is a ``MultiService`` that a host program can add to
its own.  Stopping it stops listening, closes every open connection and
leaves no delayed call behind.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from twistauth.web.site import TwistauthSite

log = Logger()


class TwistauthService(MultiService):
    """
    Listens on each endpoint with one site, and runs the services the
    app needs in the background.
    """

    def __init__(
        self,
        site: TwistauthSite,
        endpoints: Sequence[str],
        reactor: Any,
        background: Sequence[IService] = (),
        before_stop: Sequence[Callable[[], Deferred[Any]]] = (),
    ) -> None:
        """
        :param background: services started before listening, stopped after.
        :param before_stop: called when stopping, before anything closes
            (answering pending long-polls with a final response).
        """
        super().__init__()
        self.site = site
        self.before_stop = tuple(before_stop)
        self.endpoints = tuple(endpoints)
        # Started first and stopped last (a MultiService stops in reverse).
        for service in background:
            service.setServiceParent(self)
        for description in self.endpoints:
            strports.service(description, site, reactor=reactor).setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        for description in self.endpoints:
            log.info("twistauth: listening on {endpoint}", endpoint=description)

    def stopService(self) -> Deferred[Any]:
        answered = DeferredList([maybeDeferred(hook) for hook in self.before_stop])
        return answered.addCallback(lambda _: self._stop_children())

    def _stop_children(self) -> Deferred[Any]:
        stopped: Deferred[Any] = super().stopService()

        def close_connections(result: Any) -> Deferred[Any]:
            closing: List[Deferred[Any]] = [
                channel.closed() for channel in list(self.site.channels())
            ]
            for channel in list(self.site.channels()):
                channel.loseConnection()
            return DeferredList(closing).addCallback(lambda _: result)

        return stopped.addCallback(close_connections)
