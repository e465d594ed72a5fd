"""
Sessions: the model, the cache interface, and its implementations.
"""

from twistauth.sessions._interfaces import IRevocations, ISessionCache, Session
from twistauth.sessions.client import ClientSessionCache
from twistauth.sessions.errors import SessionStoreUnavailableError, SessionTooLargeError
from twistauth.sessions.memory import MemorySessionCache
from twistauth.sessions.redis import RedisSessionCache
from twistauth.sessions.revocation import MemoryRevocations, RedisRevocations
from twistauth.sessions.sealing import KeyringError, generate_key, load_keys

__all__ = [
    "ClientSessionCache",
    "IRevocations",
    "ISessionCache",
    "KeyringError",
    "MemoryRevocations",
    "MemorySessionCache",
    "RedisRevocations",
    "RedisSessionCache",
    "Session",
    "SessionStoreUnavailableError",
    "SessionTooLargeError",
    "generate_key",
    "load_keys",
]
