"""
Running blocking or CPU-heavy work (hashing a part, refreshing credentials,
re-compressing a small object) off the reactor thread: the one ``DeferToThread``
shape every storage module takes, its synchronous default for tests, and the
production one on a Twisted thread pool.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

DeferToThread = Callable[..., "Deferred[Any]"]
"""``defer_to_thread(f, *args)``: call ``f(*args)`` off the reactor thread and fire
with its result (or its failure)."""


def synchronously(f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """The ``DeferToThread`` for tests: call ``f(*args)`` now, on this thread."""
    return maybeDeferred(f, *args)


def on_thread_pool(reactor: Any, pool: Optional[ThreadPool] = None) -> DeferToThread:
    """
    The ``DeferToThread`` that runs on ``pool`` (default: the reactor's own pool,
    looked up at each call, as the reactor starts it lazily) and fires on the
    reactor thread.

    :param reactor: provides ``IReactorThreads``.
    """

    def defer_to_thread(f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        chosen: ThreadPool = pool if pool is not None else reactor.getThreadPool()
        return deferToThreadPool(reactor, chosen, f, *args)

    return defer_to_thread
