"""
JSON methods: the registry, the envelope, the codecs and the dispatcher.
"""

from twistauth.methods.dispatch import Dispatcher, Transaction
from twistauth.methods.envelope import Batch, Call
from twistauth.methods.handler import Handler, Services
from twistauth.methods.registry import Method, MethodRegistry, method

__all__ = [
    "Batch",
    "Call",
    "Dispatcher",
    "Handler",
    "Method",
    "MethodRegistry",
    "Services",
    "Transaction",
    "method",
]
