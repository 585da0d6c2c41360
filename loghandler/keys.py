"""
Object keys (DESIGN.md section 2): ``chat/{date}/content_logs_{date}_{client_id}``,
``date`` being ``YYYY-MM-DD`` of the message's own timestamp in UTC.  Pure: the
server's time zone (``TZ``) plays no part, and nothing a client sends reaches the key
as text, only validated integers.
"""

from __future__ import annotations

import datetime
from functools import lru_cache

_MS_PER_DAY = 86_400_000
_EPOCH = datetime.date(1970, 1, 1)


@lru_cache(maxsize=64)
def _day_to_date(day: int) -> str:
    return (_EPOCH + datetime.timedelta(days=day)).isoformat()


def utc_date(timestamp_ms: int) -> str:
    """
    The UTC calendar date of a Unix epoch timestamp in milliseconds, as ``YYYY-MM-DD``.
    ``1585526399999`` (2020-03-29T23:59:59.999Z) gives ``2020-03-29``; one ms later,
    ``2020-03-30``.
    """
    return _day_to_date(timestamp_ms // _MS_PER_DAY)


def object_key(date: str, client_id: int) -> str:
    """``chat/{date}/content_logs_{date}_{client_id}``, no leading slash."""
    return "chat/%s/content_logs_%s_%d" % (date, date, client_id)


def key_for(timestamp_ms: int, client_id: int) -> str:
    """The object key of a message with this timestamp (ms) and client_id."""
    return _key_of_day(timestamp_ms // _MS_PER_DAY, client_id)


@lru_cache(maxsize=16384)
def _key_of_day(day: int, client_id: int) -> str:
    """The key of a day (since the epoch) and client: formatted once, not per message."""
    return object_key(_day_to_date(day), client_id)


def rollover_key(key: str, generation: int) -> str:
    """
    The key that continues ``key`` once it is too large to append to
    (DESIGN.md section 5): generation 0 is ``key`` itself, then ``{key}.1``, ``{key}.2``...
    """
    return key if generation == 0 else "%s.%d" % (key, generation)
