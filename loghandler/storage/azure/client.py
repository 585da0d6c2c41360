"""
:class:`AzureBlobClient`: the :class:`~loghandler.storage.azure.api.IAppendBlobClient`
on azure-storage-blob's synchronous client, each call run on a bounded thread pool of
its own (``deferToThreadPool``), stopped by :meth:`AzureBlobClient.close` after the
flush (DESIGN.md section 7).

- The SDK's own retries are off (``retry_total=0``): the one retry layer
  (:mod:`loghandler.retry`) retries, with the ``appendpos`` condition.
- A call running in a thread cannot be cancelled, so each call gets its own
  timeout (the start check at most :data:`CHECK_TIMEOUT_S`), the retry layer's :meth:`~loghandler.retry.RetryLayer.attempt_timeout`
  (capped by the time left before the shutdown deadline): the connection and each
  read of the answer (``connection_timeout``, ``read_timeout``).
- The SDK's errors become :class:`~loghandler.interfaces.StorageError` with Azure's
  status and error code and a message without secrets (:func:`redacted`) (a 412 :class:`~loghandler.interfaces.PreconditionFailed`);
  no usable answer (refused, timed out, cut inside the answer) is status 0; a credential that cannot get a
  token (azure-identity) is 401 ``CredentialUnavailable``.

REST pages: Get Blob Properties, Put Blob (append blob),
Append Block, Get Blob; https://learn.microsoft.com/rest/api/storageservices/
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.storage.azure.api import BLOB_NOT_FOUND, Appended, BlobState, IAppendBlobClient

_T = TypeVar("_T")

#: Seconds the start check (and each check while it fails) may take: the daemon
#: answers 503 meanwhile, and says why once it fails.
CHECK_TIMEOUT_S = 10.0
#: Seconds :meth:`AzureBlobClient.close` waits for calls still running in threads;
#: then the process goes on without them (the threads are daemon threads).
CLOSE_GRACE_S = 1.0
#: The blob the start check asks for (Get Blob Properties; it never exists): the
#: call needs only what the writer needs, blob read permission, which a container
#: SAS or the Storage Blob Data Contributor role grants (Get Container Properties
#: needs more).
CHECK_BLOB = "_loghandler/container-check"


class _DaemonThreadPool(ThreadPool):
    """
    A thread pool of daemon threads: a call hung in a thread (a server that never
    answers) cannot hold the process at exit, nor ``reactor.stop``.
    """

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        return threading.Thread(*args, daemon=True, **kwargs)


def _blob_not_found(error: StorageError) -> bool:
    return error.code == BLOB_NOT_FOUND


def without_query(url: str) -> str:
    """``url`` without its query (a SAS token is a secret), for logs."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


#: A URL's query in a text: from ``?`` to the next space, quote or parenthesis.
_QUERY = re.compile(r"\?[^\s'\"()<>]+")
#: A secret written ``name=value`` (a connection string's, a SAS's, an AWS query's).
_SECRET_SETTING = re.compile(
    r"(?i)\b(accountkey|sharedaccesssignature|sig|signature|x-amz-signature"
    r"|x-amz-security-token|x-amz-credential)=[^\s;&'\"()<>]+"
)
#: An ``Authorization`` header's credentials.
_AUTHORIZATION = re.compile(r"(?i)\b(authorization:?\s*\w+)\s+[^\s'\"()<>,]+")


def redacted(text: str) -> str:
    """
    ``text`` (an SDK's error message) without what may be secret: every URL query
    becomes ``?<query hidden>`` (requests names the URL, SAS token and all, when a
    connection is refused), a key, SAS or signature written ``name=value`` becomes
    ``name=<hidden>``, and ``Authorization`` credentials ``<hidden>``.
    """
    text = _QUERY.sub("?<query hidden>", text)
    text = _SECRET_SETTING.sub(lambda m: m.group(1) + "=<hidden>", text)
    return _AUTHORIZATION.sub(lambda m: m.group(1) + " <hidden>", text)


def storage_error(operation: str, error: BaseException) -> BaseException:
    """
    What the SDK raised, as the store's error (see the module docstring); an
    exception of any other kind is returned as it is.
    """
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    if isinstance(error, HttpResponseError) and error.status_code:
        code = getattr(error, "error_code", None) or ""
        if not code and error.response is not None:
            code = getattr(error.response, "headers", {}).get("x-ms-error-code", "")
        code = str(getattr(code, "value", code))  # a StorageErrorCode member, or text
        message = redacted((error.reason or "").strip())
        if error.status_code == 412:
            return PreconditionFailed(operation, message, code or "ConditionNotMet")
        return StorageError(operation, error.status_code, code, message)
    if isinstance(error, ClientAuthenticationError):  # no token from the credential
        return StorageError(operation, 401, "CredentialUnavailable", _first_line(error))
    if isinstance(error, (ServiceRequestError, ServiceResponseError, HttpResponseError)):
        # No usable answer: refused, timed out, or cut inside the answer (an
        # IncompleteReadError, or an HttpResponseError without a status).
        return StorageError(operation, 0, type(error).__name__, _first_line(error))
    return error


def _first_line(error: BaseException) -> str:
    """The first line of the error's message, :func:`redacted`."""
    lines = str(error).splitlines()
    return redacted(lines[0]) if lines else ""


