"""
``twistd loghandler``: the options and ``makeService``, the one place that reads the
environment, touches the global reactor and builds the real storage client.

Each option mirrors an environment variable and wins over it; secrets
(``AWS_ACCESS_KEY``, ``AWS_ACCESS_SECRET``) are taken from the environment only, so
they never show in ``ps``.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any, Callable, Mapping, Optional

import attrs
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from loghandler.admin import Probes
from loghandler.auth import TokenFile, reload_on_sighup
from loghandler.budget import MemoryBudget
from loghandler.config import SETTINGS, Config, ConfigError, from_environ
from loghandler.connections import FD_RESERVE, default_max_connections
from loghandler.interfaces import IObjectStore
from loghandler.listen import (
    LISTEN_BACKLOG,
    admin_on,
    check_listen,
    listen_on,
    shared_endpoint,
)
from loghandler.metrics import Metrics
from loghandler.service import STREAM_SERVICE_NAME, build_service
from loghandler.stopping import StopSignals

_log = Logger()
_FLAGS = {"no_upload", "access_log"}


class Options(usage.Options):
    """``twistd loghandler`` options; each overrides its environment variable."""

    synopsis = "[options]"
    longdesc = (
        "Streams log messages POSTed to /log as gzip NDJSON into one object per UTC day"
        " and client on S3 or Azure Blob Storage.  Every option mirrors an environment variable of the same"
        " name in capitals (--queue-timeout-min: QUEUE_TIMEOUT_MIN) and wins over it."
        " AWS_ACCESS_KEY, AWS_ACCESS_SECRET, AZURE_KEY and AZURE_CONNECTION_STRING are"
        " read from the environment only."
    )
    optFlags = [
        [s.option, None, "%s [%s]" % (s.help, s.env)] for s in SETTINGS if s.field in _FLAGS
    ]
    optParameters = [
        [
            s.option,
            None,
            None,
            "%s [%s%s]" % (s.help, s.env, ", default " + s.default_text if s.default_text else ""),
        ]
        for s in SETTINGS
        if s.field not in _FLAGS and not s.secret
    ]

    def overrides(self) -> dict[str, str]:
        """The options given, keyed by environment variable name."""
        result = {}
        for setting in SETTINGS:
            value = self.get(setting.option)
            if setting.field in _FLAGS:
                if value:
                    result[setting.env] = "1"
            elif value is not None:
                result[setting.env] = value
        return result


def _exit(message: str) -> None:
    sys.stderr.write("loghandler: %s\n" % message)
    raise SystemExit(2)


def load_config(options: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """The configuration from the environment and the options; exits with one line on error."""
    overrides = options.overrides() if isinstance(options, Options) else {}
    try:
        return from_environ(environ, overrides)
    except ConfigError as e:
        _exit(str(e))
        raise


def _taken_over() -> None:
    """
    Another process judged this one gone (its lease lapsed) and took its staged
    data: stop at once, without a flush, as after a crash; a flush now would store
    twice what recovery already merged.
    """
    _log.critical(
        "this process's lease was taken over by recovery in another process (storage"
        " was out of reach for longer than 3 x LEASE_S); exiting at once without a"
        " flush: lines not yet checkpointed are lost, as after a crash",
        event="lease_taken_over_exit",
    )
    os._exit(75)  # EX_TEMPFAIL: a supervisor restarts it


def make_store(
    config: Config, reactor: Any, budget: MemoryBudget, metrics: Optional[Metrics] = None
) -> tuple[IObjectStore, list[IService]]:
    """
    The ``IObjectStore`` the configuration asks for, and its background services:
    S3 (credentials from ``AWS_ACCESS_KEY``/``AWS_ACCESS_SECRET`` or botocore's
    standard chain; every object created asks for ``S3_SSE`` encryption, with
    ``S3_SSE_KMS_KEY_ID``) with its lease and recovery, or the discard store for
    ``NO_UPLOAD=1``.  Merges count their memory in ``budget``; the store's retry
    layer, and through it the merges, recovery and appends, count on ``metrics``.
    """
    if config.no_upload:
        from loghandler.storage.discard import DiscardStore

        return DiscardStore(), []
    if config.storage == "azure":
        return make_azure_store(config, reactor, metrics), []
    import uuid

    from loghandler.retry import RetryLayer
    from loghandler.storage.s3.client import ServerSideEncryption, build_s3_client
    from loghandler.storage.s3.lease import Lease
    from loghandler.storage.s3.recovery import Recoverer, RecoveryService
    from loghandler.storage.s3.writer import S3ObjectStore
    from loghandler.threads import on_thread_pool

    assert config.aws_bucket is not None and config.aws_region is not None
    credentials = _aws_credentials(config)
    client = build_s3_client(
        reactor,
        bucket=config.aws_bucket,
        region=config.aws_region,
        endpoint_url=config.aws_endpoint_url,
        credentials=credentials,
        encryption=(
            ServerSideEncryption(config.s3_sse, config.s3_sse_kms_key_id)
            if config.s3_sse is not None
            else None
        ),
    )
    writer_id = uuid.uuid4().hex
    retry = RetryLayer(reactor, metrics=metrics)
    lease = Lease(client, retry, reactor, writer_id, config.lease_s, _taken_over)
    store = S3ObjectStore(
        client,
        reactor,
        budget,
        completions_in_flight=config.completions_in_flight,
        writer_id=writer_id,
        retry=retry,
        defer_to_thread=on_thread_pool(reactor),
        lease=lease,
    )
    recoverer = Recoverer(
        client, retry, store.merger, lease, writer_id, config.lease_s, store.merge_slots
    )
    return store, [RecoveryService(recoverer, config.recovery_interval_s, reactor)]


#: Azure calls at once (threads of the Azure client's pool).
AZURE_CALLS_AT_ONCE = 16


def make_azure_store(
    config: Config, reactor: Any, metrics: Optional[Metrics] = None
) -> IObjectStore:
    """
    The Azure store: append blobs in ``AZURE_CONTAINER`` through azure-storage-blob
    on a thread pool of :data:`AZURE_CALLS_AT_ONCE` threads; exits with one line
    when the SDK refuses the settings.
    """
    from loghandler.retry import RetryLayer
    from loghandler.storage.azure.client import AzureBlobClient
    from loghandler.storage.azure.writer import AzureObjectStore

    retry = RetryLayer(reactor, metrics=metrics)
    sdk_client = _azure_container_client(config, AZURE_CALLS_AT_ONCE)
    client = AzureBlobClient(sdk_client, reactor, AZURE_CALLS_AT_ONCE, retry.attempt_timeout)
    return AzureObjectStore(
        client,
        reactor,
        retry=retry,
        call_slots=AZURE_CALLS_AT_ONCE,
        max_blocks=config.azure_max_blocks,
    )


def makeService(options: Mapping[str, Any], reactor: Optional[Any] = None) -> IService:
    """
    Build the root service from ``options`` and ``os.environ``: the service itself,
    or with ``WORKERS`` above 1 the supervisor of that many worker processes
    (:mod:`loghandler.supervisor`), which run :func:`build_root` each.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = load_config(options, os.environ)
    try:
        if config.workers > 1:
            from loghandler.supervisor import WorkerSupervisor

            check_store_settings(config)
            # Refused here with one line, before twistd starts its log; each worker
            # reads the key and the tokens again.
            shared_endpoint(listen_on(config))
            load_tokens(config, reactor)
            check_listen(listen_on(config, LISTEN_BACKLOG))
            check_admin_listen(config)
            overrides = options.overrides() if isinstance(options, Options) else {}
            return WorkerSupervisor(config, reactor, {**os.environ, **overrides})
        check_listen(listen_on(config, LISTEN_BACKLOG))
        check_admin_listen(config)
        root = build_root(config, reactor)
    except ConfigError as e:
        _exit(str(e))
        raise
    streams = root.getServiceNamed(STREAM_SERVICE_NAME)  # type: ignore[attr-defined]
    reactor.callWhenRunning(StopSignals(reactor, lambda: streams.lines_lost).install)
    return root


