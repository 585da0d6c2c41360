"""
The azure-storage-blob ``ContainerClient`` the configuration asks for, by the first
that is set:

1. ``AZURE_CONNECTION_STRING`` (Azurite, SAS tokens);
2. ``AZURE_ACC`` and ``AZURE_KEY``: shared key, at ``AZURE_BLOB_ENDPOINT`` or
   ``https://{AZURE_ACC}.blob.core.windows.net``;
3. ``AZURE_ACC`` alone: azure-identity's ``DefaultAzureCredential`` (workload
   identity on AKS, managed identity, ``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/
   ``AZURE_CLIENT_SECRET``, the Azure CLI's login); the identity needs the role
   Storage Blob Data Contributor on the container.

Always with the SDK's retries off (``retry_total=0``: the one retry layer retries)
and a connection pool as large as the thread pool.
"""

from __future__ import annotations

from typing import Any

from loghandler.config import Config, ConfigError


def _transport(connections: int) -> Any:
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=connections)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session, session_owner=True)


def container_client(config: Config, connections: int) -> Any:
    """
    An ``azure.storage.blob.ContainerClient`` for ``AZURE_CONTAINER``.

    :param connections: the connection pool's size (the calls at once).
    :raises ConfigError: the SDK refused the connection string or endpoint (the
        message names the variable, never its value).
    """
    from azure.storage.blob import ContainerClient

    assert config.azure_container is not None
    options: dict[str, Any] = dict(retry_total=0, transport=_transport(connections))
    if config.azure_connection_string is not None:
        try:
            return ContainerClient.from_connection_string(
                config.azure_connection_string, config.azure_container, **options
            )
        except ValueError as e:
            raise ConfigError(f"AZURE_CONNECTION_STRING: refused by azure-storage-blob: {e}") from None
    assert config.azure_acc is not None
    endpoint = config.azure_blob_endpoint or f"https://{config.azure_acc}.blob.core.windows.net"
    credential: Any
    if config.azure_key is not None:
        credential = {"account_name": config.azure_acc, "account_key": config.azure_key}
    else:
        import logging

        from azure.identity import DefaultAzureCredential

        # azure-identity logs every credential it tried, about 14 lines, at each
        # failed attempt (every 5 s while the start check fails); the daemon logs
        # the failure once per cause ("401 CredentialUnavailable ...").
        logging.getLogger("azure.identity").setLevel(logging.ERROR)
        credential = DefaultAzureCredential()
    try:
        return ContainerClient(endpoint, config.azure_container, credential=credential, **options)
    except ValueError as e:
        raise ConfigError(f"AZURE_BLOB_ENDPOINT: refused by azure-storage-blob: {e}") from None


def describe(config: Config) -> str:
    """How the daemon authenticates, for the start line (no secret)."""
    if config.azure_connection_string is not None:
        return "connection string"
    if config.azure_key is not None:
        return "shared key of account %s" % config.azure_acc
    return "DefaultAzureCredential for account %s" % config.azure_acc
