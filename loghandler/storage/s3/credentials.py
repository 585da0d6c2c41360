"""
The AWS credentials the S3 client signs with (DESIGN.md section 7): the static keys
``AWS_ACCESS_KEY`` / ``AWS_ACCESS_SECRET`` when set, else botocore's standard chain
(environment, shared config and profile, web identity, container and instance
metadata), whose credentials refresh themselves.

https://docs.aws.amazon.com/sdkref/latest/guide/standardized-credentials.html
"""

from __future__ import annotations

from typing import Optional

from botocore.credentials import Credentials

__all__ = ["aws_credentials"]


def aws_credentials(access_key: Optional[str], secret_key: Optional[str]) -> Credentials:
    """
    Static credentials from ``access_key`` and ``secret_key`` when both are given
    (non-empty); when neither is, the first credentials botocore's standard chain
    finds (refreshable ones for roles).  Reading the chain may block for a moment
    (instance metadata): call this at start-up.

    :param access_key: ``AWS_ACCESS_KEY``, or None/"" when unset.
    :param secret_key: ``AWS_ACCESS_SECRET``, or None/"" when unset.
    :raises ValueError: with one line naming the variables, when only one of them
        is set, when the chain finds nothing, or when the AWS configuration it reads
        is broken (an unknown profile, say).
    """
    if bool(access_key) != bool(secret_key):
        missing = "AWS_ACCESS_SECRET" if access_key else "AWS_ACCESS_KEY"
        raise ValueError(
            f"{missing} is not set: set both AWS_ACCESS_KEY and AWS_ACCESS_SECRET, or"
            " neither to use the standard AWS credential chain"
        )
    if access_key and secret_key:
        return Credentials(access_key, secret_key)

    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        found: Optional[Credentials] = botocore.session.get_session().get_credentials()
    except BotoCoreError as e:
        raise ValueError(
            f"AWS_ACCESS_KEY and AWS_ACCESS_SECRET are not set and the standard AWS"
            f" credential chain failed: {e}"
        ) from e
    if found is None:
        raise ValueError(
            "no AWS credentials: set AWS_ACCESS_KEY and AWS_ACCESS_SECRET or configure"
            " the standard AWS credential chain"
        )
    return found
