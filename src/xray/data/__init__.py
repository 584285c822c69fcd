"""Data: files on disk to uint8 batches (reading, the folder layout, the decoded cache, transforms)."""