def check_admin_listen(config: Config) -> None:
    """
    ``ADMIN_ADDR``/``ADMIN_PORT``, when set, can be bound: else one line naming them
    and exit status 2 now, before twistd daemonizes (its parent would wait forever
    for a child that exited in ``privilegedStartService``).
    """
    on = admin_on(config)
    if on is not None:
        check_listen(on)


def load_tokens(config: Config, reactor: Any) -> Optional[TokenFile]:
    """
    ``AUTH_TOKENS_FILE``'s credentials, or None without the setting.

    :raises ConfigError: the file cannot be read or parsed.
    """
    if config.auth_tokens_file is None:
        return None
    return TokenFile(config.auth_tokens_file, reactor)


def check_store_settings(config: Config) -> None:
    """
    Refuse, with one line and exit status 2, the store settings that only the
    storage client checks (credentials, a connection string): the supervisor of
    ``WORKERS`` checks them before it starts any worker.
    """
    if config.no_upload:
        return
    if config.storage == "azure":
        _azure_container_client(config, 1).close()
    else:
        _aws_credentials(config)


def _aws_credentials(config: Config) -> Any:
    """botocore's credentials for the settings; exits with one line when refused."""
    from loghandler.storage.s3.credentials import aws_credentials

    try:
        return aws_credentials(config.aws_access_key, config.aws_access_secret)
    except ValueError as e:
        _exit(str(e))
        raise