@implementer(IAppendBlobClient)
class AzureBlobClient:
    """
    One container's append blobs through azure-storage-blob.

    :param container_client: an ``azure.storage.blob.ContainerClient`` built with
        ``retry_total=0`` (see :func:`~loghandler.storage.azure.settings.container_client`).
    :param reactor: fires the results on the reactor thread.
    :param threads: the pool's size: calls at once.
    :param timeout: seconds the next call may take (the retry layer's
        :meth:`~loghandler.retry.RetryLayer.attempt_timeout`).
    """

    name = "azure"

    def __init__(
        self,
        container_client: Any,
        reactor: Any,
        threads: int,
        timeout: Callable[[], float],
    ) -> None:
        self._container = container_client
        self.container: str = container_client.container_name
        self._reactor = reactor
        self._timeout = timeout
        self._pool = _DaemonThreadPool(minthreads=0, maxthreads=threads, name="azure-blob")
        self._started = False

    def __repr__(self) -> str:
        return f"<AzureBlobClient {without_query(self._container.url)}>"

    def _run(
        self,
        operation: str,
        call: Callable[..., _T],
        timeout: Optional[float] = None,
        answers: Optional[tuple[Callable[[StorageError], bool], _T]] = None,
        **kwargs: Any,
    ) -> "Deferred[_T]":
        """
        ``call(**kwargs)`` on the pool, with the timeouts; what it raises becomes
        the store's error (:func:`storage_error`), once.  ``answers``: (a test of
        that error, the result to give instead), for an error answer that is an
        answer (a missing blob, a blob that exists).
        """
        if not self._started:
            self._pool.start()
            self._started = True
        seconds = max(0.1, min(self._timeout(), timeout or float("inf")))
        kwargs.update(connection_timeout=seconds, read_timeout=seconds)
        # The server's own timeout for the operation, whole seconds (at least 1).
        kwargs.setdefault("timeout", max(1, int(seconds)))

        def in_thread() -> _T:
            try:
                return call(**kwargs)
            except Exception as e:
                converted = storage_error(operation, e)
                if (
                    answers is not None
                    and isinstance(converted, StorageError)
                    and answers[0](converted)
                ):
                    return answers[1]
                if converted is e:
                    raise
                raise converted from None

        return deferToThreadPool(self._reactor, self._pool, in_thread)

    def check(self) -> "Deferred[None]":
        """
        Get Blob Properties of :data:`CHECK_BLOB` in the container, within
        :data:`CHECK_TIMEOUT_S`: fires when the container answers (the blob is
        missing, as it should be); 404 ContainerNotFound, 403... errback.
        """
        blob = self._container.get_blob_client(CHECK_BLOB)

        def call(**kwargs: Any) -> None:
            blob.get_blob_properties(**kwargs)

        return self._run(
            "GetBlobProperties", call, timeout=CHECK_TIMEOUT_S, answers=(_blob_not_found, None)
        )

    def properties(self, name: str) -> "Deferred[Optional[BlobState]]":
        blob = self._container.get_blob_client(name)

        def call(**kwargs: Any) -> Optional[BlobState]:
            props = blob.get_blob_properties(**kwargs)
            blob_type = getattr(props.blob_type, "value", str(props.blob_type))
            return BlobState(
                size=int(props.size),
                blocks=int(props.append_blob_committed_block_count or 0),
                blob_type=str(blob_type),
            )

        return self._run("GetBlobProperties", call, answers=(_blob_not_found, None))

    def create(self, name: str, content_type: str) -> "Deferred[bool]":
        from azure.core import MatchConditions
        from azure.storage.blob import ContentSettings

        blob = self._container.get_blob_client(name)

        def call(**kwargs: Any) -> bool:
            blob.create_append_blob(
                content_settings=ContentSettings(content_type=content_type),
                match_condition=MatchConditions.IfMissing,
                **kwargs,
            )
            return True

        # 409 or 412: it exists (If-None-Match: *).
        exists = (lambda error: error.status in (409, 412), False)
        return self._run("CreateAppendBlob", call, answers=exists)

    def append(
        self, name: str, body: bytes, position: int, max_size: int
    ) -> "Deferred[Appended]":
        blob = self._container.get_blob_client(name)

        def call(**kwargs: Any) -> Appended:
            answer = blob.append_block(
                body,
                length=len(body),
                appendpos_condition=position,
                maxsize_condition=max_size,
                **kwargs,
            )
            return Appended(
                offset=int(answer["blob_append_offset"]),
                blocks=int(answer["blob_committed_block_count"]),
            )

        return self._run("AppendBlock", call)

    def read(self, name: str, offset: int, length: int) -> "Deferred[bytes]":
        blob = self._container.get_blob_client(name)

        def call(**kwargs: Any) -> bytes:
            data: bytes = blob.download_blob(
                offset=offset, length=length, max_concurrency=1, **kwargs
            ).readall()
            return data

        # 416: the blob ends before offset.
        return self._run("GetBlob", call, answers=(lambda error: error.status == 416, b""))

    def close(self) -> "Deferred[None]":
        """
        Stop the thread pool and close the connections, in a thread of their own;
        fires once done, or after :data:`CLOSE_GRACE_S` when a call still hangs in
        a thread (its timeout is its own; the daemon threads do not hold the exit).
        """
        done: Deferred[None] = Deferred()

        def fire() -> None:
            if grace.active():
                grace.cancel()
            if not done.called:
                done.callback(None)

        def stop() -> None:
            try:
                if self._started:
                    self._pool.stop()
                self._container.close()
            finally:
                self._reactor.callFromThread(fire)

        grace = self._reactor.callLater(CLOSE_GRACE_S, fire)
        threading.Thread(target=stop, name="azure-blob-close", daemon=True).start()
        return done
