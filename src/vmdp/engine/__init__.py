"""Backup and restore orchestration, and the read/hash/compress/store pipeline."""
