"""Object store implementations: S3, in-memory, discard."""
