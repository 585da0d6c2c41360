"""
Tests for :mod:`loghandler.storage.s3.bucket_checks` over the in-memory S3: the
warnings logged, and that the probe leaves nothing behind.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.interfaces import StorageError
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.api import CompletedPart
from loghandler.storage.s3.bucket_checks import check_bucket, conditional_complete_enforced


class IgnoresIfMatchOnComplete(MemoryStore):
    """A store like moto: CompleteMultipartUpload ignores ``If-Match``."""

    def complete_upload(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[CompletedPart],
        if_match: Optional[str] = None,
        if_none_match: bool = False,
    ) -> Deferred[str]:
        return super().complete_upload(key, upload_id, parts, None, if_none_match)


def warnings(events: Sequence[Any]) -> list[str]:
    return [e["log_format"] for e in events if e["log_level"].name == "warn"]


class BucketChecksTests(SynchronousTestCase):
    """The start-up checks of the bucket."""

    def test_enforcing_store_no_warning_nothing_left(self) -> None:
        """S3's rules: the probe's Complete is refused, nothing is logged or left."""
        s3 = MemoryStore(min_part_size=1)
        with capturedLogs() as events:
            self.successResultOf(ensureDeferred(check_bucket(s3, "w")))
        self.assertEqual(warnings(events), [])
        self.assertEqual((s3.objects, s3.uploads), ({}, {}))
        self.assertIn(("CompleteMultipartUpload", "_loghandler/probe/w"), s3.calls)

    def test_store_ignoring_if_match_warns(self) -> None:
        """A store that completes despite a stale If-Match gets a warning; nothing left."""
        s3 = IgnoresIfMatchOnComplete(min_part_size=1)
        with capturedLogs() as events:
            self.successResultOf(ensureDeferred(check_bucket(s3, "w")))
        (warning,) = warnings(events)
        self.assertIn("does not enforce If-Match on CompleteMultipartUpload", warning)
        self.assertEqual((s3.objects, s3.uploads), ({}, {}))

    def test_versioned_bucket_warns(self) -> None:
        """A versioned bucket gets the NoncurrentVersionExpiration warning."""
        s3 = MemoryStore(min_part_size=1)
        s3.versioning_status = "Enabled"
        with capturedLogs() as events:
            self.successResultOf(ensureDeferred(check_bucket(s3, "w")))
        (warning,) = warnings(events)
        self.assertIn("NoncurrentVersionExpiration", warning)

    def test_failing_probe_logged_not_raised(self) -> None:
        """A probe whose calls fail is logged at info; the check never raises."""
        s3 = MemoryStore(min_part_size=1)
        s3.fail("PutObject", StorageError("PutObject", 403, "AccessDenied"))
        with capturedLogs() as events:
            self.successResultOf(ensureDeferred(check_bucket(s3, "w")))
        self.assertEqual(warnings(events), [])
        self.assertTrue([e for e in events if "could not probe" in e["log_format"]])

    def test_enforced_answer(self) -> None:
        """conditional_complete_enforced answers True for S3's rules, False else."""
        self.assertTrue(
            self.successResultOf(
                ensureDeferred(conditional_complete_enforced(MemoryStore(min_part_size=1), "p"))
            )
        )
        self.assertFalse(
            self.successResultOf(
                ensureDeferred(
                    conditional_complete_enforced(IgnoresIfMatchOnComplete(min_part_size=1), "p")
                )
            )
        )
