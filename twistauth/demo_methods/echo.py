"""
``echo``: answers its parameters unchanged.
"""

from typing import Any, Dict


def invoke(handler: Any, parameters: Dict[str, Any]) -> Dict[str, Any]:
    """
    Answer the parameters as they were sent: a way to check that a client
    and the server agree on the protocol.
    """
    return parameters
