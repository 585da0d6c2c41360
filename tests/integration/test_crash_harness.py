"""
The crash harness's own logic (:class:`~tests.integration.test_crash.CrashHarness`),
without moto or a daemon: its wait for recovery against a scripted staging area.

A recoverer completes a staging upload (the upload becomes a staging object), merges
the object into its key and deletes it.  The harness must not take the staging area
for empty while one of these steps is under way, whatever falls between its
requests, or it reads the key before the merge landed and reports every line of the
key lost (``test_durable_sigkill``, client 9, the key recovery merges last).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.test_crash import STAGING_PREFIX, CrashHarness

UPLOAD = STAGING_PREFIX + "0123456789abcdef/chat/2026-12-02/content_logs_2026-12-02_9/1"


class ScriptedStaging:
    """
    The two listings the harness makes (botocore's ``list_objects_v2`` paginator and
    ``list_multipart_uploads``) over a staging area, and a recoverer that acts
    between the harness's requests: after the harness's request number N (counted
    from 1) it runs ``script[N]``.

    :ivar uploads: keys of the staging uploads in progress.
    :ivar objects: keys of the staging objects.
    :ivar merged: whether the recoverer's merge into the key landed.
    :ivar requests: listings answered so far.
    """

    def __init__(self, script: dict[int, Callable[["ScriptedStaging"], None]]) -> None:
        self.uploads = {UPLOAD}
        self.objects: set[str] = set()
        self.merged = False
        self.requests = 0
        self._script = script

    def _after_request(self) -> None:
        self.requests += 1
        step = self._script.get(self.requests)
        if step is not None:
            step(self)

    # -- what the recoverer does -----------------------------------------------------

    def complete(self) -> None:
        """CompleteMultipartUpload, at once (as S3 does it)."""
        self.uploads.discard(UPLOAD)
        self.objects.add(UPLOAD)

    def end_upload(self) -> None:
        """The first half of moto's CompleteMultipartUpload: the upload is gone..."""
        self.uploads.discard(UPLOAD)

    def store_object(self) -> None:
        """...the second half: the object is stored."""
        self.objects.add(UPLOAD)

    def merge(self) -> None:
        """The merge into the key lands; then the staging object is deleted."""
        self.merged = True
        self.objects.discard(UPLOAD)

    # -- botocore's calls ------------------------------------------------------------

    def botocore_client(self) -> "ScriptedStaging":
        return self

    bucket = "bucket"

    def close(self) -> None:
        pass

    def get_paginator(self, name: str) -> "ScriptedStaging":
        assert name == "list_objects_v2"
        return self

    def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:
        contents = [{"Key": k, "Size": 1} for k in sorted(self.objects) if k.startswith(Prefix)]
        self._after_request()
        return [{"Contents": contents}]

    def list_multipart_uploads(self, Bucket: str, Prefix: str) -> dict[str, Any]:
        uploads = [
            {"Key": k, "UploadId": "u"} for k in sorted(self.uploads) if k.startswith(Prefix)
        ]
        self._after_request()
        return {"Uploads": uploads, "IsTruncated": False}


class WaitUnstagedTests(SynchronousTestCase):
    """:meth:`CrashHarness.wait_unstaged` returns only once the merge landed."""

    def wait(self, staging: ScriptedStaging) -> None:
        harness = CrashHarness(staging, ".")  # type: ignore[arg-type]
        self.addCleanup(harness.close)
        waited = harness.wait_unstaged(0.0, timeout=1e9, poll_s=0.0)
        self.assertIsNotNone(waited)
        self.assertTrue(
            staging.merged,
            f"wait_unstaged returned after {staging.requests} listings, before the merge"
            f" landed (uploads {sorted(staging.uploads)}, objects {sorted(staging.objects)})",
        )
        self.assertEqual((staging.uploads, staging.objects), (set(), set()))

    def test_upload_completed_between_the_two_listings(self) -> None:
        """
        The recoverer completes the key's staging upload right after the harness's
        first request, and merges a few requests later.
        """
        self.wait(ScriptedStaging({1: ScriptedStaging.complete, 4: ScriptedStaging.merge}))

    def test_completed_at_any_request(self) -> None:
        """The same, whichever request the completion follows."""
        for at in range(1, 8):
            self.wait(
                ScriptedStaging({at: ScriptedStaging.complete, at + 3: ScriptedStaging.merge})
            )

    def test_moto_completion_not_atomic(self) -> None:
        """
        moto's CompleteMultipartUpload removes the upload, then stores the object:
        a pair of listings that falls between the two sees neither.
        """
        self.wait(
            ScriptedStaging(
                {
                    1: ScriptedStaging.end_upload,
                    3: ScriptedStaging.store_object,
                    6: ScriptedStaging.merge,
                }
            )
        )

    def test_nothing_staged(self) -> None:
        """Nothing staged and nothing to merge: it returns (after two polls)."""
        staging = ScriptedStaging({})
        staging.uploads.clear()
        harness = CrashHarness(staging, ".")  # type: ignore[arg-type]
        self.addCleanup(harness.close)
        self.assertIsNotNone(harness.wait_unstaged(0.0, timeout=1e9, poll_s=0.0))
        self.assertEqual(staging.requests, 4)
