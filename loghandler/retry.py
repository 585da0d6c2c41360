"""
The one retry layer (DESIGN.md section 7): every failed storage call is classified
here, once, into a :class:`Fault`, and only here is a call tried again.

- ``TRANSIENT`` (no usable answer: refused, cut, timed out; 5xx; SlowDown,
  RequestTimeout, InternalError; and any exception of a type nobody expected): the
  call may or may not have landed; it is tried again after a wait drawn with full
  jitter, each attempt signed anew by the client, taking its own upload slot, with a
  timeout capped by the time left before the shutdown deadline.  Writers make every
  write safe to repeat (part numbers, write IDs, conditions), so a landed write that
  is sent again stores nothing twice.
- ``PERMANENT`` (access denied, no such bucket or container, a wrong region): fails until an
  operator acts.  Logged once per cause, reported as the store's ``problem`` (so
  ``/healthz`` answers 503 with it), and tried again slowly: the data stay in memory
  and go out once the operator fixed it.
- ``CONFLICT`` (412 Precondition Failed, any 409: ConditionalRequestConflict, Azure's
  BlockCountExceedsLimit): another writer changed the key; raised to the caller,
  which redoes its merge from the HEAD, or reads an append blob back.
- ``GONE`` (NoSuchUpload, NoSuchKey, BlobNotFound): the upload or object is not there (any more);
  raised to the caller, which checks whether its own write landed, never "recreate".
- ``INVALID`` (any other 4xx): this request can never succeed as sent; raised.

Nothing is retried past the shutdown deadline (:meth:`RetryLayer.stopping`):
sleeping retries are woken when the flush starts, waits are then at most
:data:`STOPPING_MAX_WAIT_S`, and at the deadline a call raises
:class:`~loghandler.interfaces.Abandoned`.

Backoff: "Exponential Backoff And Jitter", AWS Architecture Blog, 2015;
https://docs.aws.amazon.com/sdkref/latest/guide/feature-retry-behavior.html.
S3 error codes: https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html;
Azure's: https://learn.microsoft.com/rest/api/storageservices/blob-service-error-codes
"""

from __future__ import annotations

import enum
from typing import Callable, Optional, TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    TimeoutError as DeferredTimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from loghandler.backoff import Backoff
from loghandler.interfaces import Abandoned, StorageError
from loghandler.metrics import ABANDONED, Metrics

_T = TypeVar("_T")


#: The longest wait between two attempts once the flush on stop began, in seconds:
#: the deadline is near, and what is not stored by then is lost.
STOPPING_MAX_WAIT_S = 1.0


