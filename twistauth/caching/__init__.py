"""
Cached JSON methods with namespace invalidation and cascades (carafe's
``cached_view``), on a memory or Redis backend.
"""

from twistauth.caching._interfaces import ICacheBackend
from twistauth.caching.build import make_method_cache
from twistauth.caching.cache import CacheSpec, InvalidatesSpec, MethodCache
from twistauth.caching.decorators import MAX_TTL, cached, invalidates
from twistauth.caching.memory import MemoryCacheBackend
from twistauth.caching.redis import RedisCacheBackend

__all__ = [
    "CacheSpec",
    "ICacheBackend",
    "InvalidatesSpec",
    "MAX_TTL",
    "MemoryCacheBackend",
    "MethodCache",
    "RedisCacheBackend",
    "cached",
    "invalidates",
    "make_method_cache",
]
