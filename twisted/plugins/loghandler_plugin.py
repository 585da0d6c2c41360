"""The ``twistd loghandler`` plugin; loads :mod:`loghandler.tap` only when used."""

from twisted.application.service import ServiceMaker

loghandler = ServiceMaker(
    "loghandler",
    "loghandler.tap",
    "Stream POSTed log messages as gzip NDJSON to S3 or Azure Blob Storage.",
    "loghandler",
)