def _azure_container_client(config: Config, connections: int) -> Any:
    """The SDK's container client; exits with one line when the SDK refuses the settings."""
    from loghandler.storage.azure.settings import container_client

    try:
        return container_client(config, connections)
    except ConfigError as e:
        _exit(str(e))
        raise


def _check_descriptors(
    max_connections: int, getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
) -> None:
    """
    Warn when this process's share of ``MAX_CONNECTIONS`` needs more file
    descriptors than ``RLIMIT_NOFILE`` allows: past it connections fail with
    EMFILE ("Too many open files") instead of waiting for the cap.
    """
    soft, _ = getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections > soft - FD_RESERVE:
        _log.warn(
            "MAX_CONNECTIONS: {max_connections} connections in this process need more file"
            " descriptors than RLIMIT_NOFILE's soft limit of {soft} leaves ({reserve} are"
            " kept for storage and logs); raise it (ulimit -n, systemd's LimitNOFILE=)"
            " or lower MAX_CONNECTIONS",
            event="descriptors_short",
            max_connections=max_connections,
            soft=soft,
            reserve=FD_RESERVE,
        )


def build_root(
    config: Config,
    reactor: Any,
    adopt: Optional[tuple[int, int]] = None,
    probes: Optional[Probes] = None,
) -> IService:
    """
    The service of one process: its store (and the store's lease and recovery), its
    streams, its ``AUTH_TOKENS_FILE`` credentials (reloaded on SIGHUP once the
    reactor runs) and its listener, logged in one start line.

    :param adopt: ``(fd, family)`` of an inherited listening socket (a worker).
    :param probes: what the probes and metrics answer (a worker: the whole server's).
    :raises ConfigError: ``LISTEN`` or ``AUTH_TOKENS_FILE`` is refused.
    """
    tokens = load_tokens(config, reactor)
    budget = MemoryBudget(config.buffer_budget_bytes)
    metrics = Metrics()
    store, background = make_store(config, reactor, budget, metrics)
    if background:  # S3: leases and recovery
        store_settings = ", LEASE_S=%g, RECOVERY_INTERVAL_S=%g" % (
            config.lease_s,
            config.recovery_interval_s,
        )
    elif config.storage == "azure" and not config.no_upload:
        from loghandler.storage.azure.settings import describe

        store_settings = ", %s, rollover after %d blocks" % (
            describe(config),
            config.azure_max_blocks,
        )
    else:
        store_settings = ""
    max_connections = config.max_connections
    if max_connections is None:
        max_connections = default_max_connections()
        config = attrs.evolve(config, max_connections=max_connections)
    _log.info(
        "loghandler on {where}, storage {store}, objects completed after {lifetime:g} s,"
        " ACK={ack}, CHECKPOINT_S={checkpoint_s:g}{store_settings}{auth},"
        " REQUEST_TIMEOUT_S={request_timeout_s:g}, MAX_CONNECTIONS={max_connections}",
        event="started",
        where=config.listen or "%s:%d" % (config.addr, config.port),
        addr=config.addr,
        port=config.port,
        store=store,
        lifetime=config.queue_timeout_s,
        ack=config.ack,
        checkpoint_s=config.checkpoint_s,
        store_settings=store_settings,
        auth=""
        if tokens is None
        else ", %d credentials from AUTH_TOKENS_FILE" % len(tokens.credentials),
        request_timeout_s=config.request_timeout_s,
        max_connections=max_connections,
    )
    _check_descriptors(max_connections)
    if config.checkpoint_s == 0 and config.ack == "accepted" and not config.no_upload:
        _log.warn(
            "CHECKPOINT_S=0 with ACK=accepted: a crash loses every line since each"
            " object's last rotation (up to QUEUE_TIMEOUT_MIN)",
            event="checkpoints_off",
        )
    root = build_service(
        config,
        store,
        reactor,
        budget=budget,
        background=background,
        adopt=adopt,
        probes=probes,
        metrics=metrics,
        auth=tokens,
    )
    reactor.callWhenRunning(reload_on_sighup, reactor, tokens)
    return root
