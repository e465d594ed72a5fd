"""
The mail-sending contract used by the alert observer.

`IMailSender` sends one finished message.  The alert observer decides what
to send and when (batching, rate limit, deadline); a sender only delivers.
`twistauth.observe.SMTPMailSender` delivers with ``twisted.mail.smtp``;
`twistauth.observe.MemoryMailSender` records messages for tests.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet.defer import Deferred
from zope.interface import Interface


class IMailSender(Interface):
    """
    Delivers one e-mail message.
    """

    def send(sender: str, recipients: Sequence[str], message: bytes) -> Deferred[None]:
        """
        Send ``message`` (a complete RFC 5322 message, lines ending in
        ``\\n``) from the envelope address ``sender`` to ``recipients``.

        :return: a Deferred firing with ``None`` once the server accepted the
            message for at least one recipient, or failing with the reason it
            could not be sent (connection refused, timeout, TLS or
            authentication failure, every recipient refused).  Cancelling
            the Deferred abandons the attempt and closes its connection; the
            Deferred then fails with ``CancelledError``.  It never fires
            twice and never blocks the reactor (name resolution included).
        """
