"""
Helpers for testing services built on twistauth, with trial or pytest.

- `MethodClient` calls JSON methods on a `twistauth.TwistauthApp` through
  ``treq.testing.StubTreq``: the whole HTTP stack, no sockets.
- `FakeProvider` is an OpenID provider (discovery, JWKS, authorize, token,
  userinfo, end-session, back-channel logout tokens) that can misbehave on
  demand (`TOKEN_FAULTS`, `HTTP_FAULTS`, `ENDPOINT_FAULTS`) and counts the
  calls made to each endpoint.
"""

from twistauth.testing._client import MethodClient, Response, error_from_json
from twistauth.testing._provider import (
    ENDPOINT_FAULTS,
    HTTP_FAULTS,
    TOKEN_FAULTS,
    FakeProvider,
    SigningKey,
)

__all__ = [
    "ENDPOINT_FAULTS",
    "HTTP_FAULTS",
    "TOKEN_FAULTS",
    "FakeProvider",
    "MethodClient",
    "Response",
    "SigningKey",
    "error_from_json",
]
