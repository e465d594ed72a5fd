"""
The service tree: listening endpoints around one site, and the logging
that runs around them.

`TwistauthService` is a ``MultiService`` that a host program can add to
its own.  Stopping it stops listening, closes every open connection and
leaves no delayed call behind.

`OperatedService` (its base, and the parent's top service with
``--processes N``) carries a `twistauth.observe.LoggingService` as its
first child, so the log observers start before anything else and stop
after everything else.  When the tree is given to ``twistd``'s
application, the redacting pipeline becomes twistd's one log observer
(`twistauth.observe.offer_twistd_observer`); in any other tree it is added
to the global log publisher only if asked (``log_observers`` set
explicitly), since the host program then owns its logging.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger, globalLogPublisher

from twistauth.observe import LoggingService, offer_twistd_observer
from twistauth.web.site import TwistauthSite

log = Logger()


class OperatedService(MultiService):
    """
    A ``MultiService`` whose log pipeline reaches the logging system when
    the tree gets its parent.

    :ivar logging: the pipeline's service, also the first child (or ``None``).
    :ivar offer_to_twistd: make the pipeline twistd's log observer when the
        parent is twistd's application (``False`` when ``twistd --logger``
        chose another observer).
    :ivar attach_elsewhere: otherwise add the pipeline to the global log
        publisher while running.
    """

    logging: Optional[LoggingService] = None
    offer_to_twistd: bool = True
    attach_elsewhere: bool = False

    def set_logging(
        self,
        logging: LoggingService,
        *,
        offer_to_twistd: bool = True,
        attach_elsewhere: bool = False,
    ) -> None:
        """
        Make ``logging`` the first child (call before adding any other).
        """
        self.logging = logging
        self.offer_to_twistd = offer_to_twistd
        self.attach_elsewhere = attach_elsewhere
        logging.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        logging = self.logging
        if logging is not None:
            offered = self.offer_to_twistd and offer_twistd_observer(parent, logging.pipeline)
            if not offered and self.attach_elsewhere:
                logging.publisher = globalLogPublisher
        super().setServiceParent(parent)


class TwistauthService(OperatedService):
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
        before_stop: Sequence[Callable[[], Any]] = (),
        logging: Optional[LoggingService] = None,
        offer_to_twistd: bool = True,
        attach_logging_elsewhere: bool = False,
    ) -> None:
        """
        :param background: services started before listening, stopped after.
        :param before_stop: called when stopping, before anything closes
            (answering pending long-polls with a final response).
        :param logging: the log pipeline's service: started first, stopped
            last (see `OperatedService`).
        :param offer_to_twistd: see `OperatedService.offer_to_twistd`.
        :param attach_logging_elsewhere: see `OperatedService.attach_elsewhere`.
        """
        super().__init__()
        if logging is not None:
            self.set_logging(
                logging,
                offer_to_twistd=offer_to_twistd,
                attach_elsewhere=attach_logging_elsewhere,
            )
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
