"""Azure Blob Storage: append blobs (DESIGN.md sections 5 and 7)."""
