"""
Tests for :mod:`loghandler.keys`: the UTC date of a millisecond timestamp and the
object keys built from it (DESIGN.md section 2).
"""

from __future__ import annotations

import datetime
import os
import time

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from loghandler.keys import key_for, object_key, rollover_key, utc_date

_UTC = datetime.timezone.utc
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)


def _ms(*args: int) -> int:
    """Unix epoch milliseconds of a UTC datetime given as (year, month, day, ...)."""
    delta = datetime.datetime(*args, tzinfo=_UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


class UtcDateTests(SynchronousTestCase):
    """``utc_date`` gives the UTC calendar date as YYYY-MM-DD."""

    def test_midnight(self) -> None:
        """23:59:59.999 and the next 00:00:00.000 give two consecutive dates."""
        self.assertEqual(utc_date(1_585_526_399_999), "2020-03-29")
        self.assertEqual(utc_date(1_585_526_400_000), "2020-03-30")

    def test_helper_matches_known_value(self) -> None:
        """The test's own millisecond helper agrees with a known epoch value."""
        self.assertEqual(_ms(2020, 3, 30), 1_585_526_400_000)

    def test_epoch(self) -> None:
        """Timestamp 0 is 1970-01-01, and 1 ms before it is 1969-12-31."""
        self.assertEqual(utc_date(0), "1970-01-01")
        self.assertEqual(utc_date(86_399_999), "1970-01-01")
        self.assertEqual(utc_date(86_400_000), "1970-01-02")
        self.assertEqual(utc_date(-1), "1969-12-31")

    def test_leap_day(self) -> None:
        """2024-02-29 exists and is followed by 2024-03-01."""
        self.assertEqual(utc_date(_ms(2024, 2, 28, 23, 59, 59, 999_000)), "2024-02-28")
        self.assertEqual(utc_date(_ms(2024, 2, 29)), "2024-02-29")
        self.assertEqual(utc_date(_ms(2024, 2, 29, 23, 59, 59, 999_000)), "2024-02-29")
        self.assertEqual(utc_date(_ms(2024, 3, 1)), "2024-03-01")

    def test_no_leap_day_in_2023(self) -> None:
        """In 2023 February 28 is followed by March 1."""
        self.assertEqual(utc_date(_ms(2023, 3, 1) - 1), "2023-02-28")
        self.assertEqual(utc_date(_ms(2023, 3, 1)), "2023-03-01")

    def test_year_boundary(self) -> None:
        """The last ms of 2023 and the first of 2024 fall in different years."""
        self.assertEqual(utc_date(1_704_067_199_999), "2023-12-31")
        self.assertEqual(utc_date(1_704_067_200_000), "2024-01-01")

    def test_zero_padded(self) -> None:
        """Month and day are zero-padded to two digits."""
        self.assertEqual(utc_date(_ms(2021, 1, 5, 12)), "2021-01-05")

    def _set_tz(self, zone: str) -> None:
        """Set the process time zone to ``zone`` until the test ends."""
        old = os.environ.get("TZ")

        def restore() -> None:
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()

        self.addCleanup(restore)
        os.environ["TZ"] = zone
        time.tzset()

    def test_ignores_tz_kiritimati(self) -> None:
        """With TZ=Pacific/Kiritimati (UTC+14) the date is still the UTC one."""
        self._set_tz("Pacific/Kiritimati")
        noon = _ms(2020, 3, 29, 12)
        # The zone is in effect: local time is already the next day.
        self.assertEqual(time.strftime("%Y-%m-%d", time.localtime(noon // 1000)), "2020-03-30")
        self.assertEqual(utc_date(noon), "2020-03-29")
        self.assertEqual(utc_date(1_585_526_399_999), "2020-03-29")
        self.assertEqual(utc_date(1_585_526_400_000), "2020-03-30")
        self.assertEqual(key_for(noon, 4), "chat/2020-03-29/content_logs_2020-03-29_4")

    def test_ignores_tz_los_angeles(self) -> None:
        """With TZ=America/Los_Angeles (UTC-7 in summer) the date is still the UTC one."""
        self._set_tz("America/Los_Angeles")
        early = _ms(2020, 3, 30, 3)
        # The zone is in effect: local time is still the previous day.
        self.assertEqual(time.strftime("%Y-%m-%d", time.localtime(early // 1000)), "2020-03-29")
        self.assertEqual(utc_date(early), "2020-03-30")
        self.assertEqual(utc_date(1_585_526_399_999), "2020-03-29")
        self.assertEqual(utc_date(1_585_526_400_000), "2020-03-30")
        self.assertEqual(key_for(early, 4), "chat/2020-03-30/content_logs_2020-03-30_4")

    @settings(database=None, deadline=None, max_examples=500)
    @given(st.integers(min_value=0, max_value=4_102_444_800_000))
    def test_matches_datetime(self, timestamp: int) -> None:
        """For any timestamp up to 2100-01-01, utc_date equals datetime's UTC date."""
        expected = (_EPOCH + datetime.timedelta(milliseconds=timestamp)).date().isoformat()
        self.assertEqual(utc_date(timestamp), expected)

    @settings(database=None, deadline=None, max_examples=200)
    @given(st.integers(min_value=1, max_value=4_102_444_800_000 // 86_400_000))
    def test_day_edges(self, day: int) -> None:
        """The ms before each UTC midnight and the midnight itself give consecutive dates."""
        midnight = day * 86_400_000
        self.assertEqual(
            utc_date(midnight), (_EPOCH + datetime.timedelta(days=day)).date().isoformat()
        )
        self.assertEqual(
            utc_date(midnight - 1),
            (_EPOCH + datetime.timedelta(days=day - 1)).date().isoformat(),
        )


class KeyTests(SynchronousTestCase):
    """Object keys have the exact documented form."""

    def test_object_key(self) -> None:
        """object_key gives chat/{date}/content_logs_{date}_{client_id} without a leading slash."""
        key = object_key("2020-03-30", 3)
        self.assertEqual(key, "chat/2020-03-30/content_logs_2020-03-30_3")
        self.assertFalse(key.startswith("/"))

    def test_object_key_large_client(self) -> None:
        """A multi-digit client_id is written in decimal without padding."""
        self.assertEqual(
            object_key("2024-02-29", 1_000_000), "chat/2024-02-29/content_logs_2024-02-29_1000000"
        )

    def test_key_for(self) -> None:
        """key_for uses the message's own UTC date on each side of midnight."""
        self.assertEqual(key_for(1_585_526_399_999, 3), "chat/2020-03-29/content_logs_2020-03-29_3")
        self.assertEqual(key_for(1_585_526_400_000, 3), "chat/2020-03-30/content_logs_2020-03-30_3")
        self.assertEqual(key_for(0, 10), "chat/1970-01-01/content_logs_1970-01-01_10")

    def test_rollover_generation_zero(self) -> None:
        """Generation 0 is the key itself."""
        key = "chat/2020-03-30/content_logs_2020-03-30_3"
        self.assertEqual(rollover_key(key, 0), key)

    def test_rollover_generations(self) -> None:
        """Generations 1 and 2 append .1 and .2 to the key."""
        key = "chat/2020-03-30/content_logs_2020-03-30_3"
        self.assertEqual(rollover_key(key, 1), key + ".1")
        self.assertEqual(rollover_key(key, 2), key + ".2")
        self.assertEqual(rollover_key(key, 12), key + ".12")
