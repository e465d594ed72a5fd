"""
The JSON echo every baseline server answers, so they all do the same work.

``POST`` body ``{"method": "echo", "parameters": {"x": 1}}`` answers
``{"result": {"x": 1}}``; a body that is not a call to a known method
answers 400 or 404 with ``{"error": ...}``.  A dict lookup stands in for a
method registry: the least a JSON-method server can do.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Tuple

METHODS: Dict[str, Callable[[Any], Any]] = {"echo": lambda parameters: parameters}

_encode = json.JSONEncoder(separators=(",", ":")).encode


def answer(body: bytes) -> Tuple[int, bytes]:
    """
    Answer one request body.

    :return: the HTTP status and the JSON response body.
    """
    try:
        call = json.loads(body)
        method = METHODS[call["method"]]
        parameters = call.get("parameters", {})
    except KeyError:
        return 404, b'{"error":{"code":40400,"value":"unknown method"}}'
    except (ValueError, TypeError, AttributeError):
        return 400, b'{"error":{"code":40000,"value":"bad request"}}'
    return 200, _encode({"result": method(parameters)}).encode()


def port_from_argv(argv: Any) -> int:
    """
    The ``--port N`` every server script takes.
    """
    return int(argv[argv.index("--port") + 1])
