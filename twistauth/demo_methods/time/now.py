"""
``time.now``: the server's clock.
"""

from typing import Any, Dict

from twistauth.errors import InvalidParametersError


def invoke(handler: Any, parameters: Dict[str, Any]) -> Dict[str, float]:
    """
    Answer the server's current time in seconds since the epoch (UTC), read
    from the app's injected clock.
    """
    if parameters:
        raise InvalidParametersError("time.now takes no parameters")
    return {"seconds": handler.services.clock.seconds()}
