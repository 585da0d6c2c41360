"""
Configuration: environment variables (and ``twistd loghandler`` options that override
them) become one frozen :class:`Config`.

Every error names the variable and what is wrong with it, in one line, so that a
daemon that cannot start says why: ``{VAR}: must be {allowed}, got {text!r}``, the
same words whether the text is malformed or out of range (secrets are never quoted).
Flags take exactly ``0`` or ``1``; an empty value is the default.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from typing import Callable, Mapping, Optional
from urllib.parse import urlsplit

import attrs

MiB = 1024 * 1024
GiB = 1024 * MiB

#: S3's smallest part (all but the last) and largest part, in bytes
#: (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
S3_MIN_PART_SIZE = 5 * MiB
S3_MAX_PART_SIZE = 5 * GiB

#: ``CHECKPOINT_S`` when unset with ``STORAGE=azure``: each Azure checkpoint appends a
#: gzip member of its own and a block (of 50,000 a blob): 30 s keeps the blob within
#: about 5% of one member per part at 30 messages/s per key and 2,880 blocks per
#: daemon and day (``bench/azure_member_cost.py``).
AZURE_CHECKPOINT_S = 30.0

#: The largest part with ``STORAGE=azure``: a part is one append block, at most
#: 100 MiB; the encoder may overshoot the part size by a message or so.
AZURE_MAX_PART_SIZE = 96 * MiB


class ConfigError(ValueError):
    """
    A setting is missing or malformed.  ``str(error)`` is one line that starts with
    the variable's name.
    """


def _hidden(value: Optional[str]) -> str:
    """A secret setting in ``repr(config)``: whether it is set, never its value."""
    return "None" if value is None else "'<hidden>'"


@attrs.frozen
class Config:
    """
    Everything the daemon is told.  Times are seconds unless the name says otherwise;
    sizes are bytes.  Its ``repr`` shows the settings marked secret
    (``AWS_ACCESS_KEY``, ``AWS_ACCESS_SECRET``, ``AZURE_KEY``,
    ``AZURE_CONNECTION_STRING``) as ``'<hidden>'``.
    """

    addr: str = "0.0.0.0"
    port: int = 8902
    storage: str = "aws"
    queue_timeout_s: float = 3600.0
    no_upload: bool = False
    aws_access_key: Optional[str] = attrs.field(default=None, repr=_hidden)
    aws_access_secret: Optional[str] = attrs.field(default=None, repr=_hidden)
    aws_region: Optional[str] = None
    aws_bucket: Optional[str] = None
    aws_endpoint_url: Optional[str] = None
    #: ``S3_SSE``: ``AES256`` or ``aws:kms``; None leaves it to the bucket's default.
    s3_sse: Optional[str] = None
    #: ``S3_SSE_KMS_KEY_ID``: the KMS key of ``S3_SSE=aws:kms`` (None: S3's ``aws/s3``).
    s3_sse_kms_key_id: Optional[str] = None
    shutdown_timeout_s: float = 25.0
    part_size: int = S3_MIN_PART_SIZE
    max_client_id: int = 10
    max_body_bytes: int = 64 * 1024
    batch_max_bytes: int = MiB
    batch_max_lines: int = 1000
    timestamp_max_age_s: float = 7 * 24 * 3600.0
    timestamp_max_ahead_s: float = 3600.0
    buffer_budget_bytes: int = 256 * MiB
    #: Unset, :func:`from_environ` derives it (:func:`default_client_budget`).
    client_budget_bytes: int = 64 * MiB
    parts_in_flight: int = 2
    completions_in_flight: int = 4
    access_log: bool = False
    checkpoint_s: float = 10.0
    lease_s: float = 10.0
    recovery_interval_s: float = 30.0
    ack: str = "accepted"
    durable_timeout_s: float = 10.0
    azure_acc: Optional[str] = None
    azure_key: Optional[str] = attrs.field(default=None, repr=_hidden)
    azure_container: Optional[str] = None
    azure_blob_endpoint: Optional[str] = None
    azure_connection_string: Optional[str] = attrs.field(default=None, repr=_hidden)
    azure_max_blocks: int = 50_000
    workers: int = 1
    listen: Optional[str] = None
    auth_tokens_file: Optional[str] = None
    ready_fail_after_s: float = 30.0
    admin_addr: str = "0.0.0.0"
    #: None: the probes and metrics are served on the main listener.
    admin_port: Optional[int] = None
    request_timeout_s: float = 30.0
    #: None: derived per process from ``RLIMIT_NOFILE`` at start
    #: (:func:`loghandler.connections.default_max_connections`).
    max_connections: Optional[int] = None


@attrs.frozen
class Setting:
    """
    One environment variable: its name, the :class:`Config` field it fills, how its
    text is parsed, and the help shown by ``twistd loghandler --help``.
    """

    env: str
    field: str
    parse: Callable[[str, str], object]
    help: str
    secret: bool = False

    @property
    def option(self) -> str:
        """The long option that mirrors the variable: ``PORT`` -> ``port``."""
        return self.env.lower().replace("_", "-")

    @property
    def default_text(self) -> str:
        """The default as the variable would be written (``60`` minutes, ``0``), or ""."""
        value = attrs.fields_dict(Config)[self.field].default
        if value is None:
            return ""
        if isinstance(value, bool):
            return "1" if value else "0"
        if self.parse is _minutes:
            value = value / 60
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)


def _refused(env: str, allowed: str, value: str) -> ConfigError:
    """
    The one error of every setting: ``{env}: must be {allowed}, got {value!r}``,
    the same words whether the text is malformed or out of range.
    """
    return ConfigError(f"{env}: must be {allowed}, got {value!r}")


def _text(env: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise ConfigError(f"{env}: must not be empty")
    return value


def _integer(low: int, high: int) -> Callable[[str, str], int]:
    """A parser of integers from ``low`` to ``high``."""
    allowed = f"an integer from {low} to {high}"

    def parse(env: str, value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise _refused(env, allowed, value) from None
        if not low <= number <= high:
            raise _refused(env, allowed, value)
        return number

    return parse


def _number(value: str) -> float:
    """``value`` as a finite number; NaN for text that is none."""
    try:
        number = float(value.strip())
    except ValueError:
        return math.nan
    return number if math.isfinite(number) else math.nan


def _positive_seconds(env: str, value: str) -> float:
    """Seconds greater than 0 (decimals allowed)."""
    number = _number(value)
    if not number > 0:
        raise _refused(env, "a number of seconds greater than 0", value)
    return number


def _seconds(low: float, high: float, off: bool = False) -> Callable[[str, str], float]:
    """
    A parser of seconds from ``low`` to ``high`` (decimals allowed); with ``off``,
    ``0`` is accepted too (the feature turned off).
    """
    allowed = f"a number of seconds from {low:g} to {high:g}" + (", or 0 (off)" if off else "")

    def parse(env: str, value: str) -> float:
        number = _number(value)
        if off and number == 0:
            return 0.0
        if not low <= number <= high:
            raise _refused(env, allowed, value)
        return number

    return parse


#: The acknowledgement modes ``ACK`` takes (DESIGN.md section 6): ``accepted``, 200
#: once the line is held; ``durable``, 200 once the checkpoint holding it is stored.
ACK_MODES = ("accepted", "durable")


def _ack(env: str, value: str) -> str:
    text = value.strip().lower()
    if text not in ACK_MODES:
        raise _refused(env, "'accepted' or 'durable'", value)
    return text


def _minutes(env: str, value: str) -> float:
    """Minutes (decimals allowed), at least :data:`MIN_QUEUE_TIMEOUT_S`; in seconds."""
    seconds = _number(value) * 60.0
    if not (math.isfinite(seconds) and seconds >= MIN_QUEUE_TIMEOUT_S):
        raise _refused(env, f"a number of minutes of at least {MIN_QUEUE_TIMEOUT_S / 60:g}", value)
    return seconds


#: The shortest stream lifetime: shorter ones make a stream, and a completion with
#: its requests, for nearly every message.
MIN_QUEUE_TIMEOUT_S = 0.6

#: S3's rules for bucket names (general purpose buckets): 3 to 63 lowercase letters,
#: digits, dots and hyphens, starting and ending with a letter or digit.
#: https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


def _bucket(env: str, value: str) -> str:
    text = value.strip()
    if not _BUCKET_NAME.match(text) or ".." in text:
        raise _refused(env, "an S3 bucket name (3-63 of a-z, 0-9, '.', '-')", value)
    return text


def _address(env: str, value: str) -> str:
    text = value.strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _refused(env, "an IP address such as 0.0.0.0 or ::", value) from None
    return text


def _flag(env: str, value: str) -> bool:
    """A boolean: exactly ``0`` or ``1`` (surrounding spaces aside), as every flag."""
    text = value.strip()
    if text not in ("0", "1"):
        raise _refused(env, "0 or 1", value)
    return text == "1"


#: The most worker processes ``WORKERS`` may ask for.
MAX_WORKERS = 64


def _workers(env: str, value: str) -> int:
    """A number of worker processes, or ``auto``: the CPUs this process may use."""
    if value.strip().lower() == "auto":
        from loghandler.cpus import usable_cpus

        return min(usable_cpus(), MAX_WORKERS)
    allowed = f"'auto' or an integer from 1 to {MAX_WORKERS}"
    try:
        number = int(value.strip())
    except ValueError:
        raise _refused(env, allowed, value) from None
    if not 1 <= number <= MAX_WORKERS:
        raise _refused(env, allowed, value)
    return number


def _storage(env: str, value: str) -> str:
    text = value.strip().lower()
    if text in ("aws", "azure"):
        return text
    raise _refused(env, "'aws' or 'azure'", value)


#: Azure's rules for names (https://learn.microsoft.com/rest/api/storageservices/
#: naming-and-referencing-containers--blobs--and-metadata): storage accounts 3 to 24
#: lowercase letters and digits; containers 3 to 63 lowercase letters, digits and
#: single hyphens, starting and ending with a letter or digit.
_AZURE_ACCOUNT = re.compile(r"[a-z0-9]{3,24}\Z")
_AZURE_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]\Z")


def _azure_account(env: str, value: str) -> str:
    text = value.strip()
    if not _AZURE_ACCOUNT.match(text):
        raise _refused(env, "a storage account name (3-24 of a-z, 0-9)", value)
    return text


def _azure_container(env: str, value: str) -> str:
    text = value.strip()
    if not _AZURE_CONTAINER.match(text):
        raise _refused(env, "a container name (3-63 of a-z, 0-9, single '-')", value)
    return text


def _azure_key(env: str, value: str) -> str:
    text = value.strip()
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not decoded:
        raise ConfigError(f"{env}: must be the storage account's key, in base64")
    return text


#: The keys of an Azure Storage connection string this daemon understands.
_CONNECTION_STRING_KEYS = frozenset(
    {
        "defaultendpointsprotocol",
        "accountname",
        "accountkey",
        "blobendpoint",
        "endpointsuffix",
        "sharedaccesssignature",
        "queueendpoint",
        "tableendpoint",
        "fileendpoint",
        "usedevelopmentstorage",
    }
)


def _connection_string(env: str, value: str) -> str:
    text = value.strip()
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, equals, field = item.partition("=")
        if not equals or name.strip().lower() not in _CONNECTION_STRING_KEYS:
            # Never quote the text: it holds the account key.
            what = f"unknown key {name.strip()[:40]!r}" if equals else "a part without '='"
            raise ConfigError(
                f"{env}: must be an Azure Storage connection string (Key=Value;... with"
                f" AccountName, AccountKey, BlobEndpoint...); {what}"
            )
        fields[name.strip().lower()] = field
    if "accountkey" in fields:
        try:
            base64.b64decode(fields["accountkey"].strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{env}: its AccountKey must be base64") from None
    if not {"accountname", "blobendpoint", "usedevelopmentstorage"} & fields.keys():
        raise ConfigError(f"{env}: must have AccountName or BlobEndpoint")
    endpoint = fields.get("blobendpoint", "").strip()
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"{env}: BlobEndpoint must be an http:// or https:// URL")
    return text


#: The ``x-amz-server-side-encryption`` values ``S3_SSE`` takes: SSE-S3 and SSE-KMS
#: (https://docs.aws.amazon.com/AmazonS3/latest/userguide/serv-side-encryption.html).
S3_SSE_ALGORITHMS = ("AES256", "aws:kms")


def _sse(env: str, value: str) -> str:
    text = value.strip()
    if text not in S3_SSE_ALGORITHMS:
        raise ConfigError(f"{env}: must be AES256 or aws:kms (as S3 spells them), got {value!r}")
    return text


def _kms_key_id(env: str, value: str) -> str:
    # A key ID, key ARN, alias name (alias/...) or alias ARN: S3 takes any of them in
    # a header, so printable ASCII without spaces; KMS itself judges the rest.
    text = value.strip()
    if not (text.isascii() and text.isprintable()) or " " in text or len(text) > 2048:
        raise ConfigError(
            f"{env}: must be a KMS key ID, key ARN, alias/NAME or alias ARN (printable"
            f" ASCII without spaces), got {value!r}"
        )
    return text


def _endpoint(env: str, value: str) -> str:
    text = value.strip().rstrip("/")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError:
        raise _refused(env, "an http:// or https:// URL", value) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _refused(env, "an http:// or https:// URL", value)
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("ADDR", "addr", _address, "IP address to listen on"),
    Setting("PORT", "port", _integer(0, 65535), "TCP port to listen on (0: any free port)"),
    Setting(
        "LISTEN",
        "listen",
        _text,
        "Twisted server endpoint string in place of ADDR/PORT:"
        " ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/run/loghandler.sock",
    ),
    Setting(
        "AUTH_TOKENS_FILE",
        "auth_tokens_file",
        _text,
        "file of bearer tokens and the client IDs each may write; POST /log then"
        " needs one (reloaded on SIGHUP and when it changes)",
    ),
    Setting("STORAGE", "storage", _storage, "object store: aws or azure"),
    Setting(
        "QUEUE_TIMEOUT_MIN",
        "queue_timeout_s",
        _minutes,
        "minutes after which an object's stream is completed (decimals allowed)",
    ),
    Setting("NO_UPLOAD", "no_upload", _flag, "1: run the whole pipeline, send nothing"),
    Setting("AWS_ACCESS_KEY", "aws_access_key", _text, "AWS access key ID", secret=True),
    Setting("AWS_ACCESS_SECRET", "aws_access_secret", _text, "AWS secret key", secret=True),
    Setting("AWS_REGION", "aws_region", _text, "AWS region of the bucket, e.g. eu-west-1"),
    Setting("AWS_BUCKET", "aws_bucket", _bucket, "S3 bucket to write to"),
    Setting(
        "AWS_ENDPOINT_URL",
        "aws_endpoint_url",
        _endpoint,
        "S3-compatible endpoint (moto, MinIO); path-style addressing",
    ),
    Setting(
        "S3_SSE",
        "s3_sse",
        _sse,
        "server-side encryption of every object written: AES256 or aws:kms"
        " (unset: the bucket's default)",
    ),
    Setting(
        "S3_SSE_KMS_KEY_ID",
        "s3_sse_kms_key_id",
        _kms_key_id,
        "S3_SSE=aws:kms: the KMS key (ID, ARN or alias/NAME; unset: aws/s3)",
    ),
    Setting("AZURE_ACC", "azure_acc", _azure_account, "Azure storage account name"),
    Setting("AZURE_KEY", "azure_key", _azure_key, "Azure storage account key", secret=True),
    Setting("AZURE_CONTAINER", "azure_container", _azure_container, "Azure container"),
    Setting(
        "AZURE_BLOB_ENDPOINT",
        "azure_blob_endpoint",
        _endpoint,
        "Azure blob endpoint (default https://{AZURE_ACC}.blob.core.windows.net; Azurite)",
    ),
    Setting(
        "AZURE_CONNECTION_STRING",
        "azure_connection_string",
        _connection_string,
        "Azure Storage connection string, in place of AZURE_ACC/AZURE_KEY",
        secret=True,
    ),
    Setting(
        "AZURE_MAX_BLOCKS",
        "azure_max_blocks",
        _integer(2, 50_000),
        "blocks after which a blob rolls over to {key}.1, .2... (Azure's limit: 50000)",
    ),
    Setting(
        "WORKERS",
        "workers",
        _workers,
        "worker processes sharing the port, each with its own streams and a share of"
        " BUFFER_BUDGET_BYTES (auto: the CPUs this process may use)",
    ),
    Setting(
        "SHUTDOWN_TIMEOUT_S",
        "shutdown_timeout_s",
        _positive_seconds,
        "seconds the flush on stop may take",
    ),
    Setting(
        "PART_SIZE_BYTES",
        "part_size",
        _integer(S3_MIN_PART_SIZE, S3_MAX_PART_SIZE),
        "compressed bytes per multipart part (5 MiB to 5 GiB)",
    ),
    Setting("MAX_CLIENT_ID", "max_client_id", _integer(1, 1_000_000), "largest client_id"),
    Setting(
        "MAX_BODY_BYTES",
        "max_body_bytes",
        _integer(256, 16 * MiB),
        "largest request body in bytes (413 above)",
    ),
    Setting(
        "BATCH_MAX_BYTES",
        "batch_max_bytes",
        _integer(256, 64 * MiB),
        "largest application/x-ndjson batch body in bytes (413 above)",
    ),
    Setting(
        "BATCH_MAX_LINES",
        "batch_max_lines",
        _integer(1, 100_000),
        "most messages in one application/x-ndjson batch (413 above)",
    ),
    Setting(
        "TIMESTAMP_MAX_AGE_S",
        "timestamp_max_age_s",
        _positive_seconds,
        "oldest accepted timestamp, seconds before now",
    ),
    Setting(
        "TIMESTAMP_MAX_AHEAD_S",
        "timestamp_max_ahead_s",
        _positive_seconds,
        "newest accepted timestamp, seconds after now",
    ),
    Setting(
        "BUFFER_BUDGET_BYTES",
        "buffer_budget_bytes",
        _integer(MiB, 1024 * GiB),
        "bytes held in memory for all objects before 503",
    ),
    Setting(
        "CLIENT_BUDGET_BYTES",
        "client_budget_bytes",
        _integer(MiB, 1024 * GiB),
        "bytes held in memory for one client's objects before its messages get 503"
        " (default: a quarter of BUFFER_BUDGET_BYTES, at least 2 x PART_SIZE_BYTES)",
    ),
    Setting(
        "PARTS_IN_FLIGHT",
        "parts_in_flight",
        _integer(1, 64),
        "parts one object uploads at once",
    ),
    Setting(
        "COMPLETIONS_IN_FLIGHT",
        "completions_in_flight",
        _integer(1, 256),
        "objects merged at once (each holds up to one part in memory)",
    ),
    Setting("ACCESS_LOG", "access_log", _flag, "1: log a line per HTTP request"),
    Setting(
        "CHECKPOINT_S",
        "checkpoint_s",
        _seconds(0.1, 86400.0, off=True),
        "seconds between checkpoints of a stream that received lines (0: off;"
        " %g with STORAGE=azure)" % AZURE_CHECKPOINT_S,
    ),
    Setting(
        "LEASE_S",
        "lease_s",
        _seconds(1.0, 3600.0),
        "seconds between renewals of this writer's lease (gone after 3 x that)",
    ),
    Setting(
        "RECOVERY_INTERVAL_S",
        "recovery_interval_s",
        _seconds(1.0, 86400.0),
        "seconds between passes that merge what gone writers staged",
    ),
    Setting(
        "ACK",
        "ack",
        _ack,
        "accepted: 200 once a message is held; durable: once it is in storage",
    ),
    Setting(
        "DURABLE_TIMEOUT_S",
        "durable_timeout_s",
        _seconds(0.1, 3600.0),
        "ACK=durable: seconds before a message not yet stored is answered 202",
    ),
    Setting(
        "READY_FAIL_AFTER_S",
        "ready_fail_after_s",
        _seconds(0.0, 86400.0),
        "seconds storage calls may fail, none succeeding, before /readyz answers 503",
    ),
    Setting(
        "ADMIN_ADDR",
        "admin_addr",
        _address,
        "IP address of the probes' and metrics' own listener (with ADMIN_PORT)",
    ),
    Setting(
        "ADMIN_PORT",
        "admin_port",
        _integer(0, 65535),
        "TCP port of a listener of its own for /livez, /readyz, /healthz and /metrics,"
        " which the main port then does not serve (unset: the main port serves them)",
    ),
    Setting(
        "REQUEST_TIMEOUT_S",
        "request_timeout_s",
        _seconds(1.0, 3600.0, off=True),
        "seconds from a request's first byte by which all of it (line, headers, body)"
        " must have come, else 408 and the connection is closed (0: no limit)",
    ),
    Setting(
        "MAX_CONNECTIONS",
        "max_connections",
        _integer(1, 1_000_000),
        "open connections at most; past it new ones wait in the listen backlog"
        " (default: RLIMIT_NOFILE's soft limit - 256, at most 10000, per process;"
        " each of WORKERS takes MAX_CONNECTIONS / WORKERS)",
    ),
)


#: Settings whose blank value is an error rather than "unset".
_NEVER_BLANK = frozenset({"azure_key", "azure_connection_string"})


def from_environ(
    environ: Mapping[str, str], overrides: Optional[Mapping[str, str]] = None
) -> Config:
    """
    Build the configuration.

    :param environ: the process environment (``os.environ``).
    :param overrides: values that win over ``environ``, keyed by variable name (the
        command-line options).
    :raises ConfigError: a value is malformed, or a required one is missing
        (``AWS_BUCKET`` and ``AWS_REGION`` with ``STORAGE=aws`` unless ``NO_UPLOAD=1``).
    """
    merged = dict(environ)
    merged.update(overrides or {})
    values: dict[str, object] = {}
    for setting in SETTINGS:
        raw = merged.get(setting.env)
        if raw is not None and raw.strip() == "" and setting.field in _NEVER_BLANK:
            # Blank is not unset here: it would silently change how the daemon
            # authenticates (DefaultAzureCredential instead of a key).
            raise ConfigError(f"{setting.env}: is set but empty; unset it, or give its value")
        if raw is None or raw.strip() == "":
            continue
        values[setting.field] = setting.parse(setting.env, raw)
    if "checkpoint_s" not in values and values.get("storage") == "azure":
        values["checkpoint_s"] = AZURE_CHECKPOINT_S
    config = Config(**values)  # type: ignore[arg-type]
    if not config.no_upload and config.storage == "aws":
        for env, value in (("AWS_BUCKET", config.aws_bucket), ("AWS_REGION", config.aws_region)):
            if value is None:
                raise ConfigError(f"{env}: required with STORAGE=aws (or set NO_UPLOAD=1)")
    if not config.no_upload and config.storage == "azure":
        _check_azure(config)
    if config.storage == "azure" and config.part_size > AZURE_MAX_PART_SIZE:
        raise ConfigError(
            "PART_SIZE_BYTES: at most %d (96 MiB) with STORAGE=azure (an append block"
            " holds 100 MiB), got %d" % (AZURE_MAX_PART_SIZE, config.part_size)
        )
    # Each of WORKERS holds BUFFER_BUDGET_BYTES / WORKERS (worker_share).
    workers = config.workers
    share = config.buffer_budget_bytes // workers
    each = "" if workers == 1 else " with WORKERS=%d" % workers
    if share < 4 * config.part_size:
        raise ConfigError(
            "BUFFER_BUDGET_BYTES: must be at least %s4 x PART_SIZE_BYTES (%d%s), got %d"
            % (
                "" if workers == 1 else "WORKERS x ",
                4 * config.part_size * workers,
                each,
                config.buffer_budget_bytes,
            )
        )
    if config.batch_max_bytes > share // 2:
        raise ConfigError(
            "BATCH_MAX_BYTES: must be at most half of BUFFER_BUDGET_BYTES%s (%d%s), got %d"
            % ("" if workers == 1 else " / WORKERS", share // 2, each, config.batch_max_bytes)
        )
    if config.max_connections is not None and config.max_connections < workers:
        raise ConfigError(
            "MAX_CONNECTIONS: must be at least WORKERS (%d; each worker takes"
            " MAX_CONNECTIONS / WORKERS), got %d" % (workers, config.max_connections)
        )
    if "client_budget_bytes" in values:
        _check_client_budget(config, config.client_budget_bytes)
    else:
        config = attrs.evolve(config, client_budget_bytes=default_client_budget(config))
    if config.s3_sse_kms_key_id is not None and config.s3_sse != "aws:kms":
        raise ConfigError(
            "S3_SSE_KMS_KEY_ID: only with S3_SSE=aws:kms, got S3_SSE=%s"
            % (config.s3_sse or "(unset)")
        )
    if config.admin_port is not None and config.admin_port == config.port != 0:
        raise ConfigError(
            "ADMIN_PORT: must differ from PORT (%d), or be unset to serve the probes"
            " on PORT" % config.port
        )
    if (config.aws_access_key is None) != (config.aws_access_secret is None):
        missing = "AWS_ACCESS_SECRET" if config.aws_access_secret is None else "AWS_ACCESS_KEY"
        raise ConfigError(f"{missing}: AWS_ACCESS_KEY and AWS_ACCESS_SECRET go together")
    return config


def worker_share(config: Config) -> Config:
    """
    The configuration one of ``WORKERS`` worker processes runs with: its share of
    ``BUFFER_BUDGET_BYTES``, of ``CLIENT_BUDGET_BYTES`` and of ``MAX_CONNECTIONS``
    when set (each divided by ``WORKERS``; unset, each worker derives its own).
    """
    if config.workers == 1:
        return config
    return attrs.evolve(
        config,
        buffer_budget_bytes=config.buffer_budget_bytes // config.workers,
        client_budget_bytes=config.client_budget_bytes // config.workers,
        max_connections=(
            None if config.max_connections is None else config.max_connections // config.workers
        ),
    )


def default_client_budget(config: Config) -> int:
    """
    ``CLIENT_BUDGET_BYTES`` when unset: a quarter of ``BUFFER_BUDGET_BYTES`` (64 MiB
    of the default 256 MiB: four busy clients at their shares fill the budget), but
    at least 2 x ``PART_SIZE_BYTES`` (a part being filled and one uploading) and
    ``BATCH_MAX_BYTES`` for each of ``WORKERS``, and at most the whole budget.
    """
    share = max(
        config.buffer_budget_bytes // 4,
        config.workers * 2 * config.part_size,
        config.workers * config.batch_max_bytes,
    )
    return min(share, config.buffer_budget_bytes)


def _check_client_budget(config: Config, share: int) -> None:
    """
    :raises ConfigError: ``share`` is larger than the buffer budget, or smaller
        than 2 x the part size or the largest batch for each of ``WORKERS`` (each
        worker takes ``share / WORKERS``).
    """
    workers = config.workers
    per = " for each of WORKERS=%d" % workers if workers > 1 else ""
    if share > config.buffer_budget_bytes:
        raise ConfigError(
            "CLIENT_BUDGET_BYTES: must be at most BUFFER_BUDGET_BYTES (%d), got %d"
            % (config.buffer_budget_bytes, share)
        )
    if share < workers * 2 * config.part_size:
        raise ConfigError(
            "CLIENT_BUDGET_BYTES: must be at least 2 x PART_SIZE_BYTES%s (%d), got %d"
            % (per, workers * 2 * config.part_size, share)
        )
    if share < workers * config.batch_max_bytes:
        raise ConfigError(
            "CLIENT_BUDGET_BYTES: must be at least BATCH_MAX_BYTES%s (%d), got %d"
            % (per, workers * config.batch_max_bytes, share)
        )


def _check_azure(config: Config) -> None:
    """
    ``STORAGE=azure``: a container, and either a connection string or an account
    (with its key, or none for azure-identity's ``DefaultAzureCredential``).
    """
    if config.azure_container is None:
        raise ConfigError("AZURE_CONTAINER: required with STORAGE=azure (or set NO_UPLOAD=1)")
    if config.azure_connection_string is not None:
        for env, value in (("AZURE_ACC", config.azure_acc), ("AZURE_KEY", config.azure_key)):
            if value is not None:
                raise ConfigError(
                    f"{env}: set either AZURE_CONNECTION_STRING or AZURE_ACC/AZURE_KEY, not both"
                )
        return
    if config.azure_acc is None:
        raise ConfigError(
            "AZURE_ACC: required with STORAGE=azure (or set AZURE_CONNECTION_STRING)"
        )