class Fault(enum.Enum):
    """What a failed storage call means (see the module docstring)."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CONFLICT = "conflict"
    GONE = "gone"
    INVALID = "invalid"


#: Statuses and codes of failures worth another attempt.
_TRANSIENT_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        # Azure
        "ServerBusy",
        "OperationTimedOut",
    }
)
#: Failures that last until an operator acts.
_PERMANENT_STATUSES = frozenset({301, 307, 401, 403})
_PERMANENT_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "AccountProblem",
        "PermanentRedirect",
        # SSE-KMS (S3_SSE=aws:kms): a missing, disabled or pending-deletion key
        # answers 400 until the key or S3_SSE_KMS_KEY_ID is fixed.
        "KMS.NotFoundException",
        "KMS.DisabledException",
        "KMS.KMSInvalidStateException",
        # Azure
        "ContainerNotFound",
        "AuthenticationFailed",
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "InvalidAuthenticationInfo",
        "AccountIsDisabled",
        "InsufficientAccountPermissions",
        "CredentialUnavailable",
    }
)
_GONE_CODES = frozenset({"NoSuchUpload", "NoSuchKey", "BlobNotFound"})


def classify(error: BaseException) -> Fault:
    """
    The :class:`Fault` of one failed call: ``error`` is what the client raised (a
    :class:`~loghandler.interfaces.StorageError` for an error answer, the HTTP
    client's exception when no answer came, or anything else).
    """
    if not isinstance(error, StorageError):
        return Fault.TRANSIENT
    if error.status in (409, 412) or error.code in (
        "PreconditionFailed",
        "ConditionalRequestConflict",
    ):
        return Fault.CONFLICT
    if error.code in _GONE_CODES:
        return Fault.GONE
    if error.code in _PERMANENT_CODES or error.status in _PERMANENT_STATUSES:
        return Fault.PERMANENT
    if error.status in _TRANSIENT_STATUSES or error.code in _TRANSIENT_CODES:
        return Fault.TRANSIENT
    return Fault.INVALID


class StorageFault(Exception):
    """
    A call failed in a way its caller must handle (``CONFLICT``, ``GONE``,
    ``INVALID``).

    :ivar fault: the class.
    :ivar operation: the call, such as ``CompleteMultipartUpload``.
    :ivar error: what the client raised.
    """

    def __init__(self, fault: Fault, operation: str, error: BaseException) -> None:
        super().__init__(f"{operation}: {fault.value}: {error}")
        self.fault = fault
        self.operation = operation
        self.error = error


class RetryLayer:
    """
    Runs storage calls until they succeed, fail in a way the caller handles, or the
    shutdown deadline passes.

    :param clock: for waits and timeouts.
    :param attempt_timeout: seconds one attempt may take, answer included.
    :param backoff: waits between attempts after a transient failure.
    :param permanent_backoff: waits after a permanent one.
    :param metrics: counts every attempt by operation and outcome (``ok``, its
        :class:`Fault`'s value, or ``abandoned``), its duration, and the retries;
        a new one by default.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        attempt_timeout: float = 120.0,
        backoff: Backoff = Backoff(base=0.2, cap=30.0),
        permanent_backoff: Backoff = Backoff(base=5.0, cap=60.0),
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._attempt_timeout = attempt_timeout
        self._backoff = backoff
        self._permanent_backoff = permanent_backoff
        self._deadline: Optional[float] = None
        # Sleeping retries, woken in the order they fell asleep (a dict keeps it; a
        # set's order would vary from run to run, and with it a replayed test).
        self._sleeping: dict[Deferred[None], None] = {}
        self._unexpected_logged: set[type] = set()
        #: None while storage works, else why it fails for good (for /healthz).
        self.problem: Optional[str] = None
        # The operation that set ``problem``: only its success clears it, so one
        # key refused while others succeed does not make the problem come and go.
        self._problem_operation: Optional[str] = None
        #: Attempts that failed and were tried again, by operation.
        self.retries: dict[str, int] = {}
        #: While storage calls fail for want of storage (``TRANSIENT`` or
        #: ``PERMANENT``) with none succeeding since: ``(since, reason)``, the clock's
        #: seconds of the first such failure and the last one's text
        #: (``'PutObject: 503 SlowDown'``); None while calls succeed (for the
        #: readiness probe, ``READY_FAIL_AFTER_S``).
        self.failing: Optional[tuple[float, str]] = None

    # -- the deadline ------------------------------------------------------------

    def stopping(self, deadline: float) -> None:
        """
        The flush began and ends at ``deadline`` (clock seconds): wake every sleeping
        retry now; no attempt or wait goes past the deadline.
        """
        self._deadline = deadline
        sleeping, self._sleeping = self._sleeping, {}
        for sleep in sleeping:
            sleep.callback(None)

    def time_left(self) -> Optional[float]:
        """Seconds until the deadline, or None before the flush began."""
        if self._deadline is None:
            return None
        return self._deadline - self._clock.seconds()

    def _check_time(self) -> None:
        left = self.time_left()
        if left is not None and left <= 0:
            raise Abandoned("the shutdown deadline passed")

    def _capped(self, seconds: float) -> float:
        """``seconds``, or less during the flush (see :meth:`wait`)."""
        left = self.time_left()
        if left is None:
            return seconds
        return max(0.0, min(seconds, STOPPING_MAX_WAIT_S, left))

    async def wait(self, seconds: float) -> None:
        """
        Sleep ``seconds``, less when the flush starts meanwhile (woken); during the
        flush at most :data:`STOPPING_MAX_WAIT_S`, so that storage that comes back
        before the deadline is used at once.

        :raises Abandoned: the deadline passed.
        """
        self._check_time()
        seconds = self._capped(seconds)
        sleep: Deferred[None] = Deferred()
        self._sleeping[sleep] = None

        def wake() -> None:
            if not sleep.called:
                sleep.callback(None)

        timer = self._clock.callLater(seconds, wake)
        try:
            await sleep
        finally:
            self._sleeping.pop(sleep, None)
            if timer.active():
                timer.cancel()
        self._check_time()

    def attempt_timeout(self) -> float:
        """
        Seconds an attempt started now may take: ``attempt_timeout``, capped by the
        time left before the deadline.  A client whose calls cannot be cancelled
        (they run in a thread) gives each call this timeout itself.
        """
        left = self.time_left()
        return self._attempt_timeout if left is None else max(0.0, min(self._attempt_timeout, left))

    # -- calls ---------------------------------------------------------------------

    async def call(
        self,
        operation: str,
        key: str,
        call: Callable[[], "Deferred[_T]"],
        slots: Optional[DeferredSemaphore] = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> _T:
        """
        Run ``call()`` (one attempt of ``operation`` on ``key``) until it succeeds.

        :param slots: an attempt holds one of these while it runs (upload slots),
            none while it waits to be retried.
        :param cancelled: tells whether the caller gave up; checked after a failure.
        :returns: the call's result.
        :raises StorageFault: ``CONFLICT``, ``GONE`` or ``INVALID``.
        :raises Abandoned: the deadline passed or the caller gave up.
        """
        attempt = 0
        while True:
            self._check_time()
            try:
                result = await self._attempt(operation, call, slots)
            except Exception as error:
                if (
                    cancelled()
                    or isinstance(error, Abandoned)
                    # Cancelled from outside, not by our own timeout (that one
                    # raises TimeoutError): the caller is giving up.
                    or isinstance(error, CancelledError)
                ):
                    self._count(operation, ABANDONED)
                    raise Abandoned(f"{operation} {key}") from error
                fault = classify(error)
                self._count(operation, fault.value)
                if fault in (Fault.CONFLICT, Fault.GONE, Fault.INVALID):
                    raise StorageFault(fault, operation, error) from error
                delay = self._retrying(fault, operation, key, error, attempt)
                await self.wait(delay)
                attempt += 1
            else:
                self._count(operation, "ok")
                self.failing = None
                if self.problem is not None and operation == self._problem_operation:
                    self._log.info(
                        "storage works again ({operation} {key} succeeded)",
                        event="storage_recovered",
                        operation=operation,
                        key=key,
                    )
                    self.problem = self._problem_operation = None
                return result

    def _count(self, operation: str, outcome: str) -> None:
        """Count one attempt of ``operation`` that ended with ``outcome``."""
        self.metrics.storage_calls.labels(operation=operation, outcome=outcome).inc()

    async def _attempt(
        self,
        operation: str,
        call: Callable[[], "Deferred[_T]"],
        slots: Optional[DeferredSemaphore],
    ) -> _T:
        """One attempt, in a slot; its duration (the slot's wait left out) is observed."""
        if slots is not None:
            await slots.acquire()
        try:
            self._check_time()
            started = self._clock.seconds()
            try:
                result: _T = await call().addTimeout(self.attempt_timeout(), self._clock)
            finally:
                self.metrics.storage_seconds.labels(operation=operation).observe(
                    self._clock.seconds() - started
                )
            return result
        finally:
            if slots is not None:
                slots.release()

    def _retrying(
        self, fault: Fault, operation: str, key: str, error: BaseException, attempt: int
    ) -> float:
        """Log a failure that is retried; the seconds to wait."""
        self.retries[operation] = self.retries.get(operation, 0) + 1
        self.metrics.storage_retries.labels(operation=operation).inc()
        reason = _describe(error)
        since = self._clock.seconds() if self.failing is None else self.failing[0]
        self.failing = (since, f"{operation}: {reason}")
        if fault is Fault.PERMANENT:
            delay = self._capped(self._permanent_backoff.delay(attempt))
            problem = f"{operation} fails: {reason}"
            if self.problem != problem:
                self.problem, self._problem_operation = problem, operation
                self._log.error(
                    "storage fails until this is fixed: {operation} {key}: {reason};"
                    " the data stay in memory and are retried every {cap:g} s at most",
                    event="storage_failing",
                    operation=operation,
                    key=key,
                    reason=reason,
                    cap=self._permanent_backoff.cap,
                )
            return delay
        if not isinstance(error, (StorageError, DeferredTimeoutError)) and not _is_network(error):
            if type(error) not in self._unexpected_logged:
                self._unexpected_logged.add(type(error))
                self._log.failure(
                    "unexpected error from {operation} {key}; retrying it",
                    event="storage_unexpected_error",
                    error_type=type(error).__name__,
                    operation=operation,
                    key=key,
                )
        delay = self._capped(self._backoff.delay(attempt))
        self._log.warn(
            "{operation} {key} failed ({reason}); retry {attempt} in {delay:.2f} s",
            event="storage_retry",
            operation=operation,
            key=key,
            reason=reason,
            attempt=attempt + 1,
            delay=delay,
        )
        return delay


def _is_network(error: BaseException) -> bool:
    """Whether ``error`` is one of Twisted's connection or HTTP client errors."""
    module = type(error).__module__
    return module.startswith("twisted.internet") or module.startswith("twisted.web")


def _describe(error: BaseException) -> str:
    """A short text for a failure, for logs."""
    if isinstance(error, StorageError):
        return f"{error.status} {error.code}".strip() if error.status else str(error)
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

