"""
Sessions: the model, the cache interface, and its implementations.
"""

from twistauth.sessions._interfaces import ISessionCache, Session

__all__ = ["ISessionCache", "Session"]
