"""loghandler: streams log messages as gzip NDJSON to object storage."""
