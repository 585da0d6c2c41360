"""
How the Azure client turns azure-storage-blob's exceptions into the store's errors
(:func:`loghandler.storage.azure.client.storage_error`), and so how the retry layer
classifies them: an error answer keeps its status and Azure's code, no usable answer
(refused, timed out, cut inside the answer) is status 0 and transient.
"""

from __future__ import annotations

from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseTimeoutError,
)
from twisted.trial.unittest import SynchronousTestCase

from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.retry import Fault, classify
from loghandler.storage.azure.client import storage_error


class _Response:
    """The parts of an azure-core HTTP response the errors read."""

    def __init__(self, status: int, code: str = "") -> None:
        self.status_code = status
        self.reason = "Reason"
        self.headers = {"x-ms-error-code": code} if code else {}
        self.content_type = "application/xml"

    def text(self, encoding: Any = None) -> str:
        return ""


class StorageErrorTests(SynchronousTestCase):
    def convert(self, error: BaseException) -> StorageError:
        converted = storage_error("AppendBlock", error)
        assert isinstance(converted, StorageError), converted
        return converted

    def test_answers_keep_status_and_code(self) -> None:
        """An error answer: its status and x-ms-error-code; 412 is PreconditionFailed."""
        missing = self.convert(ResourceNotFoundError(response=_Response(404, "BlobNotFound")))
        self.assertEqual((missing.status, missing.code, classify(missing)), (404, "BlobNotFound", Fault.GONE))
        stale = self.convert(
            HttpResponseError(response=_Response(412, "AppendPositionConditionNotMet"))
        )
        self.assertIsInstance(stale, PreconditionFailed)
        self.assertEqual((stale.code, classify(stale)), ("AppendPositionConditionNotMet", Fault.CONFLICT))
        busy = self.convert(HttpResponseError(response=_Response(503, "ServerBusy")))
        self.assertIs(classify(busy), Fault.TRANSIENT)

    def test_no_usable_answer_is_status_0(self) -> None:
        """
        Refused, timed out, or cut inside the answer (IncompleteReadError, an
        HttpResponseError without a status): status 0, transient, never an
        "unexpected error".  The last two were returned as they were before.
        """
        for error in (
            ServiceRequestError("refused"),
            ServiceResponseTimeoutError("read timed out"),
            IncompleteReadError("Connection broken: IncompleteRead(10 bytes read)"),
            HttpResponseError("Connection broken"),
        ):
            converted = self.convert(error)
            self.assertEqual(
                (converted.status, converted.code, classify(converted)),
                (0, type(error).__name__, Fault.TRANSIENT),
            )

    def test_credential_without_token(self) -> None:
        """DefaultAzureCredential found no identity: 401 CredentialUnavailable, permanent."""
        converted = self.convert(ClientAuthenticationError("no identity\nmore lines"))
        self.assertEqual((converted.status, converted.code), (401, "CredentialUnavailable"))
        self.assertEqual(converted.message, "no identity")
        self.assertIs(classify(converted), Fault.PERMANENT)

    def test_anything_else_unchanged(self) -> None:
        """Not the SDK's: returned as it is (the retry layer logs it as unexpected)."""
        error = TypeError("a bug")
        self.assertIs(storage_error("AppendBlock", error), error)

    def test_no_secret_in_the_message(self) -> None:
        """
        A refused connection's message names the URL it asked for, SAS token and
        all (requests: "Max retries exceeded with url: /acc/c/blob?sv=...&sig=...");
        the store's error keeps the path, not the query, nor a key or signature
        anywhere in the text.
        """
        sas = "sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2030-01-01T00%3A00%3A00Z&sig=SeCrEt%2Bsig%3D"
        refused = ServiceRequestError(
            "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url:"
            " /devstoreaccount1/logs/_loghandler/container-check?" + sas + " (Caused by"
            " NewConnectionError(\"Failed to establish a new connection: [Errno 111]\"))"
        )
        converted = self.convert(refused)
        self.assertNotIn("SeCrEt", str(converted))
        self.assertNotIn("sig=", str(converted))
        self.assertIn("/devstoreaccount1/logs/_loghandler/container-check?", str(converted))
        self.assertIn("Errno 111", str(converted))
        keyed = self.convert(
            ServiceRequestError("bad: AccountKey=a2V5a2V5;SharedAccessSignature=sv=1&sig=abc")
        )
        self.assertNotIn("a2V5a2V5", str(keyed))
        self.assertNotIn("abc", str(keyed))
        token = self.convert(ClientAuthenticationError("refused: Authorization: Bearer eyJhbGciOi.x.y"))
        self.assertNotIn("eyJhbGciOi", str(token))
