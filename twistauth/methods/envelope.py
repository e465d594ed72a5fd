"""
The request envelope: what a body must look like to be a call or a batch.

A call is ``{"method": NAME, "parameters": {...}}`` (``parameters`` may be
left out); a batch is ``{"batch": {KEY: call, ...}}``.  Anything else is a
`InvalidEnvelopeError` whose message says what was wrong.  A malformed entry
of a batch fails on its own; the others still run.
"""

from __future__ import annotations

from typing import Any, Dict, Union

import attr

from twistauth.errors import BatchTooLargeError, InvalidEnvelopeError, TwistauthError

_CALL_KEYS = frozenset(("method", "parameters"))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Call:
    """
    One method call.
    """

    method: str
    parameters: Dict[str, Any]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Batch:
    """
    Several calls, each answered under its own key.  An entry that is not a
    valid call is kept as the error it will be answered with.
    """

    calls: Dict[str, Union[Call, TwistauthError]]


def parse_call(value: Any, where: str = "the body") -> Call:
    """
    Check one call.

    :raises InvalidEnvelopeError: it is not a call.
    """
    if not isinstance(value, dict):
        raise InvalidEnvelopeError(f"{where} must be an object with a 'method'")
    method = value.get("method")
    if not isinstance(method, str) or not method:
        raise InvalidEnvelopeError(f"{where} needs a 'method' that is a non-empty string")
    parameters = value.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidEnvelopeError(f"'parameters' in {where} must be an object")
    if len(value) > 2 or (len(value) == 2 and "parameters" not in value):
        extra = sorted(set(value) - _CALL_KEYS)
        raise InvalidEnvelopeError(
            f"{where} has the unknown key {extra[0]!r}; a call has 'method' and 'parameters'"
        )
    return Call(method, parameters)


def parse_envelope(value: Any, max_batch_size: int) -> Union[Call, Batch]:
    """
    Check a decoded body.

    :raises InvalidEnvelopeError: it is neither a call nor a batch.
    :raises BatchTooLargeError: a batch has more than ``max_batch_size`` calls.
    """
    if isinstance(value, dict) and "batch" in value:
        if len(value) != 1:
            raise InvalidEnvelopeError("a batch body has only the key 'batch'")
        entries = value["batch"]
        if not isinstance(entries, dict) or not entries:
            raise InvalidEnvelopeError("'batch' must be a non-empty object of key: call")
        if len(entries) > max_batch_size:
            raise BatchTooLargeError(
                f"the batch has {len(entries)} calls; at most {max_batch_size} are allowed"
            )
        calls: Dict[str, Union[Call, TwistauthError]] = {}
        for key, entry in entries.items():
            try:
                calls[key] = parse_call(entry, f"batch entry {key[:100]!r}")
            except InvalidEnvelopeError as e:
                calls[key] = e
        return Batch(calls)
    return parse_call(value)
