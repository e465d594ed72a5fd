"""
Logging for twistauth on ``twisted.logger``: one redaction filter in front
of text, JSON-lines, rotating-file and alert-mail observers, request ids, a
batched access log, and the start-up wiring.
"""

from twistauth.observe._access import AccessLog
from twistauth.observe._alerts import AlertObserver, MemoryMailSender, SMTPMailSender
from twistauth.observe._interfaces import IMailSender
from twistauth.observe._pipeline import (
    AlertSettings,
    LoggingService,
    LoggingSetup,
    LogPipeline,
    LogSetupError,
    ObserverSpec,
    build_access_log,
    build_logging,
    check_log_files,
    check_observer_spec,
    logging_from_settings,
    offer_twistd_observer,
    parse_observer_spec,
)
from twistauth.observe._redact import (
    REDACTED,
    RedactedFailure,
    RedactingObserver,
    Redactor,
    redact_text,
)
from twistauth.observe._requestid import (
    REQUEST_ID_HEADER,
    LogTag,
    RequestIds,
    RequestLogger,
    bind_request_id,
    request_id_of,
    request_logger,
)
from twistauth.observe._sinks import event_as_dict, format_json, format_text, parse_level

__all__ = [
    "REDACTED",
    "AccessLog",
    "REQUEST_ID_HEADER",
    "AlertObserver",
    "AlertSettings",
    "IMailSender",
    "LogPipeline",
    "LogSetupError",
    "LogTag",
    "LoggingService",
    "LoggingSetup",
    "MemoryMailSender",
    "ObserverSpec",
    "RedactedFailure",
    "RedactingObserver",
    "Redactor",
    "RequestIds",
    "RequestLogger",
    "SMTPMailSender",
    "bind_request_id",
    "build_access_log",
    "build_logging",
    "check_log_files",
    "check_observer_spec",
    "event_as_dict",
    "format_json",
    "format_text",
    "logging_from_settings",
    "offer_twistd_observer",
    "parse_level",
    "parse_observer_spec",
    "redact_text",
    "request_id_of",
    "request_logger",
]
